// CUDA kernels of the multiclass margin m = z_y - max_{c != y} z_c.
//
// Forward: one group of threads per row (a warp when C <= 2048, a 512-thread block otherwise)
// reads the row once with 16-byte vector loads, each thread keeping its running (max, index)
// over the classes c != y in fp32 (fp64 for double), then a warp-shuffle (+ shared memory across
// warps) merge with a total order (NaN first, then value, then the lowest index) picks the
// runner-up; the leader writes the margin and the runner-up index. No host synchronisation,
// int64 offsets, a target outside [0, C) gives NaN / -1 without reading the row.
//
// Backward: one group per row writes the dense gradient row (+g at y, -g at the runner-up, zeros
// elsewhere) with 16-byte vector stores; it never reads the logits (the forward saved only the
// (N,) runner-up indices), so the autograd graph does not keep the logits alive.
//
// Byte model (s = bytes per logit, N rows of C classes):
//   forward:  read N*C*s + 8N (target); write 4N (margin, 8N for double) + 8N (runner-up)
//   backward: read 8N (target) + 8N (runner-up) + 4N (grad_margin); write N*C*s
//   the floor is the logits read (forward) and the gradient write (backward): N*C*s each.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fastmargin/cuda_utils.cuh"
#include "fastmargin/margin.h"
#include "fastmargin/margin_math.h"

namespace fastmargin {

template <typename acc_t>
__device__ __forceinline__ RunnerUp<acc_t> shfl_xor(const RunnerUp<acc_t>& s, int mask) {
  return {
      __shfl_xor_sync(0xffffffffu, s.value, mask),
      static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(s.index), mask))};
}

namespace {

template <typename scalar_t, typename acc_t>
struct MarginForwardParams {
  const scalar_t* logits;
  int64_t N, C, stride;
  const int64_t* target;
  acc_t* margin;
  int64_t* runner_up;
};

template <typename scalar_t, typename acc_t>
struct MarginBackwardParams {
  scalar_t* grad;
  int64_t N, C;
  const int64_t* target;
  const int64_t* runner_up;
  const acc_t* grad_margin;
};

template <typename scalar_t, typename acc_t, int VEC, int GROUP>
__global__ void __launch_bounds__(row_block_threads(GROUP))
    margin_forward_kernel(MarginForwardParams<scalar_t, acc_t> p) {
  __shared__ RunnerUp<acc_t> smem[row_block_threads(GROUP) / kWarp];
  const int64_t n = group_item<GROUP>();
  const int t = group_rank<GROUP>();
  if (n >= p.N) return;  // uniform per group (see group_item)

  const int64_t y = p.target[n];
  if (!valid_class(y, p.C)) {
    if (t == 0) {
      p.margin[n] = quiet_nan<acc_t>();
      p.runner_up[n] = -1;
    }
    return;
  }
  const scalar_t* row = p.logits + n * p.stride;
  const auto* vrow = reinterpret_cast<const Vec<scalar_t, VEC>*>(row);
  const int64_t nvec = p.C / VEC;
  // Each thread visits its classes in ascending order, as RunnerUp::add requires.
  RunnerUp<acc_t> best = RunnerUp<acc_t>::empty();
#pragma unroll 4
  for (int64_t i = t; i < nvec; i += GROUP) {
    const Vec<scalar_t, VEC> v = vrow[i];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int64_t c = i * VEC + e;
      if (c != y) best.add(static_cast<acc_t>(v.v[e]), c);
    }
  }
  for (int64_t c = nvec * VEC + t; c < p.C; c += GROUP) {
    if (c != y) best.add(static_cast<acc_t>(row[c]), c);
  }
  best = group_reduce<GROUP>(best, smem, RunnerUp<acc_t>::empty());
  if (t == 0) {
    p.margin[n] = static_cast<acc_t>(row[y]) - best.value;
    p.runner_up[n] = best.index;
  }
}

