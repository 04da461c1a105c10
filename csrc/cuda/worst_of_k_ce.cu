// CUDA kernels of the worst-of-k cross-entropy family.
//
// Forward: one group of threads per sample (a thread when C <= 32, a warp up to C = 2048, the
// whole block above) walks the sample's k rows once each with an online (max, sum-exp) softmax over
// 16-byte vector loads, merges the per-thread partials with warp shuffles (+ shared memory across
// warps), and the group leader reduces the k per-copy losses to the worst (or smooth max) in
// registers: one launch, no host synchronisation, int64 offsets. It saves only per-row statistics:
// lse (B, k), the copy weights dL/dl (B, k), the worst index (B,) and dL/dr (B,).
//
// Backward: one group per row writes the gradient of every row; rows whose copy weight is 0
// (unselected copies with tau = 0, ignored samples) are written as zeros without reading logits.
// The target's -(1 - eps) is applied in fp32 before rounding to the logits dtype.
//
// Both target paths run the same two kernels, templated on WEIGHTED: the plain path (index
// target, no class weights; WEIGHTED = false) keeps the plain CE arithmetic of ce_math.h, the
// weighted path (class weights and/or probability targets) the a_c form of ce_weighted_math.h.
//
// Byte model (s = bytes per logit, N = B*k rows of C):
//   forward:  read N*C*s                     (+ O(N) statistics)
//   backward: read B*C*s (tau = 0: only the selected rows) or N*C*s (tau > 0), write N*C*s
//   forward+backward floor, tau = 0: (N + B + N)*C*s; the "two-pass" model of docs/design.md counts
//   2*N*C*s (one read of the logits, one write of the gradient) plus the backward's re-read.
//
// Weighted path (class weights and/or probability targets, t = bytes per target element,
// R = rows of target: B when the copies share a (B, C) target, N when there is one per copy):
//   class weights alone add nothing to the model: the (C,) vector stays in L1/L2 (and an index
//   target without smoothing reads only w_y).
//   forward:  read N*C*s + R*C*t             (the target row is read in the same sweep as the
//             logits, with the same vector width; a shared row is re-read by the k copies of
//             its sample from cache, so it counts once)
//   backward: as above, plus the target row of every row it computes (weight != 0: B rows for
//             tau = 0, N for tau > 0; a shared row counts once per sample): B*C*t for tau = 0
//             (either target layout), R*C*t for tau > 0. The row is swept twice, once for
//             A = sum_c a_c (a pre-pass over the target and the weights only) and once in the
//             gradient sweep; the model assumes the second sweep hits L2 (one row per group in
//             flight; not yet measured) and does not count it.
//   forward+backward floor, tau = 0: (N + B + N)*C*s + (R + B)*C*t, e.g. bf16 logits with a
//   bf16 target shared by k = 4 copies: 9 + 2 = 11 units of B*C*2 bytes instead of 9.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "fastmargin/ce_math.h"
#include "fastmargin/cuda_utils.cuh"
#include "fastmargin/cuda_weighted.cuh"
#include "fastmargin/worst_of_k_ce.h"

