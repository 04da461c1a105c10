// CUDA kernels of the weight-noise worst-of-k cross-entropy: copy j of row n is the noisy row
// z_n + s_n xi_nj with xi drawn in-kernel (Philox4x32-10, csrc/include/fastmargin/philox.h);
// the k copies exist only in registers.
//
// Forward: one group of threads per row (a warp when C <= 2048, a 512-thread block otherwise)
// walks the row once with 16-byte vector loads, in tiles of max(VEC, 4) classes (a tile is a
// whole number of Philox blocks of 4 normals). For every tile each thread generates the noise of
// up to kCopyChunk = 8 copies and feeds z + s xi_j into 8 online (max, sum-exp, sum) RowStats
// held in registers, so for k <= 8 the logits are read exactly once for all k copies. For
// k > 8 the row is swept ceil(k / 8) times, 8 copies per sweep (the chosen trade-off: k
// register sets would spill; the re-reads of one row come mostly from L1/L2, and k > 8 is rare
// for MaxUp). The partials are merged per copy with warp shuffles (+ shared memory across warps)
// and the group leader reduces the k per-copy CEs to the worst (or smooth max) with the shared
// CopyReducer. It saves only lse (N, k) and the copy weights dL/dl (N, k): no N*k*C tensor.
//
// Backward: one group per row regenerates xi for the copies with non-zero weight only (tau = 0:
// the worst copy alone), writes grad_logits_c = sum_j w_j g ce_grad(z_c + s xi_jc) (the copies
// summed in fp32, the target's -(1 - eps) applied before rounding) and, as a by-product of the
// same pass, dL/ds = sum_j sum_c w_j g dCE_j/dz~_c xi_jc (one group sum per row). Computing the
// scale gradient here, not in the forward, keeps the forward's registers for the k copies and
// costs only the reduction, since the backward has every term and its noise at hand anyway.
//
// Byte model (s = bytes per logit; N rows of C classes; k copies):
//   forward:  read N*C*s (k <= 8) + write O(N*k) statistics
//   backward: read N*C*s, write N*C*s (+ O(N*k))
//   forward + backward floor: 3*N*C*s, independent of k (e.g. 32768 x 32000 bf16: 6.3 GB,
//   about 2.1 ms at 3 TB/s).
// Arithmetic: every logit of every copy needs a normal: one Philox4x32-10 call (~80 integer
// instructions) and two Box-Muller pairs (log, sqrt, sincos) per 4 normals, ~50 instructions per
// normal with the online softmax, so the forward does N*k*C*~50 instructions (tau = 0 backward:
// N*C*~50). At 32768 x 32000, k = 4 that is ~2e11 (~7 ms on an H100 at ~33 T lane-instr/s):
// the forward is bound by RNG arithmetic, not bytes; measure against both numbers. The eager
// baseline materialises randn (N, k, C), the scaled noise, the noisy copies and the
// log-softmax: about 7 * N*k*C*s bytes forward and 5 * N*k*C*s backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "fastmargin/ce_math.h"
#include "fastmargin/cuda_utils.cuh"
#include "fastmargin/philox.h"
#include "fastmargin/weight_noise_ce.h"

