// CUDA kernels of the all-layer perturbation u' = u + ||u_b||_2 * delta (AMO) and its backward.
//
// Every example b is the flat range [b*N, (b+1)*N) of the working layout (contiguous or
// channels_last read in place, see fastmargin/all_layer_perturb.h): the per-example sums
// (||u_b||^2 forward, <g_b, delta_b> backward) are invariant to the order of an example's
// elements and everything else is elementwise, so no index arithmetic beyond b*N + i is needed.
//
// Each op is a per-example reduction followed by an elementwise pass:
//  * fused (one launch) when there are enough examples to fill the GPU (B >= 2 per SM): a
//    group per example (a warp for N <= kWarpMaxElems, else a 512-thread block) reduces its
//    example with 16-byte vector loads, merges the partials with warp shuffles (+ shared
//    memory across warps), then walks the example again for the elementwise pass. The second
//    walk re-reads what the same group has just read, usually from L2 (an example is at most a
//    few hundred KB in practice, L2 holds tens of MB);
//  * split (two launches) when few examples are large: each example is cut into `chunks`
//    chunks so that every SM has work; launch 1 writes one fp32 partial sum per chunk into a
//    (B, chunks) buffer, launch 2 has each chunk's block sum its example's partials in a fixed
//    order (deterministic, no atomics) and apply the elementwise pass.
// fp32 accumulation (fp64 for float64), int64 offsets, no host synchronisation.
//
// Byte model (E = B*N elements; s_u bytes per u / g / out element, s_d per delta element):
//   forward:  pass 1 reads u (the norm); pass 2 reads u and delta, writes out
//             -> E*(3*s_u + s_d); floor E*(2*s_u + s_d) when the re-read of u hits L2.
//             Saves only the (B,) fp32 norm for the backward.
//   backward: pass 1 reads g and delta (<g, delta>); pass 2 reads g and u, writes grad_u and
//             grad_delta = ||u|| * g -> E*(4*s_u + 2*s_d); floor E*(3*s_u + 2*s_d) when the
//             re-read of g hits L2. grad_delta alone (u needs no gradient) is one elementwise
//             pass: E*(s_u + s_d).
//   e.g. bfloat16 activations with float32 deltas (AMO under autocast): forward 10 B/element
//   (floor 8), backward 16 B/element (floor 14).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <tuple>

#include "fastmargin/all_layer_perturb.h"
#include "fastmargin/cuda_utils.cuh"

namespace fastmargin {
namespace {

constexpr int64_t kWarpMaxElems = 1024;  // examples up to this size get a warp each
constexpr int kBlock = 512;              // threads of a block-sized group
constexpr int64_t kMinChunk = 16384;     // smallest chunk worth a block of its own (split mode)

enum class Phase { kFused, kReduce, kApply };

template <typename scalar_t, typename delta_t, typename acc_t>
struct Params {
  const scalar_t* a;     // forward: u; backward: g (the output's gradient)
  const scalar_t* u;     // backward: u (for grad_u); forward: unused
  const delta_t* delta;  // forward: delta; backward: delta (for <g, delta>)
  scalar_t* out;         // forward: out; backward: grad_u (nullptr: not needed)
  delta_t* out_delta;    // backward: grad_delta (nullptr: not needed)
  acc_t* norm;           // forward: written; backward: read
  acc_t* partial;        // (B, chunks) chunk sums in split mode
  int64_t B, N, chunks, chunk_len;
  bool reduce;  // backward: whether <g, delta> is needed (grad_u wanted)
};

// This thread's share of sum_i a_i * c_i over [0, len) (SQUARE: sum_i a_i^2).
template <bool SQUARE, int VEC, int GROUP, typename acc_t, typename a_t, typename c_t>
__device__ __forceinline__ acc_t thread_dot(const a_t* a, const c_t* c, int64_t len, int t) {
  acc_t s = acc_t(0);
  const int64_t nvec = len / VEC;
  const auto* va = reinterpret_cast<const Vec<a_t, VEC>*>(a);
  const auto* vc = reinterpret_cast<const Vec<c_t, VEC>*>(c);
#pragma unroll 4
  for (int64_t i = t; i < nvec; i += GROUP) {
    const Vec<a_t, VEC> x = va[i];
    if constexpr (SQUARE) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) s += acc_t(x.v[e]) * acc_t(x.v[e]);
    } else {
      const Vec<c_t, VEC> y = vc[i];
#pragma unroll
      for (int e = 0; e < VEC; ++e) s += acc_t(x.v[e]) * acc_t(y.v[e]);
    }
  }
  for (int64_t i = nvec * VEC + t; i < len; i += GROUP) {
    const acc_t x = acc_t(a[i]);
    s += SQUARE ? x * x : x * acc_t(c[i]);
  }
  return s;
}

