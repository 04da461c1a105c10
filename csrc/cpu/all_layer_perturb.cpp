// CPU kernels of the all-layer perturbation u' = u + ||u_b||_2 * delta and its backward.
// Same math and byte model as csrc/cuda/all_layer_perturb.cu. Each example (a flat range of
// N elements in the working layout, see fastmargin/all_layer_perturb.h) is cut into chunks of
// kChunk elements; pass 1 reduces every chunk in parallel (fp32 / fp64 accumulators), the
// chunk partials of an example are summed in a fixed order (results do not depend on the
// thread count), and pass 2 applies the elementwise update chunk by chunk in parallel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "fastmargin/all_layer_perturb.h"

namespace fastmargin {
namespace {

constexpr int64_t kChunk = 8192;

// Calls f(b, lo, hi) for every chunk [lo, hi) of every example b, in parallel.
template <typename F>
void for_each_chunk(int64_t B, int64_t N, const F& f) {
  const int64_t chunks = std::max<int64_t>(1, (N + kChunk - 1) / kChunk);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, std::min(N, kChunk)));
  at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t id = begin; id < end; ++id) {
      const int64_t b = id / chunks, lo = (id % chunks) * kChunk;
      f(b, lo, std::min(N, lo + kChunk));
    }
  });
}

// Sum over [0, len) of x_i * y_i (SQUARE: x_i^2) with kLanes independent accumulators: the
// compiler vectorises the lanes (no reassociation of one serial sum is needed), and the error
// chain of each lane is kLanes times shorter than a single running sum.
constexpr int kLanes = 16;

template <bool SQUARE, typename acc_t, typename a_t, typename c_t>
acc_t chunk_dot(const a_t* __restrict x, const c_t* __restrict y, int64_t len) {
  acc_t s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int e = 0; e < kLanes; ++e) {
      const acc_t xv = static_cast<acc_t>(x[i + e]);
      s[e] += xv * (SQUARE ? xv : static_cast<acc_t>(y[i + e]));
    }
  }
  for (; i < len; ++i) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    s[0] += xv * (SQUARE ? xv : static_cast<acc_t>(y[i]));
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {  // pairwise merge of the lanes
    for (int e = 0; e < w; ++e) s[e] += s[e + w];
  }
  return s[0];
}

// Per-example sums s_b = sum_i a_bi * c_bi (SQUARE: sum_i a_bi^2), accumulated in acc_t.
template <bool SQUARE, typename acc_t, typename a_t, typename c_t>
std::vector<acc_t> per_example_dot(const a_t* a, const c_t* c, int64_t B, int64_t N) {
  const int64_t chunks = std::max<int64_t>(1, (N + kChunk - 1) / kChunk);
  std::vector<acc_t> partial(B * chunks, acc_t(0));
  for_each_chunk(B, N, [&](int64_t b, int64_t lo, int64_t hi) {
    const int64_t off = b * N + lo;
    partial[b * chunks + lo / kChunk] =
        chunk_dot<SQUARE, acc_t>(a + off, SQUARE ? nullptr : c + off, hi - lo);
  });
  std::vector<acc_t> sums(B, acc_t(0));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < chunks; ++j) sums[b] += partial[b * chunks + j];
  }
  return sums;
}

// out_i = x_i + k * y_i, in acc_t, rounded once.
template <typename acc_t, typename x_t, typename y_t, typename o_t>
void axpy(const x_t* __restrict x, const y_t* __restrict y, o_t* __restrict out, acc_t k,
          int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    out[i] = static_cast<o_t>(static_cast<acc_t>(x[i]) + k * static_cast<acc_t>(y[i]));
  }
}

// out_i = k * x_i.
template <typename acc_t, typename x_t, typename o_t>
void scale(const x_t* __restrict x, o_t* __restrict out, acc_t k, int64_t len) {
  for (int64_t i = 0; i < len; ++i) out[i] = static_cast<o_t>(k * static_cast<acc_t>(x[i]));
}

template <typename scalar_t, typename delta_t>
void forward_impl(const at::Tensor& u, const at::Tensor& delta, at::Tensor& out, at::Tensor& norm) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = u.size(0), N = u.numel() / B;
  const scalar_t* up = u.const_data_ptr<scalar_t>();
  const delta_t* dp = delta.const_data_ptr<delta_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  acc_t* np = norm.mutable_data_ptr<acc_t>();
  const std::vector<acc_t> sq = per_example_dot<true, acc_t, scalar_t, scalar_t>(up, nullptr, B, N);
  for (int64_t b = 0; b < B; ++b) np[b] = std::sqrt(sq[b]);
  for_each_chunk(B, N, [&](int64_t b, int64_t lo, int64_t hi) {
    const int64_t off = b * N + lo;
    axpy<acc_t>(up + off, dp + off, op + off, np[b], hi - lo);
  });
}