namespace fastmargin {
namespace {

constexpr int kCopyChunk = 8;  // copies whose statistics one sweep keeps in registers

// Classes per tile: whole Philox blocks (4 normals) and whole vectors.
constexpr int tile_of(int vec) { return vec > 4 ? vec : 4; }

template <typename scalar_t, typename acc_t>
struct ForwardParams {
  const scalar_t* logits;
  int64_t N, k, C, stride_n;
  const int64_t* target;
  const acc_t* scale;
  const int64_t* philox;  // [seed, offset], read on the device (no host sync, graph-safe)
  acc_t tau, eps;
  int64_t ignore_index;
  acc_t *loss, *lse, *weight;
  int64_t* index;
};

template <typename scalar_t, typename acc_t>
struct BackwardParams {
  const scalar_t* logits;
  scalar_t* grad;
  int64_t N, k, C, stride_n, grad_stride_n;
  const int64_t* target;
  const acc_t* scale;
  const int64_t* philox;
  const acc_t *grad_loss, *lse, *weight;
  acc_t eps;
  acc_t* grad_scale;
};

__device__ __forceinline__ NoiseKey load_key(const int64_t* philox) {
  return {static_cast<uint64_t>(philox[0]), static_cast<uint64_t>(philox[1])};
}

// The TILE logits of tile i of a row, as acc_t (TILE / VEC vector loads).
template <typename scalar_t, typename acc_t, int VEC, int TILE>
__device__ __forceinline__ void load_tile(const scalar_t* row, int64_t i, acc_t (&z)[TILE]) {
  const auto* v = reinterpret_cast<const Vec<scalar_t, VEC>*>(row + i * TILE);
#pragma unroll
  for (int q = 0; q < TILE / VEC; ++q) {
    const Vec<scalar_t, VEC> x = v[q];
#pragma unroll
    for (int e = 0; e < VEC; ++e) z[q * VEC + e] = acc_t(x.v[e]);
  }
}

// The noise of tile i (classes i*TILE ..) of (row n, copy j): TILE / 4 Philox blocks.
template <int TILE>
__device__ __forceinline__ void tile_noise(const NoiseKey& key, int64_t n, int64_t j, int64_t i,
                                           float (&xi)[TILE]) {
#pragma unroll
  for (int q = 0; q < TILE / 4; ++q) {
    float b[4];
    key.block(n, j, i * (TILE / 4) + q, b);
#pragma unroll
    for (int e = 0; e < 4; ++e) xi[4 * q + e] = b[e];
  }
}

// minBlocks = 1 lets ptxas use ~100 registers for the 8 copies' statistics and the Philox state:
// without it, ptxas sm_90 capped the float kernels at 64-80 registers and spilled (checked with
// -Xptxas -v); with it there are no spills and no stack frame. Occupancy vs spills is a
// tuning knob for the benchmark.
template <typename scalar_t, typename acc_t, int VEC, int GROUP>
__global__ void __launch_bounds__(row_block_threads(GROUP), 1)
    weight_noise_ce_forward_kernel(ForwardParams<scalar_t, acc_t> p) {
  constexpr int TILE = tile_of(VEC);
  __shared__ RowStats<acc_t> smem[row_block_threads(GROUP) / kWarp];
  const int64_t n = group_item<GROUP>();
  const int t = group_rank<GROUP>();
  if (n >= p.N) return;  // uniform per group (see group_item)

  const int64_t y = p.target[n];
  const TargetKind kind = classify_target(y, p.ignore_index, p.C);
  acc_t* lse_n = p.lse + n * p.k;
  acc_t* w_n = p.weight + n * p.k;
  if (kind != TargetKind::kClass) {
    // Ignored: contributes 0 with zero gradient. Invalid: NaN row, logits never read.
    const acc_t fill = kind == TargetKind::kIgnored ? acc_t(0) : quiet_nan<acc_t>();
    for (int64_t j = t; j < p.k; j += GROUP) lse_n[j] = w_n[j] = fill;
    if (t == 0) {
      p.loss[n] = fill;
      p.index[n] = 0;
    }
    return;
  }

  const NoiseKey key = load_key(p.philox);
  const acc_t s = p.scale[n];
  const bool want_sum = p.eps != acc_t(0);
  const scalar_t* row = p.logits + n * p.stride_n;
  const int64_t ntiles = p.C / TILE;
  CopyReducer<acc_t> red = CopyReducer<acc_t>::start();  // meaningful in the leader only
  for (int64_t j0 = 0; j0 < p.k; j0 += kCopyChunk) {
    const int nk = static_cast<int>(p.k - j0 < kCopyChunk ? p.k - j0 : kCopyChunk);
    RowStats<acc_t> st[kCopyChunk];
#pragma unroll
    for (int jj = 0; jj < kCopyChunk; ++jj) st[jj] = RowStats<acc_t>::empty();

    for (int64_t i = t; i < ntiles; i += GROUP) {
      acc_t z[TILE];
      load_tile<scalar_t, acc_t, VEC, TILE>(row, i, z);
#pragma unroll
      for (int jj = 0; jj < kCopyChunk; ++jj) {
        if (jj < nk) {
          float xi[TILE];
          tile_noise<TILE>(key, n, j0 + jj, i, xi);
          acc_t x[TILE];
#pragma unroll
          for (int e = 0; e < TILE; ++e) x[e] = z[e] + s * acc_t(xi[e]);
          st[jj].add(x, want_sum);
        }
      }
    }
    // Tail: the last C mod TILE classes, one Philox block (4 classes) per thread.
    for (int64_t g = ntiles * (TILE / 4) + t; 4 * g < p.C; g += GROUP) {
#pragma unroll
      for (int jj = 0; jj < kCopyChunk; ++jj) {
        if (jj < nk) {
          float b[4];
          key.block(n, j0 + jj, g, b);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (4 * g + e < p.C) st[jj].add(acc_t(row[4 * g + e]) + s * acc_t(b[e]), want_sum);
          }
        }
      }
    }

#pragma unroll
    for (int jj = 0; jj < kCopyChunk; ++jj) {
      if (jj < nk) st[jj] = group_merge<GROUP>(st[jj], smem);
    }
    if (t == 0) {
      // Unrolled with a guard (not `jj < nk`) so st[] stays in registers.
#pragma unroll
      for (int jj = 0; jj < kCopyChunk; ++jj) {
        if (jj >= nk) break;
        const int64_t j = j0 + jj;
        const acc_t row_lse = st[jj].lse();
        const acc_t zy = acc_t(row[y]) + s * acc_t(key.at(n, j, y));
        // The per-copy loss waits in the weight buffer until all k copies are known.
        const acc_t ce = ce_from_stats(row_lse, zy, st[jj].sumz, p.eps, p.C);
        lse_n[j] = row_lse;
        w_n[j] = ce;
        red.add(j, ce, p.tau);
      }
    }
  }
  if (t != 0) return;
  p.loss[n] = red.loss(p.k, p.tau);
  p.index[n] = red.best_index;
  for (int64_t j = 0; j < p.k; ++j) w_n[j] = red.weight(j, w_n[j], p.tau);
}

template <typename scalar_t, typename acc_t, int VEC, int GROUP>
__global__ void __launch_bounds__(row_block_threads(GROUP))
    weight_noise_ce_backward_kernel(BackwardParams<scalar_t, acc_t> p) {
  constexpr int TILE = tile_of(VEC);
  __shared__ SumStat<acc_t> smem[row_block_threads(GROUP) / kWarp];
  const int64_t n = group_item<GROUP>();
  const int t = group_rank<GROUP>();
  if (n >= p.N) return;  // uniform per group

  // Copies with non-zero weight lie in [j_lo, j_hi] (tau = 0: one copy; ignored: none, and
  // then the logits are not read). NaN weights (invalid target) count as non-zero: NaN row.
  const acc_t* w_n = p.weight + n * p.k;
  const acc_t* lse_n = p.lse + n * p.k;
  int64_t j_lo = p.k, j_hi = -1;
  for (int64_t j = 0; j < p.k; ++j) {
    if (w_n[j] != acc_t(0)) {
      j_lo = j_lo < j ? j_lo : j;
      j_hi = j;
    }
  }
  const bool any = j_hi >= 0;
  const int64_t y = p.target[n];  // may be invalid (weights NaN): then c == y never holds
  const acc_t s = p.scale[n], g = p.grad_loss[n];
  const acc_t eps_over_c = p.eps / acc_t(p.C);
  const NoiseKey key = load_key(p.philox);
  const scalar_t* row = p.logits + n * p.stride_n;
  scalar_t* out = p.grad + n * p.grad_stride_n;
  const int64_t ntiles = p.C / TILE;
  acc_t ds = acc_t(0);

  for (int64_t i = t; i < ntiles; i += GROUP) {
    acc_t z[TILE], acc[TILE];
#pragma unroll
    for (int e = 0; e < TILE; ++e) acc[e] = z[e] = acc_t(0);
    if (any) load_tile<scalar_t, acc_t, VEC, TILE>(row, i, z);
    for (int64_t j = j_lo; j <= j_hi; ++j) {
      const acc_t w = w_n[j];
      if (w == acc_t(0)) continue;
      float xi[TILE];
      tile_noise<TILE>(key, n, j, i, xi);
      const acc_t wg = w * g, row_lse = lse_n[j];
#pragma unroll
      for (int e = 0; e < TILE; ++e) {
        const bool is_y = i * TILE + e == y;
        const acc_t term = ce_grad(z[e] + s * acc_t(xi[e]), is_y, row_lse, p.eps, eps_over_c, wg);
        acc[e] += term;
        ds += term * acc_t(xi[e]);
      }
    }
    auto* vout = reinterpret_cast<Vec<scalar_t, VEC>*>(out + i * TILE);
#pragma unroll
    for (int q = 0; q < TILE / VEC; ++q) {
      Vec<scalar_t, VEC> v;
#pragma unroll
      for (int e = 0; e < VEC; ++e) v.v[e] = static_cast<scalar_t>(acc[q * VEC + e]);
      vout[q] = v;
    }
  }
  for (int64_t gi = ntiles * (TILE / 4) + t; 4 * gi < p.C; gi += GROUP) {
    acc_t acc[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t j = j_lo; j <= j_hi; ++j) {
      const acc_t w = w_n[j];
      if (w == acc_t(0)) continue;
      float b[4];
      key.block(n, j, gi, b);
      const acc_t wg = w * g, row_lse = lse_n[j];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t c = 4 * gi + e;
        if (c >= p.C) break;
        const acc_t term =
            ce_grad(acc_t(row[c]) + s * acc_t(b[e]), c == y, row_lse, p.eps, eps_over_c, wg);
        acc[e] += term;
        ds += term * acc_t(b[e]);
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (4 * gi + e < p.C) out[4 * gi + e] = static_cast<scalar_t>(acc[e]);
    }
  }
  ds = group_sum<GROUP>(ds, smem);
  if (t == 0) p.grad_scale[n] = ds;
}

// One thread per (row, copy, Philox block): the exact noise the loss kernels draw.
__global__ void weight_noise_normal_kernel(const int64_t* philox, float* out, int64_t k, int64_t C,
                                           int64_t groups, int64_t total) {
  const NoiseKey key = load_key(philox);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / groups, g = idx % groups;
    float b[4];
    key.block(r / k, r % k, g, b);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (4 * g + e < C) out[r * C + 4 * g + e] = b[e];
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC, int GROUP>
struct ForwardLauncher {
  static void run(const ForwardParams<scalar_t, acc_t>& p) {
    launch_groups<GROUP>(weight_noise_ce_forward_kernel<scalar_t, acc_t, VEC, GROUP>, p.N, p);
  }
};

template <typename scalar_t, typename acc_t, int VEC, int GROUP>
struct BackwardLauncher {
  static void run(const BackwardParams<scalar_t, acc_t>& p) {
    launch_groups<GROUP>(weight_noise_ce_backward_kernel<scalar_t, acc_t, VEC, GROUP>, p.N, p);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> weight_noise_ce_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& scale,
    const at::Tensor& philox, int64_t k, double temperature, double label_smoothing,
    int64_t ignore_index) {
  check_weight_noise_inputs(logits, target, scale, philox, k);
  c10::cuda::CUDAGuard guard(logits.device());
  WeightNoiseForward out = WeightNoiseForward::allocate(logits, k);
  if (logits.size(0) == 0) return out.as_tuple();
  const at::Tensor tgt = target.contiguous(), sc = scale.contiguous(), ph = philox.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "weight_noise_ce_fwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        ForwardParams<scalar_t, acc_t> p{logits.const_data_ptr<scalar_t>(),
                                         logits.size(0),
                                         k,
                                         logits.size(1),
                                         logits.stride(0),
                                         tgt.const_data_ptr<int64_t>(),
                                         sc.const_data_ptr<acc_t>(),
                                         ph.const_data_ptr<int64_t>(),
                                         static_cast<acc_t>(temperature),
                                         static_cast<acc_t>(label_smoothing),
                                         ignore_index,
                                         out.loss.mutable_data_ptr<acc_t>(),
                                         out.lse.mutable_data_ptr<acc_t>(),
                                         out.weight.mutable_data_ptr<acc_t>(),
                                         out.index.mutable_data_ptr<int64_t>()};
        const bool aligned =
            aligned_for(p.logits, p.stride_n, p.stride_n, max_vec<scalar_t>(), sizeof(scalar_t));
        launch_row_kernel<scalar_t, ForwardLauncher>(aligned, p.C, p);
      });
  return out.as_tuple();
}