// Forward elementwise pass over [0, len): out = u + n * delta.
template <int VEC, int GROUP, typename scalar_t, typename delta_t, typename acc_t>
__device__ __forceinline__ void apply_forward(const scalar_t* u, const delta_t* d, scalar_t* out,
                                              acc_t n, int64_t len, int t) {
  const int64_t nvec = len / VEC;
  const auto* vu = reinterpret_cast<const Vec<scalar_t, VEC>*>(u);
  const auto* vd = reinterpret_cast<const Vec<delta_t, VEC>*>(d);
  auto* vo = reinterpret_cast<Vec<scalar_t, VEC>*>(out);
#pragma unroll 4
  for (int64_t i = t; i < nvec; i += GROUP) {
    const Vec<scalar_t, VEC> x = vu[i];
    const Vec<delta_t, VEC> y = vd[i];
    Vec<scalar_t, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = static_cast<scalar_t>(acc_t(x.v[e]) + n * acc_t(y.v[e]));
    vo[i] = o;
  }
  for (int64_t i = nvec * VEC + t; i < len; i += GROUP) {
    out[i] = static_cast<scalar_t>(acc_t(u[i]) + n * acc_t(d[i]));
  }
}

// Backward elementwise pass: grad_u = g + u * coef, grad_delta = n * g (either may be null).
template <int VEC, int GROUP, typename scalar_t, typename delta_t, typename acc_t>
__device__ __forceinline__ void apply_backward(const scalar_t* g, const scalar_t* u, scalar_t* gu,
                                               delta_t* gd, acc_t n, acc_t coef, int64_t len,
                                               int t) {
  const int64_t nvec = len / VEC;
  const auto* vg = reinterpret_cast<const Vec<scalar_t, VEC>*>(g);
  const auto* vu = reinterpret_cast<const Vec<scalar_t, VEC>*>(u);
  auto* vgu = reinterpret_cast<Vec<scalar_t, VEC>*>(gu);
  auto* vgd = reinterpret_cast<Vec<delta_t, VEC>*>(gd);
#pragma unroll 4
  for (int64_t i = t; i < nvec; i += GROUP) {
    const Vec<scalar_t, VEC> x = vg[i];
    if (gu) {
      const Vec<scalar_t, VEC> y = vu[i];
      Vec<scalar_t, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        o.v[e] = static_cast<scalar_t>(acc_t(x.v[e]) + acc_t(y.v[e]) * coef);
      vgu[i] = o;
    }
    if (gd) {
      Vec<delta_t, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = static_cast<delta_t>(n * acc_t(x.v[e]));
      vgd[i] = o;
    }
  }
  for (int64_t i = nvec * VEC + t; i < len; i += GROUP) {
    const acc_t x = acc_t(g[i]);
    if (gu) gu[i] = static_cast<scalar_t>(x + acc_t(u[i]) * coef);
    if (gd) gd[i] = static_cast<delta_t>(n * x);
  }
}

template <typename scalar_t, typename delta_t, typename acc_t, int VEC, int GROUP, bool BACKWARD,
          Phase PHASE>
__global__ void __launch_bounds__(row_block_threads(GROUP))
    all_layer_perturb_kernel(Params<scalar_t, delta_t, acc_t> p) {
  __shared__ SumStat<acc_t> smem[row_block_threads(GROUP) / kWarp];
  const int64_t item = group_item<GROUP>();
  const int t = group_rank<GROUP>();
  if (item >= p.B * p.chunks) return;  // uniform per group
  const int64_t b = item / p.chunks, c = item % p.chunks;
  const int64_t lo = c * p.chunk_len;
  const int64_t len = (lo + p.chunk_len < p.N ? lo + p.chunk_len : p.N) - lo;
  const int64_t off = b * p.N + lo;
  const bool want_sum = !BACKWARD || p.reduce;

  acc_t s = acc_t(0);
  if constexpr (PHASE == Phase::kFused || PHASE == Phase::kReduce) {
    if (want_sum) {
      s = thread_dot<!BACKWARD, VEC, GROUP, acc_t>(p.a + off, p.delta + off, len, t);
      s = group_sum<GROUP>(s, smem);
    }
    if constexpr (PHASE == Phase::kReduce) {
      if (t == 0) p.partial[item] = s;
      return;
    }
  } else {
    if (want_sum) {  // sum this example's chunk partials in a fixed order
      for (int64_t j = t; j < p.chunks; j += GROUP) s += p.partial[b * p.chunks + j];
      s = group_sum<GROUP>(s, smem);
    }
  }

  if constexpr (!BACKWARD) {
    const acc_t n = sqrt(s);
    if (c == 0 && t == 0) p.norm[b] = n;
    apply_forward<VEC, GROUP>(p.a + off, p.delta + off, p.out + off, n, len, t);
  } else {
    const acc_t n = p.norm[b];
    const acc_t coef = n > acc_t(0) ? s / n : acc_t(0);  // u/||u|| term is 0 at ||u|| = 0
    apply_backward<VEC, GROUP>(p.a + off, p.u ? p.u + off : nullptr, p.out ? p.out + off : nullptr,
                               p.out_delta ? p.out_delta + off : nullptr, n, coef, len, t);
  }
}