template <typename scalar_t, typename acc_t, int VEC, int GROUP>
__global__ void __launch_bounds__(row_block_threads(GROUP))
    margin_backward_kernel(MarginBackwardParams<scalar_t, acc_t> p) {
  const int64_t n = group_item<GROUP>();
  const int t = group_rank<GROUP>();
  if (n >= p.N) return;
  const int64_t y = p.target[n];
  // Invalid target: the forward gave NaN, so does the gradient (y, r = -1 then match no class).
  const bool valid = valid_class(y, p.C);
  const int64_t r = valid ? p.runner_up[n] : int64_t(-1);
  const acc_t g = p.grad_margin[n];
  const scalar_t fill = static_cast<scalar_t>(valid ? acc_t(0) : quiet_nan<acc_t>());
  scalar_t* out = p.grad + n * p.C;
  auto* vout = reinterpret_cast<Vec<scalar_t, VEC>*>(out);
  const int64_t nvec = p.C / VEC;
#pragma unroll 4
  for (int64_t i = t; i < nvec; i += GROUP) {
    Vec<scalar_t, VEC> v;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int64_t c = i * VEC + e;
      v.v[e] = (c == y || c == r) ? static_cast<scalar_t>(margin_grad(c, y, r, g)) : fill;
    }
    vout[i] = v;
  }
  for (int64_t c = nvec * VEC + t; c < p.C; c += GROUP) {
    out[c] = (c == y || c == r) ? static_cast<scalar_t>(margin_grad(c, y, r, g)) : fill;
  }
}

template <typename scalar_t, typename acc_t, int VEC, int GROUP>
struct MarginForwardLauncher {
  static void run(const MarginForwardParams<scalar_t, acc_t>& p) {
    launch_groups<GROUP>(margin_forward_kernel<scalar_t, acc_t, VEC, GROUP>, p.N, p);
  }
};

template <typename scalar_t, typename acc_t, int VEC, int GROUP>
struct MarginBackwardLauncher {
  static void run(const MarginBackwardParams<scalar_t, acc_t>& p) {
    launch_groups<GROUP>(margin_backward_kernel<scalar_t, acc_t, VEC, GROUP>, p.N, p);
  }
};

std::tuple<at::Tensor, at::Tensor> multiclass_margin_fwd_cuda(const at::Tensor& logits,
                                                              const at::Tensor& target) {
  check_margin_inputs(logits, target);
  c10::cuda::CUDAGuard guard(logits.device());
  // std::tie, not a structured binding: the lambda below captures both, which C++17
  // (torch 2.11 builds) does not allow for structured bindings.
  at::Tensor margin, runner_up;
  std::tie(margin, runner_up) = allocate_margin_outputs(logits);
  if (logits.size(0) == 0) return {margin, runner_up};
  const at::Tensor tgt = target.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "multiclass_margin_fwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        MarginForwardParams<scalar_t, acc_t> p{logits.const_data_ptr<scalar_t>(),
                                               logits.size(0),
                                               logits.size(1),
                                               logits.stride(0),
                                               tgt.const_data_ptr<int64_t>(),
                                               margin.mutable_data_ptr<acc_t>(),
                                               runner_up.mutable_data_ptr<int64_t>()};
        const bool aligned =
            aligned_for(p.logits, p.stride, p.stride, max_vec<scalar_t>(), sizeof(scalar_t));
        launch_row_kernel<scalar_t, MarginForwardLauncher>(aligned, p.C, p);
      });
  return {margin, runner_up};
}

at::Tensor multiclass_margin_bwd_cuda(const at::Tensor& grad_margin, const at::Tensor& target,
                                      const at::Tensor& runner_up, int64_t num_classes,
                                      at::ScalarType dtype) {
  check_margin_backward(grad_margin, target, runner_up, num_classes, dtype);
  c10::cuda::CUDAGuard guard(grad_margin.device());
  at::Tensor grad =
      at::empty({grad_margin.size(0), num_classes}, grad_margin.options().dtype(dtype));
  if (grad.numel() == 0) return grad;
  const at::Tensor g = grad_margin.contiguous(), tgt = target.contiguous(),
                   ru = runner_up.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "multiclass_margin_bwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        MarginBackwardParams<scalar_t, acc_t> p{grad.mutable_data_ptr<scalar_t>(),
                                                grad.size(0),
                                                num_classes,
                                                tgt.const_data_ptr<int64_t>(),
                                                ru.const_data_ptr<int64_t>(),
                                                g.const_data_ptr<acc_t>()};
        const bool aligned = aligned_for(p.grad, p.C, p.C, max_vec<scalar_t>(), sizeof(scalar_t));
        launch_row_kernel<scalar_t, MarginBackwardLauncher>(aligned, p.C, p);
      });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(FASTMARGIN_OPS_NS, FASTMARGIN_CUDA_KEY, m) {
  m.impl("multiclass_margin_fwd", &multiclass_margin_fwd_cuda);
  m.impl("multiclass_margin_bwd", &multiclass_margin_bwd_cuda);
}

}  // namespace fastmargin