std::tuple<at::Tensor, at::Tensor> weight_noise_ce_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const at::Tensor& scale, const at::Tensor& philox, const at::Tensor& lse,
    const at::Tensor& weight, double label_smoothing, int64_t ignore_index) {
  check_weight_noise_backward(grad_loss, logits, target, scale, philox, lse, weight);
  (void)ignore_index;  // ignored samples arrive with weight 0
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty_like(logits);
  at::Tensor grad_scale = at::empty({logits.size(0)}, scale.options());
  if (logits.size(0) == 0) return {grad, grad_scale};
  const at::Tensor g = grad_loss.contiguous(), tgt = target.contiguous(), sc = scale.contiguous(),
                   ph = philox.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "weight_noise_ce_bwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        BackwardParams<scalar_t, acc_t> p{logits.const_data_ptr<scalar_t>(),
                                          grad.mutable_data_ptr<scalar_t>(),
                                          logits.size(0),
                                          lse.size(1),
                                          logits.size(1),
                                          logits.stride(0),
                                          grad.stride(0),
                                          tgt.const_data_ptr<int64_t>(),
                                          sc.const_data_ptr<acc_t>(),
                                          ph.const_data_ptr<int64_t>(),
                                          g.const_data_ptr<acc_t>(),
                                          lse.const_data_ptr<acc_t>(),
                                          weight.const_data_ptr<acc_t>(),
                                          static_cast<acc_t>(label_smoothing),
                                          grad_scale.mutable_data_ptr<acc_t>()};
        constexpr int kVec = max_vec<scalar_t>();
        const bool aligned =
            aligned_for(p.logits, p.stride_n, p.stride_n, kVec, sizeof(scalar_t)) &&
            aligned_for(p.grad, p.grad_stride_n, p.grad_stride_n, kVec, sizeof(scalar_t));
        launch_row_kernel<scalar_t, BackwardLauncher>(aligned, p.C, p);
      });
  return {grad, grad_scale};
}

at::Tensor weight_noise_normal_cuda(const at::Tensor& philox, int64_t n, int64_t k, int64_t c) {
  check_philox_state(philox, philox.device());
  check_noise_shape(n, k, c);
  c10::cuda::CUDAGuard guard(philox.device());
  at::Tensor out = at::empty({n, k, c}, philox.options().dtype(at::kFloat));
  const int64_t groups = (c + 3) / 4, total = n * k * groups;
  if (total == 0) return out;
  const at::Tensor ph = philox.contiguous();
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65536);
  FM_KERNEL_LAUNCH(weight_noise_normal_kernel, blocks, kThreads, c10::cuda::getCurrentCUDAStream(),
                   ph.const_data_ptr<int64_t>(), out.mutable_data_ptr<float>(), k, c, groups,
                   total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(FASTMARGIN_OPS_NS, FASTMARGIN_CUDA_KEY, m) {
  m.impl("weight_noise_ce_fwd", &weight_noise_ce_fwd_cuda);
  m.impl("weight_noise_ce_bwd", &weight_noise_ce_bwd_cuda);
  m.impl("weight_noise_normal", &weight_noise_normal_cuda);
}

}  // namespace fastmargin