template <typename scalar_t, typename delta_t, typename acc_t, int VEC, int GROUP, bool BACKWARD,
          Phase PHASE>
void launch_phase(const Params<scalar_t, delta_t, acc_t>& p) {
  launch_groups<GROUP>(
      all_layer_perturb_kernel<scalar_t, delta_t, acc_t, VEC, GROUP, BACKWARD, PHASE>,
      p.B * p.chunks, p);
}

// The device's multiprocessor count, asked of the driver once per device: the split heuristic
// runs on every call, and the attribute cannot change while the process lives.
int multiprocessor_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};  // 0: not asked yet
  std::atomic<int>& slot = cache[device];
  int sms = slot.load(std::memory_order_relaxed);
  if (sms == 0) {  // racing threads both ask and store the same value
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    slot.store(sms, std::memory_order_relaxed);
  }
  return sms;
}

template <typename scalar_t, typename delta_t, typename acc_t, int VEC, bool BACKWARD>
void launch_vec(Params<scalar_t, delta_t, acc_t> p) {
  if (p.N <= kWarpMaxElems) {
    p.chunks = 1;
    p.chunk_len = p.N;
    launch_phase<scalar_t, delta_t, acc_t, VEC, kWarp, BACKWARD, Phase::kFused>(p);
    return;
  }
  // Enough examples for ~2 blocks (of 512 threads) per SM: one fused launch. Otherwise split
  // each example into chunks (a tuning knob: measure before changing the factor).
  const int64_t target_blocks =
      2 * static_cast<int64_t>(std::max(multiprocessor_count(c10::cuda::current_device()), 1));
  const int64_t max_chunks = std::max<int64_t>(1, p.N / kMinChunk);
  const int64_t chunks =
      std::min(max_chunks, std::max<int64_t>(1, (target_blocks + p.B - 1) / p.B));
  const bool needs_sum = !BACKWARD || p.reduce;
  // Chunks of a multiple of VEC elements (keeps every chunk start aligned); the rounding may
  // need one chunk fewer than asked for.
  p.chunks = chunks;
  p.chunk_len = ((p.N + p.chunks - 1) / p.chunks + VEC - 1) / VEC * VEC;
  p.chunks = (p.N + p.chunk_len - 1) / p.chunk_len;
  if (p.chunks == 1 || !needs_sum) {
    // One example per block, or no reduction at all (grad_delta only: chunks independent).
    launch_phase<scalar_t, delta_t, acc_t, VEC, kBlock, BACKWARD, Phase::kFused>(p);
    return;
  }
  at::Tensor partial =
      at::empty({p.B * p.chunks}, at::TensorOptions()
                                      .device(at::kCUDA, c10::cuda::current_device())
                                      .dtype(c10::CppTypeToScalarType<acc_t>::value));
  p.partial = partial.mutable_data_ptr<acc_t>();
  launch_phase<scalar_t, delta_t, acc_t, VEC, kBlock, BACKWARD, Phase::kReduce>(p);
  launch_phase<scalar_t, delta_t, acc_t, VEC, kBlock, BACKWARD, Phase::kApply>(p);
}

bool aligned16(const void* ptr, int64_t N, int vec, size_t elem) {
  return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % (vec * elem) == 0 && N % vec == 0);
}