namespace fastmargin {
namespace {

// Parameter blocks. The plain path (index target, no class weights) keeps its own small
// forward and backward blocks, as before the two paths shared their kernels: a larger kernel
// parameter block changes nvcc's code generation (parameters addressed through a pointer, loops
// not unswitched), and the plain path is meant to compile as it did. The weighted path (class
// weights and/or probability targets) uses one block for both passes. Fields that both paths
// read have the same names.
template <typename scalar_t, typename acc_t>
struct PlainForwardParams {
  static constexpr bool kWeighted = false;
  const scalar_t* logits;
  int64_t B, k, C, stride_b;
  union {
    int64_t stride_k;
    int64_t positions;  // class-major rows: rows per sample (see row_start)
  };
  int64_t stride_c;  // 1, or class-major rows (a thread per row only: see class_stride)
  const int64_t* index;
  const acc_t* radius;  // nullptr: plain CE
  acc_t tau, eps;
  int64_t ignore_index;
  acc_t *loss, *lse, *weight, *dradius;
  int64_t* index_out;
};

template <typename scalar_t, typename acc_t>
struct PlainBackwardParams {
  static constexpr bool kWeighted = false;
  const scalar_t* logits;
  scalar_t* grad;
  int64_t B, k, C, stride_b;
  union {
    int64_t stride_k;
    int64_t positions;  // class-major rows: rows per sample (see row_start)
  };
  int64_t grad_stride_b, grad_stride_k;
  int64_t stride_c;  // of the logits and the gradient alike (the host checks they agree)
  const int64_t* index;
  const acc_t* radius;
  const acc_t *grad_loss, *lse_in, *weight_in;
  acc_t eps;
};

template <typename scalar_t, typename target_t, typename acc_t>
struct WeightedParams {
  static constexpr bool kWeighted = true;
  const scalar_t* logits;
  int64_t B, k, C, stride_b, stride_k;
  const int64_t* index;  // index targets, or nullptr
  const target_t* soft;  // probability targets (B, k, C) with copy stride 0 when shared
  int64_t target_stride_b, target_stride_k;
  const acc_t* radius;  // index targets only
  ClassCoef<acc_t> coef;
  int64_t ignore_index;
  // forward
  acc_t tau;
  acc_t *loss, *lse, *weight, *dradius;
  int64_t* index_out;
  // backward
  scalar_t* grad;
  int64_t grad_stride_b, grad_stride_k;
  const acc_t *grad_loss, *lse_in, *weight_in;
  bool need_asum;  // A must be summed over the row (soft targets or label smoothing)

