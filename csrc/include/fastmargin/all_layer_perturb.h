// Host-side contract of the all-layer perturbation ops (u' = u + ||u_b||_2 * delta), shared by
// the CPU and CUDA files: argument checks, the working layout, and output allocation.
//
// Layout. Both the norm ||u_b|| and the backward's <g_b, delta_b> are sums over one example's
// elements, and the rest of the op is elementwise, so any order of an example's elements
// gives the same result as long as u, delta (and g) use the SAME order. The kernels therefore
// treat example b as the flat memory range [b*N, (b+1)*N) (N = numel / B) of a tensor that is
// "example-major": non-overlapping and dense with the batch dim outermost in memory
// (stride(0) == N, or B <= 1). Contiguous and channels_last (N)CHW / (N)CDHW tensors are
// example-major, so they are read in place. Other layouts of u are copied to contiguous once;
// delta (and the backward's g) are copied into u's working layout only when their strides
// differ from it. Outputs take the working layout (empty_like of it).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

namespace fastmargin {

// Dtype of the saved per-example norm: float64 for float64 u, float32 otherwise.
inline at::ScalarType perturb_stats_dtype(const at::Tensor& u) {
  return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// True when every example of t is one flat range [b*N, (b+1)*N) of its storage.
inline bool example_major(const at::Tensor& t) {
  // numel < 2 counts as dense, as torch._prims_common says (the fake kernel's check).
  if (t.dim() == 0 || (t.numel() >= 2 && !t.is_non_overlapping_and_dense())) return false;
  const int64_t B = t.size(0);
  return B <= 1 || t.numel() == 0 || t.stride(0) == t.numel() / B;
}

// Same element order in memory (strides of size-1 dims never matter).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// u itself when it is example-major, else a contiguous copy.
inline at::Tensor working_layout(const at::Tensor& u) {
  return example_major(u) ? u : u.contiguous();
}

// t with the element order of `like` (an example-major tensor of the same shape): t itself
// when the layouts already agree, else one copy.
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (same_layout(t, like)) return t;
  at::Tensor r = at::empty_strided(like.sizes(), like.strides(), t.options());
  r.copy_(t);
  return r;
}

inline void check_delta_dtype(const at::Tensor& u, const at::Tensor& delta, const char* name) {
  const auto su = u.scalar_type(), sd = delta.scalar_type();
  const bool low = su == at::kHalf || su == at::kBFloat16;
  TORCH_CHECK(sd == su || (low && sd == at::kFloat), name, ": expected dtype ", su,
              low ? " or float32" : "", " (matching u), got ", sd);
}

inline void check_perturb_inputs(const at::Tensor& u, const at::Tensor& delta) {
  TORCH_CHECK(u.dim() >= 1, "u: expected a tensor with a batch dim (B, ...), got a 0-D tensor");
  const auto su = u.scalar_type();
  TORCH_CHECK(su == at::kFloat || su == at::kHalf || su == at::kBFloat16 || su == at::kDouble,
              "u: expected float32, float16, bfloat16 or float64, got ", su);
  TORCH_CHECK(delta.sizes() == u.sizes(), "delta: expected the shape of u ", u.sizes(), ", got ",
              delta.sizes());
  TORCH_CHECK(delta.device() == u.device(), "delta: expected device ", u.device(), ", got ",
              delta.device());
  check_delta_dtype(u, delta, "delta");
}

inline void check_perturb_backward(const at::Tensor& grad, const at::Tensor& u,
                                   const at::Tensor& delta, const at::Tensor& norm) {
  check_perturb_inputs(u, delta);
  TORCH_CHECK(grad.sizes() == u.sizes() && grad.scalar_type() == u.scalar_type() &&
                  grad.device() == u.device(),
              "grad: expected a tensor like u (shape ", u.sizes(), ", dtype ", u.scalar_type(),
              ", device ", u.device(), ")");
  const auto f = perturb_stats_dtype(u);
  TORCH_CHECK(norm.dim() == 1 && norm.size(0) == u.size(0) && norm.scalar_type() == f &&
                  norm.is_contiguous() && norm.device() == u.device(),
              "norm: expected a contiguous (", u.size(0), ",) tensor of dtype ", f);
}

}  // namespace fastmargin