// 16-byte vectors (in u's dtype) when every example start of every tensor is aligned.
template <typename scalar_t, typename delta_t, typename acc_t, bool BACKWARD>
void launch(const Params<scalar_t, delta_t, acc_t>& p) {
  constexpr int kVec = max_vec<scalar_t>();
  const bool aligned = aligned16(p.a, p.N, kVec, sizeof(scalar_t)) &&
                       aligned16(p.u, p.N, kVec, sizeof(scalar_t)) &&
                       aligned16(p.delta, p.N, kVec, sizeof(delta_t)) &&
                       aligned16(p.out, p.N, kVec, sizeof(scalar_t)) &&
                       aligned16(p.out_delta, p.N, kVec, sizeof(delta_t));
  if (aligned) {
    launch_vec<scalar_t, delta_t, acc_t, kVec, BACKWARD>(p);
  } else {
    launch_vec<scalar_t, delta_t, acc_t, 1, BACKWARD>(p);
  }
}

std::tuple<at::Tensor, at::Tensor> all_layer_perturb_fwd_cuda(const at::Tensor& u_in,
                                                              const at::Tensor& delta_in) {
  check_perturb_inputs(u_in, delta_in);
  c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = working_layout(u_in);
  at::Tensor out = at::empty_like(u);
  const int64_t B = u.size(0);
  at::Tensor norm = at::empty({B}, u.options().dtype(perturb_stats_dtype(u)));
  if (B == 0) return {out, norm};
  if (u.numel() == 0) return {out, norm.zero_()};
  const at::Tensor delta = in_layout_of(delta_in, u);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, u.scalar_type(), "all_layer_perturb_fwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto run = [&](auto delta_tag) {
          using delta_t = decltype(delta_tag);
          Params<scalar_t, delta_t, acc_t> p{u.const_data_ptr<scalar_t>(),
                                             nullptr,
                                             delta.const_data_ptr<delta_t>(),
                                             out.mutable_data_ptr<scalar_t>(),
                                             nullptr,
                                             norm.mutable_data_ptr<acc_t>(),
                                             nullptr,
                                             B,
                                             u.numel() / B,
                                             1,
                                             0,
                                             true};
          launch<scalar_t, delta_t, acc_t, false>(p);
        };
        if (delta.scalar_type() == u.scalar_type()) {
          run(scalar_t(0));
        } else {
          run(acc_t(0));  // wider (float32) delta
        }
      });
  return {out, norm};
}

std::tuple<at::Tensor, at::Tensor> all_layer_perturb_bwd_cuda(
    const at::Tensor& grad_in, const at::Tensor& u_in, const at::Tensor& delta_in,
    const at::Tensor& norm, bool need_grad_u, bool need_grad_delta) {
  check_perturb_backward(grad_in, u_in, delta_in, norm);
  c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = working_layout(u_in);
  at::Tensor grad_u = need_grad_u ? at::empty_like(u) : at::empty({0}, u.options());
  at::Tensor grad_delta =
      need_grad_delta ? at::empty_like(u, delta_in.options()) : at::empty({0}, delta_in.options());
  if (u.numel() == 0 || (!need_grad_u && !need_grad_delta)) return {grad_u, grad_delta};
  const at::Tensor grad = in_layout_of(grad_in, u);
  const at::Tensor delta = need_grad_u ? in_layout_of(delta_in, u) : delta_in;
  const int64_t B = u.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, u.scalar_type(), "all_layer_perturb_bwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto run = [&](auto delta_tag) {
          using delta_t = decltype(delta_tag);
          Params<scalar_t, delta_t, acc_t> p{
              grad.const_data_ptr<scalar_t>(),
              need_grad_u ? u.const_data_ptr<scalar_t>() : nullptr,
              need_grad_u ? delta.const_data_ptr<delta_t>() : nullptr,
              need_grad_u ? grad_u.mutable_data_ptr<scalar_t>() : nullptr,
              need_grad_delta ? grad_delta.mutable_data_ptr<delta_t>() : nullptr,
              const_cast<acc_t*>(norm.const_data_ptr<acc_t>()),
              nullptr,
              B,
              u.numel() / B,
              1,
              0,
              need_grad_u};
          launch<scalar_t, delta_t, acc_t, true>(p);
        };
        if (delta_in.scalar_type() == u.scalar_type()) {
          run(scalar_t(0));
        } else {
          run(acc_t(0));
        }
      });
  return {grad_u, grad_delta};
}

}  // namespace

TORCH_LIBRARY_IMPL(FASTMARGIN_OPS_NS, FASTMARGIN_CUDA_KEY, m) {
  m.impl("all_layer_perturb_fwd", &all_layer_perturb_fwd_cuda);
  m.impl("all_layer_perturb_bwd", &all_layer_perturb_bwd_cuda);
}

}  // namespace fastmargin