  __device__ WeightedRow<scalar_t, target_t, acc_t> row(int64_t b, int64_t j, int64_t y,
                                                        acc_t r) const {
    const target_t* p = soft ? soft + b * target_stride_b + j * target_stride_k : nullptr;
    return {logits + b * stride_b + j * stride_k, p, y, r, coef};
  }
};

// The parameter blocks of a path (target_t: the soft target's dtype; unused by the plain path).
template <bool WEIGHTED, typename scalar_t, typename target_t, typename acc_t>
using ForwardParams = std::conditional_t<WEIGHTED, WeightedParams<scalar_t, target_t, acc_t>,
                                         PlainForwardParams<scalar_t, acc_t>>;
template <bool WEIGHTED, typename scalar_t, typename target_t, typename acc_t>
using BackwardParams = std::conditional_t<WEIGHTED, WeightedParams<scalar_t, target_t, acc_t>,
                                          PlainBackwardParams<scalar_t, acc_t>>;

// The statistics one group merges per copy: (max, sum-exp, sum z~) for the plain CE, (max,
// sum-exp, A, D) for the weighted one.
template <bool WEIGHTED, typename acc_t>
using CopyStats = std::conditional_t<WEIGHTED, WeightedRowStats<acc_t>, RowStats<acc_t>>;

// Where row b starts in the logits (or, their strides agreeing, the gradient): `dense`, the
// caller's offset from the row strides, except for class-major rows (the plain loss with a
// thread per row and a strided class dim: kernel_layout's kClassMajor). Those have one copy
// (k = 1), so the copy stride's field holds the rows per sample S instead (the parameter blocks
// keep their size: a larger block changed the register allocation of every kernel in ptxas's
// report) and stride_b the stride between samples: row b lies at (b / S) * stride_b + b % S,
// consecutive threads on consecutive positions of a sample. 3-D class-major rows (memory
// (C, B)) are one sample of S = B rows; 4-D spatial rows (N, S, 1, C) one per sample n.
template <bool WEIGHTED, int GROUP, typename P>
__device__ __forceinline__ int64_t row_start(const P& p, int64_t b, int64_t dense) {
  if constexpr (!WEIGHTED && GROUP == 1) {
    if (p.stride_c != 1) return (b / p.positions) * p.stride_b + b % p.positions;
  }
  return dense;
}

// The class stride a kernel reads with. Class-major rows (stride_c != 1) are launched with a
// thread per row only (kernel_layout's class limit is kRowThreadMaxClasses), so wider groups
// read with stride 1, known at compile time, and keep their vector loops unchanged.
template <int GROUP>
__device__ __forceinline__ int64_t class_stride(int64_t stride_c) {
  if constexpr (GROUP == 1) {
    return stride_c;
  } else {
    return 1;
  }
}

// This thread's partial statistics of one robust row z~ (class stride cs); `t` is its rank
// within the group.
template <typename scalar_t, typename acc_t, int VEC, int GROUP>
__device__ __forceinline__ RowStats<acc_t> thread_row_stats(const scalar_t* row, int64_t C,
                                                            int64_t cs, int64_t y, acc_t r,
                                                            bool want_sum, int t) {
  RowStats<acc_t> st = RowStats<acc_t>::empty();
  if (cs != 1) {  // class-major rows: scalar loads, coalesced across the threads of a warp
    for (int64_t c = t; c < C; c += GROUP) {
      st.add(robust_logit(acc_t(row[c * cs]), c == y, r), want_sum);
    }
    return st;
  }
  const int64_t nvec = C / VEC;
  const auto* vrow = reinterpret_cast<const Vec<scalar_t, VEC>*>(row);
#pragma unroll 4
  for (int64_t i = t; i < nvec; i += GROUP) {
    const Vec<scalar_t, VEC> v = vrow[i];
    acc_t x[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) x[e] = robust_logit(acc_t(v.v[e]), i * VEC + e == y, r);
    st.add(x, want_sum);
  }
  for (int64_t c = nvec * VEC + t; c < C; c += GROUP) {
    st.add(robust_logit(acc_t(row[c]), c == y, r), want_sum);
  }
  return st;
}

// ---- Weighted path: class weights and/or probability (soft) targets --------------------
// The per-class coefficients a_c (ce_weighted_math.h) are formed in registers from the class
// weights (a (C,) vector, cache-resident) and, for soft targets, the target row, read with the
// same 16-byte vector loads in the same sweep.

// Robust logits x and coefficients a of vector i (elements i*VEC .. i*VEC+VEC-1) of a row.
template <int VEC, typename scalar_t, typename target_t, typename acc_t>
__device__ __forceinline__ void load_weighted_vec(const WeightedRow<scalar_t, target_t, acc_t>& row,
                                                  int64_t i, acc_t (&x)[VEC], acc_t (&a)[VEC]) {
  const Vec<scalar_t, VEC> v = reinterpret_cast<const Vec<scalar_t, VEC>*>(row.z)[i];
  acc_t p[VEC];
  if (row.p) {
    const Vec<target_t, VEC> tv = reinterpret_cast<const Vec<target_t, VEC>*>(row.p)[i];
#pragma unroll
    for (int e = 0; e < VEC; ++e) p[e] = static_cast<acc_t>(tv.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) p[e] = i * VEC + e == row.y ? acc_t(1) : acc_t(0);
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const int64_t c = i * VEC + e;
    x[e] = robust_logit(static_cast<acc_t>(v.v[e]), c == row.y, row.r);
    a[e] = row.coef(p[e], c);
  }
}

template <typename scalar_t, typename target_t, typename acc_t, int VEC, int GROUP>
__device__ __forceinline__ WeightedRowStats<acc_t> thread_weighted_stats(
    const WeightedRow<scalar_t, target_t, acc_t>& row, int64_t C, int t) {
  WeightedRowStats<acc_t> st = WeightedRowStats<acc_t>::empty();
  const int64_t nvec = C / VEC;
#pragma unroll 4
  for (int64_t i = t; i < nvec; i += GROUP) {
    acc_t x[VEC], a[VEC];
    load_weighted_vec<VEC>(row, i, x, a);
    st.add(x, a);
  }
  for (int64_t c = nvec * VEC + t; c < C; c += GROUP) st.add(row.logit(c), row.a(c));
  return st;
}

// Forward: one group per sample walks its k rows; the leader reduces the k per-copy losses.
template <bool WEIGHTED, typename scalar_t, typename target_t, typename acc_t, int VEC, int GROUP>
__global__ void __launch_bounds__(row_block_threads(GROUP))
    worst_of_k_ce_forward_kernel(ForwardParams<WEIGHTED, scalar_t, target_t, acc_t> p) {
  using Stats = CopyStats<WEIGHTED, acc_t>;
  __shared__ Stats smem[row_block_threads(GROUP) / kWarp];
  const int64_t b = group_item<GROUP>();
  const int t = group_rank<GROUP>();
  if (b >= p.B) return;  // uniform per group (see group_item)

  acc_t* lse_b = p.lse + b * p.k;
  acc_t* w_b = p.weight + b * p.k;
  int64_t y = -1;  // soft targets: no class is "the target"
  if (!WEIGHTED || p.index) {
    y = p.index[b];
    const TargetKind kind = classify_target(y, p.ignore_index, p.C);
    if (kind != TargetKind::kClass) {
      // Ignored: contributes 0 with zero gradient. Invalid: NaN row, logits never read.
      const acc_t fill = kind == TargetKind::kIgnored ? acc_t(0) : quiet_nan<acc_t>();
      for (int64_t j = t; j < p.k; j += GROUP) lse_b[j] = w_b[j] = fill;
      if (t == 0) {
        p.loss[b] = fill;
        p.index_out[b] = 0;
        if (p.dradius) p.dradius[b] = fill;
      }
      return;
    }
  }

  const acc_t r = p.radius ? p.radius[b] : acc_t(0);
  [[maybe_unused]] bool want_sum = false;  // plain path: sum z~ only feeds the smoothing term
  int64_t cs = 1;                          // the weighted path reads contiguous rows only
  if constexpr (!WEIGHTED) {
    want_sum = p.eps != acc_t(0);
    cs = class_stride<GROUP>(p.stride_c);
  }
  const scalar_t* sample = p.logits + row_start<WEIGHTED, GROUP>(p, b, b * p.stride_b);
  CopyReducer<acc_t> red = CopyReducer<acc_t>::start();  // meaningful in the leader only
  [[maybe_unused]] acc_t asum = acc_t(0);  // weighted: A of an index-target row (every copy)
  for (int64_t j = 0; j < p.k; ++j) {
    [[maybe_unused]] const scalar_t* row = sample + j * p.stride_k;
    Stats st;
    if constexpr (WEIGHTED) {
      st = thread_weighted_stats<scalar_t, target_t, acc_t, VEC, GROUP>(p.row(b, j, y, r), p.C, t);
    } else {
      st = thread_row_stats<scalar_t, acc_t, VEC, GROUP>(row, p.C, cs, y, r, want_sum, t);
    }
    st = group_reduce<GROUP>(st, smem, Stats::empty());
    if (t == 0) {
      const acc_t row_lse = st.lse();
      acc_t ce;
      if constexpr (WEIGHTED) {
        ce = st.loss();
        asum = st.asum;
      } else {
        ce = ce_from_stats(row_lse, robust_logit(acc_t(row[y * cs]), true, r), st.sumz, p.eps, p.C);
      }
      // The per-copy loss waits in the weight buffer until all k copies are known.
      lse_b[j] = row_lse;
      w_b[j] = ce;
      red.add(j, ce, p.tau);
    }
  }
  if (t != 0) return;
  p.loss[b] = red.loss(p.k, p.tau);
  p.index_out[b] = red.best_index;
  acc_t dr = acc_t(0);
  for (int64_t j = 0; j < p.k; ++j) {
    const acc_t w = red.weight(j, w_b[j], p.tau);
    w_b[j] = w;
    if (p.dradius && w != acc_t(0)) {
      const acc_t zy = robust_logit(acc_t(sample[j * p.stride_k + y * cs]), true, r);
      if constexpr (WEIGHTED) {
        dr += w * weighted_dce_dradius(lse_b[j], zy, p.coef(acc_t(1), y), asum);
      } else {
        dr += w * dce_dradius(lse_b[j], zy, p.eps, p.C);
      }
    }
  }
  if (p.dradius) p.dradius[b] = dr;
}

// This thread's share of writing `value` into every element of a row (class stride cs).
template <typename scalar_t, int VEC, int GROUP>
__device__ __forceinline__ void fill_row(scalar_t* out, int64_t C, int64_t cs, scalar_t value,
                                         int t) {
  if (cs != 1) {
    for (int64_t c = t; c < C; c += GROUP) out[c * cs] = value;
    return;
  }
  Vec<scalar_t, VEC> fill;
#pragma unroll
  for (int e = 0; e < VEC; ++e) fill.v[e] = value;
  auto* vout = reinterpret_cast<Vec<scalar_t, VEC>*>(out);
  const int64_t nvec = C / VEC;
  for (int64_t i = t; i < nvec; i += GROUP) vout[i] = fill;
  for (int64_t c = nvec * VEC + t; c < C; c += GROUP) out[c] = value;
}

// Backward: one group per row writes the gradient of every row.
template <bool WEIGHTED, typename scalar_t, typename target_t, typename acc_t, int VEC, int GROUP>
__global__ void __launch_bounds__(row_block_threads(GROUP))
    worst_of_k_ce_backward_kernel(BackwardParams<WEIGHTED, scalar_t, target_t, acc_t> p) {
  const int64_t row_id = group_item<GROUP>();
  const int t = group_rank<GROUP>();
  if (row_id >= p.B * p.k) return;
  const int64_t b = row_id / p.k, j = row_id % p.k;
  scalar_t* out =
      p.grad + row_start<WEIGHTED, GROUP>(p, b, b * p.grad_stride_b + j * p.grad_stride_k);
  int64_t cs = 1;  // the weighted path reads contiguous rows only
  if constexpr (!WEIGHTED) cs = class_stride<GROUP>(p.stride_c);
  const acc_t w = p.weight_in[row_id];
  if (w == acc_t(0)) {  // unselected copy or ignored sample: zeros, logits not read
    fill_row<scalar_t, VEC, GROUP>(out, p.C, cs, scalar_t(0), t);
    return;
  }

  // Plain path: the index may be invalid (weight NaN): then c == y never holds and the NaN
  // weight makes the row NaN. The weighted path must not read w_y for it, so it writes NaN.
  const int64_t y = !WEIGHTED || p.index ? p.index[b] : int64_t(-1);
  if constexpr (WEIGHTED) {
    if (p.index && (y < 0 || y >= p.C)) {
      fill_row<scalar_t, VEC, GROUP>(out, p.C, 1, static_cast<scalar_t>(quiet_nan<acc_t>()), t);
      return;
    }
  }
  const acc_t r = p.radius ? p.radius[b] : acc_t(0);
  const scalar_t* zrow =
      p.logits + row_start<WEIGHTED, GROUP>(p, b, b * p.stride_b + j * p.stride_k);
  const int64_t nvec = p.C / VEC;
  // The weighted math's view of the row (only the weighted block has targets and coefficients).
  [[maybe_unused]] WeightedRow<scalar_t, target_t, acc_t> row{};
  if constexpr (WEIGHTED) row = p.row(b, j, y, r);
  // Weighted: A = sum_c a_c, a pre-pass over the target row and class weights only (the row is
  // then re-read from L2); with an index target and no smoothing A is a_y.
  [[maybe_unused]] acc_t asum = acc_t(0);
  if constexpr (WEIGHTED) {
    __shared__ SumStat<acc_t> smem[row_block_threads(GROUP) / kWarp];
    if (p.need_asum) {
      SumStat<acc_t> part{acc_t(0)};
      for (int64_t i = t; i < nvec; i += GROUP) {
        if (row.p) {
          const Vec<target_t, VEC> tv = reinterpret_cast<const Vec<target_t, VEC>*>(row.p)[i];
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            part.v += row.coef(static_cast<acc_t>(tv.v[e]), i * VEC + e);
          }
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) part.v += row.a(i * VEC + e);
        }
      }
      for (int64_t c = nvec * VEC + t; c < p.C; c += GROUP) part.v += row.a(c);
      asum = group_reduce<GROUP>(part, smem, SumStat<acc_t>::empty()).v;
    } else {
      asum = row.coef(acc_t(1), y);
    }
  }
  const acc_t scale = w * p.grad_loss[b], row_lse = p.lse_in[row_id];
  [[maybe_unused]] acc_t eps_over_c = acc_t(0);
  if constexpr (!WEIGHTED) {
    eps_over_c = p.eps / acc_t(p.C);
    if (cs != 1) {  // class-major rows: scalar accesses, coalesced across the threads of a warp
      for (int64_t c = t; c < p.C; c += GROUP) {
        const bool is_y = c == y;
        out[c * cs] = static_cast<scalar_t>(ce_grad(robust_logit(acc_t(zrow[c * cs]), is_y, r),
                                                    is_y, row_lse, p.eps, eps_over_c, scale));
      }
      return;
    }
  }
  [[maybe_unused]] const auto* vrow = reinterpret_cast<const Vec<scalar_t, VEC>*>(zrow);
  auto* vout = reinterpret_cast<Vec<scalar_t, VEC>*>(out);
#pragma unroll 4
  for (int64_t i = t; i < nvec; i += GROUP) {
    Vec<scalar_t, VEC> g;
    if constexpr (WEIGHTED) {
      acc_t x[VEC], a[VEC];
      load_weighted_vec<VEC>(row, i, x, a);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        g.v[e] = static_cast<scalar_t>(weighted_ce_grad(x[e], a[e], row_lse, asum, scale));
      }
    } else {
      const Vec<scalar_t, VEC> v = vrow[i];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const bool is_y = i * VEC + e == y;
        g.v[e] = static_cast<scalar_t>(
            ce_grad(robust_logit(acc_t(v.v[e]), is_y, r), is_y, row_lse, p.eps, eps_over_c, scale));
      }
    }
    vout[i] = g;
  }
  for (int64_t c = nvec * VEC + t; c < p.C; c += GROUP) {
    if constexpr (WEIGHTED) {
      out[c] =
          static_cast<scalar_t>(weighted_ce_grad(row.logit(c), row.a(c), row_lse, asum, scale));
    } else {
      const bool is_y = c == y;
      out[c] = static_cast<scalar_t>(
          ce_grad(robust_logit(acc_t(zrow[c]), is_y, r), is_y, row_lse, p.eps, eps_over_c, scale));
    }
  }
}

