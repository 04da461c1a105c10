// CPU kernels of the weight-noise worst-of-k cross-entropy (at::parallel_for over rows) and of
// the noise itself. Same math and the same Philox noise as csrc/cuda/weight_noise_ce.cu (see its
// header for the design and the byte model).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fastmargin/ce_math.h"
#include "fastmargin/cpu_noise.h"
#include "fastmargin/cpu_rows.h"
#include "fastmargin/philox.h"
#include "fastmargin/weight_noise_ce.h"

namespace fastmargin {
namespace {

NoiseKey read_key(const at::Tensor& philox) {
  const int64_t* p = philox.const_data_ptr<int64_t>();
  return {static_cast<uint64_t>(p[0]), static_cast<uint64_t>(p[1])};
}

template <typename scalar_t>
void forward_impl(const at::Tensor& logits, const int64_t* tgt, const at::Tensor& scale,
                  const NoiseKey& key, int64_t k, double temperature, double label_smoothing,
                  int64_t ignore_index, WeightNoiseForward& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1), sn = logits.stride(0);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const acc_t* sc = scale.const_data_ptr<acc_t>();
  acc_t* loss = out.loss.mutable_data_ptr<acc_t>();
  acc_t* lse = out.lse.mutable_data_ptr<acc_t>();
  acc_t* weight = out.weight.mutable_data_ptr<acc_t>();
  int64_t* index = out.index.mutable_data_ptr<int64_t>();
  const acc_t tau = static_cast<acc_t>(temperature);
  const acc_t eps = static_cast<acc_t>(label_smoothing);
  const bool want_sum = eps != acc_t(0);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, k * C));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    cpu::Scratch<acc_t> xs, es;
    const bool small = C <= cpu::kSmallRow;
    std::vector<RowStats<acc_t>> st(small ? static_cast<size_t>(k) : 0);
    // The noise of every copy of the samples that contribute (batched across rows and copies).
    cpu::NoiseRows noise(key, k, C);
    const auto wanted = [&](int64_t n, int64_t) {
      return classify_target(tgt[n], ignore_index, C) == TargetKind::kClass;
    };
    for (int64_t n = begin; n < end; ++n) {
      const int64_t y = tgt[n];
      const TargetKind kind = classify_target(y, ignore_index, C);
      index[n] = 0;
      if (kind != TargetKind::kClass) {
        cpu::fill_skipped_sample(kind, k, loss + n, lse + n * k, weight + n * k,
                                 static_cast<acc_t*>(nullptr));
        continue;
      }
      const scalar_t* row = base + n * sn;
      const acc_t s = sc[n];
      if (small) {  // the k copies' statistics together (one vectorised exp for all)
        acc_t* x = xs.get(k * C);
        for (int64_t j = 0; j < k; ++j) {
          const float* xi = noise.get(n, j, end * k, wanted);
          for (int64_t c = 0; c < C; ++c) x[j * C + c] = acc_t(row[c]) + s * acc_t(xi[c]);
        }
        cpu::small_rows_stats(x, C, k, C, want_sum, es.get(3 * k), st.data());
        cpu::reduce_copies(
            k, tau,
            [&](int64_t j, acc_t& lse_j) {
              lse_j = st[j].lse();
              return ce_from_stats(lse_j, x[j * C + y], st[j].sumz, eps, C);
            },
            lse + n * k, weight + n * k, loss + n, index + n);
        continue;
      }
      acc_t* x = xs.get(C);
      // Copy j is the row z + s xi_j.
      cpu::reduce_copies(
          k, tau,
          [&](int64_t j, acc_t& lse_j) {
            const float* xi = noise.get(n, j, end * k, wanted);
            for (int64_t c = 0; c < C; ++c) x[c] = acc_t(row[c]) + s * acc_t(xi[c]);
            const RowStats<acc_t> st = cpu::row_stats(x, C, want_sum);
            lse_j = st.lse();
            return ce_from_stats(lse_j, x[y], st.sumz, eps, C);
          },
          lse + n * k, weight + n * k, loss + n, index + n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> weight_noise_ce_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& scale,
    const at::Tensor& philox, int64_t k, double temperature, double label_smoothing,
    int64_t ignore_index) {
  check_weight_noise_inputs(logits, target, scale, philox, k);
  WeightNoiseForward out = WeightNoiseForward::allocate(logits, k);
  const at::Tensor tgt = target.contiguous(), sc = scale.contiguous();
  const NoiseKey key = read_key(philox.contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "weight_noise_ce_fwd_cpu", [&] {
        forward_impl<scalar_t>(logits, tgt.const_data_ptr<int64_t>(), sc, key, k, temperature,
                               label_smoothing, ignore_index, out);
      });
  return out.as_tuple();
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_loss, const at::Tensor& logits, const int64_t* tgt,
                   const at::Tensor& scale, const NoiseKey& key, const at::Tensor& lse,
                   const at::Tensor& weight, double label_smoothing, at::Tensor& grad,
                   at::Tensor& grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1), k = lse.size(1);
  const int64_t sn = logits.stride(0), gn = grad.stride(0);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  scalar_t* gbase = grad.mutable_data_ptr<scalar_t>();
  const acc_t* sc = scale.const_data_ptr<acc_t>();
  const acc_t* gl = grad_loss.const_data_ptr<acc_t>();
  const acc_t* lse_p = lse.const_data_ptr<acc_t>();
  const acc_t* w_p = weight.const_data_ptr<acc_t>();
  acc_t* gs = grad_scale.mutable_data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(label_smoothing);
  const acc_t eps_over_c = C > 0 ? eps / acc_t(C) : acc_t(0);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    cpu::Scratch<acc_t> accs, xs;
    // The noise of the copies with non-zero weight only (tau = 0: the worst one).
    cpu::NoiseRows noise(key, k, C);
    const auto wanted = [&](int64_t n, int64_t j) { return w_p[n * k + j] != acc_t(0); };
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* out = gbase + n * gn;
      const scalar_t* row = base + n * sn;
      const acc_t* w_n = w_p + n * k;
      const acc_t* lse_n = lse_p + n * k;
      const int64_t y = tgt[n];  // may be invalid (weights NaN): then no class is the target
      const acc_t s = sc[n], g = gl[n];
      acc_t* x = xs.get(C);
      acc_t* acc = accs.get(C);
      std::fill(acc, acc + C, acc_t(0));
      acc_t ds = acc_t(0);
      const bool has_y = y >= 0 && y < C;
      const int64_t lo = has_y ? y : C, hi = has_y ? y + 1 : C;
      // Sums the copies with non-zero weight (tau = 0: only the worst one) in acc_t before
      // rounding to the logits dtype; ds = sum_j sum_c dL/dz~_jc xi_jc.
      for (int64_t j = 0; j < k; ++j) {
        if (w_n[j] == acc_t(0)) continue;  // unselected copy or ignored sample
        const float* xi = noise.get(n, j, end * k, wanted);
        for (int64_t c = 0; c < C; ++c) x[c] = acc_t(row[c]) + s * acc_t(xi[c]);
        const acc_t wg = w_n[j] * g, row_lse = lse_n[j];
        // Off-target classes in vectorised passes around the target, the target exactly.
        ds += cpu::row_softmax_grad_acc(x, xi, lo, row_lse, wg, eps_over_c, acc);
        ds += cpu::row_softmax_grad_acc(x + hi, xi + hi, C - hi, row_lse, wg, eps_over_c, acc + hi);
        if (has_y) {
          const acc_t term = ce_grad(x[y], true, row_lse, eps, eps_over_c, wg);
          acc[y] += term;
          ds += term * acc_t(xi[y]);
        }
      }
      for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(acc[c]);
      gs[n] = ds;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> weight_noise_ce_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const at::Tensor& scale, const at::Tensor& philox, const at::Tensor& lse,
    const at::Tensor& weight, double label_smoothing, int64_t ignore_index) {
  check_weight_noise_backward(grad_loss, logits, target, scale, philox, lse, weight);
  (void)ignore_index;  // ignored samples arrive with weight 0
  at::Tensor grad = at::empty_like(logits);
  at::Tensor grad_scale = at::empty({logits.size(0)}, scale.options());
  const at::Tensor g = grad_loss.contiguous(), tgt = target.contiguous(), sc = scale.contiguous();
  const NoiseKey key = read_key(philox.contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "weight_noise_ce_bwd_cpu", [&] {
        backward_impl<scalar_t>(g, logits, tgt.const_data_ptr<int64_t>(), sc, key, lse, weight,
                                label_smoothing, grad, grad_scale);
      });
  return {grad, grad_scale};
}

at::Tensor weight_noise_normal_cpu(const at::Tensor& philox, int64_t n, int64_t k, int64_t c) {
  check_philox_state(philox, philox.device());
  check_noise_shape(n, k, c);
  at::Tensor out = at::empty({n, k, c}, philox.options().dtype(at::kFloat));
  const NoiseKey key = read_key(philox.contiguous());
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, n * k, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, c)),
                   [&](int64_t begin, int64_t end) {
                     cpu::NoiseRows noise(key, k, c);
                     const auto all = [](int64_t, int64_t) { return true; };
                     for (int64_t r = begin; r < end; ++r) {
                       const float* xi = noise.get(r / k, r % k, end, all);
                       std::copy(xi, xi + c, o + r * c);
                     }
                   });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmargin, CPU, m) {
  m.impl("weight_noise_ce_fwd", &weight_noise_ce_fwd_cpu);
  m.impl("weight_noise_ce_bwd", &weight_noise_ce_bwd_cpu);
  m.impl("weight_noise_normal", &weight_noise_normal_cpu);
}

}  // namespace fastmargin