std::tuple<at::Tensor, at::Tensor> all_layer_perturb_fwd_cpu(const at::Tensor& u_in,
                                                             const at::Tensor& delta_in) {
  check_perturb_inputs(u_in, delta_in);
  const at::Tensor u = working_layout(u_in);
  at::Tensor out = at::empty_like(u);
  const int64_t B = u.size(0);
  at::Tensor norm = at::empty({B}, u.options().dtype(perturb_stats_dtype(u)));
  if (B == 0) return {out, norm};
  if (u.numel() == 0) return {out, norm.zero_()};
  const at::Tensor delta = in_layout_of(delta_in, u);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, u.scalar_type(), "all_layer_perturb_fwd_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (delta.scalar_type() == u.scalar_type()) {
          forward_impl<scalar_t, scalar_t>(u, delta, out, norm);
        } else {
          forward_impl<scalar_t, acc_t>(u, delta, out, norm);  // wider (float32) delta
        }
      });
  return {out, norm};
}

// grad_u = g + u * (<g, delta> / ||u||) (the u/||u|| term is 0 where ||u|| = 0, a subgradient),
// grad_delta = ||u|| * g. Either may be skipped (returned as an empty (0,) tensor).
template <typename scalar_t, typename delta_t>
void backward_impl(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& delta,
                   const at::Tensor& norm, at::Tensor* grad_u, at::Tensor* grad_delta) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = u.size(0), N = u.numel() / B;
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const scalar_t* up = u.const_data_ptr<scalar_t>();
  const acc_t* np = norm.const_data_ptr<acc_t>();
  scalar_t* gu = grad_u ? grad_u->mutable_data_ptr<scalar_t>() : nullptr;
  delta_t* gd = grad_delta ? grad_delta->mutable_data_ptr<delta_t>() : nullptr;
  std::vector<acc_t> coef(B, acc_t(0));
  if (gu) {
    const std::vector<acc_t> dot =
        per_example_dot<false, acc_t, scalar_t, delta_t>(gp, delta.const_data_ptr<delta_t>(), B, N);
    for (int64_t b = 0; b < B; ++b) coef[b] = np[b] > acc_t(0) ? dot[b] / np[b] : acc_t(0);
  }
  for_each_chunk(B, N, [&](int64_t b, int64_t lo, int64_t hi) {
    const int64_t off = b * N + lo;
    if (gu) axpy<acc_t>(gp + off, up + off, gu + off, coef[b], hi - lo);  // g + u * coef
    if (gd) scale<acc_t>(gp + off, gd + off, np[b], hi - lo);             // ||u|| * g
  });
}

std::tuple<at::Tensor, at::Tensor> all_layer_perturb_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& u_in, const at::Tensor& delta_in,
    const at::Tensor& norm, bool need_grad_u, bool need_grad_delta) {
  check_perturb_backward(grad_in, u_in, delta_in, norm);
  const at::Tensor u = working_layout(u_in);
  at::Tensor grad_u = need_grad_u ? at::empty_like(u) : at::empty({0}, u.options());
  at::Tensor grad_delta =
      need_grad_delta ? at::empty_like(u, delta_in.options()) : at::empty({0}, delta_in.options());
  if (u.numel() == 0 || (!need_grad_u && !need_grad_delta)) return {grad_u, grad_delta};
  const at::Tensor grad = in_layout_of(grad_in, u);
  const at::Tensor delta = need_grad_u ? in_layout_of(delta_in, u) : delta_in;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, u.scalar_type(), "all_layer_perturb_bwd_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::Tensor* gu = need_grad_u ? &grad_u : nullptr;
        at::Tensor* gd = need_grad_delta ? &grad_delta : nullptr;
        if (delta.scalar_type() == u.scalar_type()) {
          backward_impl<scalar_t, scalar_t>(grad, u, delta, norm, gu, gd);
        } else {
          backward_impl<scalar_t, acc_t>(grad, u, delta, norm, gu, gd);
        }
      });
  return {grad_u, grad_delta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmargin, CPU, m) {
  m.impl("all_layer_perturb_fwd", &all_layer_perturb_fwd_cpu);
  m.impl("all_layer_perturb_bwd", &all_layer_perturb_bwd_cpu);
}

}  // namespace fastmargin