template <bool WEIGHTED, typename target_t>
struct CeLaunch {
  template <typename scalar_t, typename acc_t, int VEC, int GROUP>
  struct Forward {
    static void run(const ForwardParams<WEIGHTED, scalar_t, target_t, acc_t>& p) {
      launch_groups<GROUP>(
          worst_of_k_ce_forward_kernel<WEIGHTED, scalar_t, target_t, acc_t, VEC, GROUP>, p.B, p);
    }
  };
  template <typename scalar_t, typename acc_t, int VEC, int GROUP>
  struct Backward {
    static void run(const BackwardParams<WEIGHTED, scalar_t, target_t, acc_t>& p) {
      launch_groups<GROUP>(
          worst_of_k_ce_backward_kernel<WEIGHTED, scalar_t, target_t, acc_t, VEC, GROUP>, p.B * p.k,
          p);
    }
  };
};

template <typename P>
using scalar_of = std::remove_cv_t<std::remove_pointer_t<decltype(P::logits)>>;

// The input side of a parameter block: logits, target, radius, smoothing (and class weights).
template <typename P>
void set_inputs(P& p, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& radius,
                const at::Tensor& class_weight, double label_smoothing) {
  using scalar_t = scalar_of<P>;
  using acc_t = at::opmath_type<scalar_t>;
  p.logits = logits.const_data_ptr<scalar_t>();
  p.B = num_rows(logits);
  p.k = num_copies(logits);
  p.C = num_classes(logits);
  p.stride_b = logits.stride(0);
  p.stride_k = logits.stride(logits.dim() - 2);
  p.radius = radius.defined() ? radius.const_data_ptr<acc_t>() : nullptr;
  const acc_t eps = static_cast<acc_t>(label_smoothing);
  if constexpr (!P::kWeighted) {
    p.index = target.const_data_ptr<int64_t>();
    p.eps = eps;
    p.stride_c = p.C > 1 ? logits.stride(logits.dim() - 1) : 1;
    if (p.stride_c != 1) {                     // class-major rows (kernel_layout): see row_start
      const bool spatial = logits.dim() == 4;  // (N, S, 1, C); 3-D: (B, 1, C), memory (C, B)
      p.positions = std::max<int64_t>(1, spatial ? logits.size(1) : p.B);
      p.stride_b = spatial ? logits.stride(0) : 0;
    }
  } else {
    using target_t = std::remove_cv_t<std::remove_pointer_t<decltype(P::soft)>>;
    if (is_soft_target(target)) {
      p.soft = target.const_data_ptr<target_t>();
      const auto st = soft_target_strides(target);
      p.target_stride_b = st.first;
      p.target_stride_k = st.second;
    } else {
      p.index = target.const_data_ptr<int64_t>();
    }
    p.coef = {class_weight.defined() ? class_weight.const_data_ptr<acc_t>() : nullptr,
              acc_t(1) - eps, eps / acc_t(p.C)};
    p.need_asum = p.soft != nullptr || label_smoothing != 0.0;
  }
}

// 16-byte vectors need every logits row and (soft targets) every target row aligned, and a
// contiguous class dim.
template <typename P>
bool inputs_aligned(const P& p) {
  using scalar_t = scalar_of<P>;
  constexpr int kVec = max_vec<scalar_t>();
  bool ok = aligned_for(p.logits, p.stride_b, p.stride_k, kVec, sizeof(scalar_t));
  if constexpr (!P::kWeighted) ok = ok && p.stride_c == 1;
  if constexpr (P::kWeighted) {
    ok = ok && (!p.soft ||
                aligned_for(p.soft, p.target_stride_b, p.target_stride_k, kVec, sizeof(*p.soft)));
  }
  return ok;
}

// Runs body(scalar_t{}, target_t{}, std::bool_constant<WEIGHTED>{}): the weighted path for class
// weights or soft targets (both dtypes dispatched), the plain one (target_t = scalar_t, unused)
// for index targets without class weights.
template <typename F>
void dispatch_ce(bool weighted, const at::Tensor& logits, const at::Tensor& target, F&& body) {
  if (weighted) {
    dispatch_weighted(logits, target, [&](auto s, auto t) { body(s, t, std::true_type{}); });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "worst_of_k_ce",
                                  [&] { body(scalar_t(0), scalar_t(0), std::false_type{}); });
}

// An optional input as the kernels read it: contiguous, or undefined (a nullptr) when absent.
at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// How the CUDA kernels read the logits (kernel_layout): class-major rows (3-D, or 4-D spatial
// rows) in place when a thread per row reads them (C <= kRowThreadMaxClasses), through a
// contiguous copy otherwise.
KernelLayout layout_of(const at::Tensor& logits, const at::Tensor& target,
                       const c10::optional<at::Tensor>& radius,
                       const c10::optional<at::Tensor>& class_weight) {
  return kernel_layout(logits, target, radius, class_weight, kRowThreadMaxClasses);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> worst_of_k_ce_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& radius,
    double temperature, double label_smoothing, int64_t ignore_index,
    const c10::optional<at::Tensor>& class_weight) {
  const KernelLayout layout = layout_of(logits, target, radius, class_weight);
  if (layout == KernelLayout::kCopy) {
    return worst_of_k_ce_fwd_cuda(rows_copy(logits), target, radius, temperature, label_smoothing,
                                  ignore_index, class_weight);
  }
  const bool weighted = check_worst_of_k_args(logits, target, radius, class_weight,
                                              layout == KernelLayout::kClassMajor);
  c10::cuda::CUDAGuard guard(logits.device());
  WorstOfKForward out = WorstOfKForward::allocate(logits, radius.has_value());
  if (num_rows(logits) == 0) return out.as_tuple();
  const at::Tensor tgt = is_soft_target(target) ? target : target.contiguous();
  const at::Tensor rad = contiguous_or_undefined(radius);
  const at::Tensor cw = contiguous_or_undefined(class_weight);
  dispatch_ce(weighted, logits, tgt, [&](auto s, auto t, auto weighted_tag) {
    using scalar_t = decltype(s);
    using target_t = decltype(t);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kWeighted = decltype(weighted_tag)::value;
    ForwardParams<kWeighted, scalar_t, target_t, acc_t> p{};
    set_inputs(p, logits, tgt, rad, cw, label_smoothing);
    p.ignore_index = ignore_index;
    p.tau = static_cast<acc_t>(temperature);
    p.loss = out.loss.mutable_data_ptr<acc_t>();
    p.lse = out.lse.mutable_data_ptr<acc_t>();
    p.weight = out.weight.mutable_data_ptr<acc_t>();
    p.dradius = rad.defined() ? out.dradius.mutable_data_ptr<acc_t>() : nullptr;
    p.index_out = out.index.mutable_data_ptr<int64_t>();
    launch_row_kernel<scalar_t, CeLaunch<kWeighted, target_t>::template Forward,
                      /*kThreadRows=*/true>(inputs_aligned(p), p.C, p);
  });
  return out.as_tuple();
}

// The backward into `grad`, which may be the logits themselves: every element is read and then
// written by the same thread, and the target logit is never re-read after its row is written.
void backward_into(bool weighted, const at::Tensor& grad_loss, const at::Tensor& logits,
                   const at::Tensor& target, const c10::optional<at::Tensor>& radius,
                   const at::Tensor& lse, const at::Tensor& weight, double label_smoothing,
                   int64_t ignore_index, const c10::optional<at::Tensor>& class_weight,
                   at::Tensor& grad) {
  if (grad.numel() == 0) return;
  const at::Tensor g = grad_loss.contiguous();
  const at::Tensor tgt = is_soft_target(target) ? target : target.contiguous();
  const at::Tensor rad = contiguous_or_undefined(radius);
  const at::Tensor cw = contiguous_or_undefined(class_weight);
  dispatch_ce(weighted, logits, tgt, [&](auto s, auto t, auto weighted_tag) {
    using scalar_t = decltype(s);
    using target_t = decltype(t);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kWeighted = decltype(weighted_tag)::value;
    BackwardParams<kWeighted, scalar_t, target_t, acc_t> p{};
    set_inputs(p, logits, tgt, rad, cw, label_smoothing);
    // Ignored samples arrive with weight 0: only the weighted block carries ignore_index.
    if constexpr (kWeighted) p.ignore_index = ignore_index;
    p.grad = grad.mutable_data_ptr<scalar_t>();
    p.grad_stride_b = grad.stride(0);  // class-major rows use the logits' offsets
    p.grad_stride_k = grad.stride(grad.dim() - 2);
    p.grad_loss = g.const_data_ptr<acc_t>();
    p.lse_in = lse.const_data_ptr<acc_t>();
    p.weight_in = weight.const_data_ptr<acc_t>();
    const bool aligned = inputs_aligned(p) && aligned_for(p.grad, p.grad_stride_b, p.grad_stride_k,
                                                          max_vec<scalar_t>(), sizeof(scalar_t));
    launch_row_kernel<scalar_t, CeLaunch<kWeighted, target_t>::template Backward,
                      /*kThreadRows=*/true>(aligned, p.C, p);
  });
}

at::Tensor worst_of_k_ce_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                  const at::Tensor& target, const c10::optional<at::Tensor>& radius,
                                  const at::Tensor& lse, const at::Tensor& weight,
                                  double label_smoothing, int64_t ignore_index,
                                  const c10::optional<at::Tensor>& class_weight) {
  const KernelLayout layout = layout_of(logits, target, radius, class_weight);
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty_like(logits);
  if (backward_through_copy(layout, logits, grad)) {
    grad.copy_(worst_of_k_ce_bwd_cuda(grad_loss, rows_copy(logits), target, radius, lse, weight,
                                      label_smoothing, ignore_index, class_weight)
                   .view(grad.sizes()));
    return grad;
  }
  const bool weighted = check_worst_of_k_backward(grad_loss, logits, target, radius, lse, weight,
                                                  class_weight, layout != KernelLayout::kRows);
  backward_into(weighted, grad_loss, logits, target, radius, lse, weight, label_smoothing,
                ignore_index, class_weight, grad);
  return grad;
}

void worst_of_k_ce_bwd_inplace_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                    const at::Tensor& target,
                                    const c10::optional<at::Tensor>& radius, const at::Tensor& lse,
                                    const at::Tensor& weight, double label_smoothing,
                                    int64_t ignore_index,
                                    const c10::optional<at::Tensor>& class_weight) {
  const KernelLayout layout = layout_of(logits, target, radius, class_weight);
  if (layout == KernelLayout::kCopy) {
    check_inplace_backward(logits, target);
    c10::cuda::CUDAGuard guard(logits.device());
    const at::Tensor rows = rows_copy(logits);
    worst_of_k_ce_bwd_inplace_cuda(grad_loss, rows, target, radius, lse, weight, label_smoothing,
                                   ignore_index, class_weight);
    copy_rows_back(logits, rows);
    return;
  }
  const bool weighted = check_worst_of_k_backward(grad_loss, logits, target, radius, lse, weight,
                                                  class_weight, layout != KernelLayout::kRows);
  check_inplace_backward(logits, target);
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = logits;  // the same storage: the gradient replaces the logits
  backward_into(weighted, grad_loss, logits, target, radius, lse, weight, label_smoothing,
                ignore_index, class_weight, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(FASTMARGIN_OPS_NS, FASTMARGIN_CUDA_KEY, m) {
  m.impl("worst_of_k_ce_fwd", &worst_of_k_ce_fwd_cuda);
  m.impl("worst_of_k_ce_bwd", &worst_of_k_ce_bwd_cuda);
  m.impl("worst_of_k_ce_bwd_inplace", &worst_of_k_ce_bwd_inplace_cuda);
}

}  // namespace fastmargin
