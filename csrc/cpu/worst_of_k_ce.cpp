// CPU kernels of the worst-of-k cross-entropy family (at::parallel_for over samples / rows).
// Same math as the CUDA kernels (fastmargin/ce_math.h, ce_weighted_math.h); see
// csrc/cuda/worst_of_k_ce.cu for the byte model.
//
// One forward and one backward driver serve both losses; the per-row math is a "loss" policy:
// PlainLoss (index targets, uniform label smoothing: ce_math.h) or WeightedLoss (class weights
// and/or probability targets: ce_weighted_math.h). Rows are reduced with the vectorised passes of
// cpu_rows.h (max, sum of exps, sums), and the backward is one vectorisable loop per row with the
// target class rewritten afterwards.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "fastmargin/ce_math.h"
#include "fastmargin/ce_weighted_math.h"
#include "fastmargin/cpu_class_major.h"
#include "fastmargin/cpu_rows.h"
#include "fastmargin/worst_of_k_ce.h"

namespace fastmargin {
namespace {

using cpu::Scratch;

// Unweighted CE of the robust row: CE(z~) = lse(z~) - (1 - eps) z~_y - (eps / C) sum_c z~_c.
template <typename scalar_t_>
struct PlainLoss {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;

  const int64_t* target;
  acc_t eps, eps_over_c;
  int64_t C;

  PlainLoss(const at::Tensor& tgt, const c10::optional<at::Tensor>&, double label_smoothing,
            int64_t num_classes)
      : target(tgt.const_data_ptr<int64_t>()),
        eps(static_cast<acc_t>(label_smoothing)),
        eps_over_c(num_classes > 0 ? eps / acc_t(num_classes) : acc_t(0)),
        C(num_classes) {}

  bool soft() const { return false; }
  int64_t index_target(int64_t b) const { return target[b]; }
  static constexpr bool kSmallRowBatches = true;  // forward_small_rows applies

  // Loss of copy j of sample b (row z, valid class y); stores lse (asum is the weighted loss's).
  acc_t row_loss(const scalar_t* z, int64_t, int64_t, int64_t y, acc_t r, Scratch<acc_t>& xs,
                 Scratch<acc_t>&, acc_t& lse, acc_t&) const {
    const acc_t* x = cpu::robust_row(z, C, y, r, xs);
    const RowStats<acc_t> st = cpu::row_stats(x, C, eps != acc_t(0));
    lse = st.lse();
    return ce_from_stats(lse, x[y], st.sumz, eps, C);
  }

  acc_t dradius(acc_t lse, acc_t zy_tilde, int64_t, acc_t) const {
    return dce_dradius(lse, zy_tilde, eps, C);
  }

  // s * dCE/dz of one row (y valid): every class as off-target, then the target rewritten.
  void grad_row(const scalar_t* z, int64_t, int64_t, int64_t y, acc_t r, acc_t lse, acc_t s,
                Scratch<acc_t>&, scalar_t* out) const {
    const acc_t zy = acc_t(z[y]);  // read first: `out` may be `z` (worst_of_k_ce_bwd_inplace)
    cpu::softmax_grad_row(z, C, r, lse, acc_t(1), static_cast<const acc_t*>(nullptr), eps_over_c, s,
                          out);
    out[y] =
        static_cast<scalar_t>(ce_grad(robust_logit(zy, true, r), true, lse, eps, eps_over_c, s));
  }
};

// Target side of the weighted path (class weights and/or soft targets): row (b, j) has the
// target distribution p = soft[b * stride_b + j * stride_k + c] (stride_k == 0 when the k
// copies share a (B, C) row), or the one-hot e_y of the index target y = index[b].
template <typename target_t>
struct TargetRows {
  const target_t* soft;  // nullptr: index targets
  int64_t stride_b, stride_k;
  const int64_t* index;

  static TargetRows make(const at::Tensor& target) {
    if (!is_soft_target(target)) return {nullptr, 0, 0, target.const_data_ptr<int64_t>()};
    const auto st = soft_target_strides(target);
    return {target.const_data_ptr<target_t>(), st.first, st.second, nullptr};
  }
};

// Weighted CE: l = sum_c a_c (lse(z~) - z~_c), a_c = w_c ((1 - eps) p_c + eps / C). "Sparse"
// rows (index target, no smoothing) have a_c = 0 off the target and never build the a_c row.
template <typename scalar_t_, typename target_t>
struct WeightedLoss {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;

  TargetRows<target_t> tgt;
  ClassCoef<acc_t> coef;
  int64_t C;
  bool sparse;

  WeightedLoss(const at::Tensor& target, const c10::optional<at::Tensor>& class_weight, double eps,
               int64_t num_classes)
      : tgt(TargetRows<target_t>::make(target)),
        coef{class_weight.has_value() ? class_weight->const_data_ptr<acc_t>() : nullptr,
             acc_t(1) - static_cast<acc_t>(eps),
             num_classes > 0 ? static_cast<acc_t>(eps) / acc_t(num_classes) : acc_t(0)},
        C(num_classes),
        sparse(!tgt.soft && eps == 0.0) {}

  bool soft() const { return tgt.soft != nullptr; }  // then y == -1 means "no target class"
  static constexpr bool kSmallRowBatches = false;
  int64_t index_target(int64_t b) const { return tgt.soft ? -1 : tgt.index[b]; }
  const target_t* soft_row(int64_t b, int64_t j) const {
    return tgt.soft ? tgt.soft + b * tgt.stride_b + j * tgt.stride_k : nullptr;
  }

  // a_c of a dense row (ClassCoef::operator() for every c, written branch-free so it
  // vectorises: the class weight is loaded always but used only where the target mass is > 0).
  const acc_t* coefs(const target_t* p, int64_t y, Scratch<acc_t>& s) const {
    acc_t* a = s.get(C);
    const acc_t* w = coef.class_weight;
    const acc_t keep = coef.keep, off = coef.eps_over_c;
    if (p && w) {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t q = keep * static_cast<acc_t>(p[c]) + off, wc = w[c];
        a[c] = q != acc_t(0) ? wc * q : q;
      }
    } else if (p) {
      for (int64_t c = 0; c < C; ++c) a[c] = keep * static_cast<acc_t>(p[c]) + off;
    } else {  // index target: q = eps / C off the target
      if (w && off != acc_t(0)) {
        for (int64_t c = 0; c < C; ++c) a[c] = w[c] * off;
      } else {
        std::fill(a, a + C, off);
      }
      a[y] = coef(acc_t(1), y);
    }
    return a;
  }

  acc_t row_loss(const scalar_t* z, int64_t b, int64_t j, int64_t y, acc_t r, Scratch<acc_t>& xs,
                 Scratch<acc_t>& as, acc_t& lse, acc_t& asum) const {
    const target_t* p = soft_row(b, j);
    const acc_t* x = cpu::robust_row(z, C, y, r, xs);
    const acc_t m = cpu::row_max(x, C);
    WeightedRowStats<acc_t> st;
    if (!cpu::is_finite(m)) {  // all -inf / +inf / all NaN: the scalar online pass
      st = WeightedRow<scalar_t, target_t, acc_t>{z, p, y, r, coef}.stats(C);
    } else if (sparse) {
      const acc_t a_y = coef(acc_t(1), y);
      st = {m, cpu::row_sum_exp(x, C, m), a_y, a_y != acc_t(0) ? a_y * (x[y] - m) : acc_t(0)};
    } else {
      const acc_t* a = coefs(p, y, as);
      // D = sum_{a_c != 0} a_c (z~_c - max): a masked class with a_c > 0 gives -inf.
      const acc_t adot = cpu::row_coef_dot(a, x, C, m);
      st = {m, cpu::row_sum_exp(x, C, m), cpu::row_sum(a, C), adot};
    }
    lse = st.lse();
    asum = st.asum;
    return st.loss();
  }

  acc_t dradius(acc_t lse, acc_t zy_tilde, int64_t y, acc_t asum) const {
    return weighted_dce_dradius(lse, zy_tilde, coef(acc_t(1), y), asum);
  }

  // s * (A softmax(z~) - a) of one row: A = a_y for sparse rows, else sum_c a_c.
  void grad_row(const scalar_t* z, int64_t b, int64_t j, int64_t y, acc_t r, acc_t lse, acc_t s,
                Scratch<acc_t>& as, scalar_t* out) const {
    const acc_t* a = sparse ? nullptr : coefs(soft_row(b, j), y, as);
    const acc_t A = sparse ? coef(acc_t(1), y) : cpu::row_sum(a, C);
    const acc_t zy = y >= 0 ? acc_t(z[y]) : acc_t(0);  // read first: `out` may be `z`
    cpu::softmax_grad_row(z, C, r, lse, A, a, acc_t(0), s, out);
    if (y >= 0) {
      out[y] = static_cast<scalar_t>(
          weighted_ce_grad(robust_logit(zy, true, r), coef(acc_t(1), y), lse, A, s));
    }
  }
};

// dL/dr of sample b: the copies' dCE/dr weighted by dL/dl_j.
template <typename Loss, typename scalar_t, typename acc_t>
acc_t sample_dradius(const Loss& L, const scalar_t* zb, int64_t sk, int64_t k, int64_t y, acc_t r,
                     const acc_t* lse_b, const acc_t* w_b, acc_t asum) {
  acc_t dr = acc_t(0);
  for (int64_t j = 0; j < k; ++j) {
    if (w_b[j] == acc_t(0)) continue;
    const acc_t zy = robust_logit(acc_t(zb[j * sk + y]), true, r);
    dr += w_b[j] * L.dradius(lse_b[j], zy, y, asum);
  }
  return dr;
}

// The forward's shapes and raw pointers (inputs and the outputs it writes), shared by the
// row-by-row driver and the small-row one.
template <typename scalar_t, typename acc_t>
struct ForwardRows {
  int64_t B, k, C, sb, sk, cs;
  const scalar_t* base;
  const acc_t* rad;  // nullptr without a radius
  acc_t* loss;
  acc_t* lse;
  acc_t* weight;
  int64_t* index;
  acc_t* dradius;  // nullptr without a radius

  ForwardRows(const at::Tensor& logits, const c10::optional<at::Tensor>& radius,
              WorstOfKForward& out)
      : B(num_rows(logits)),
        k(num_copies(logits)),
        C(num_classes(logits)),
        sb(logits.stride(0)),  // of 3-D logits (4-D ones are class-major: ClassMajorRows)
        sk(logits.stride(logits.dim() - 2)),
        cs(logits.stride(logits.dim() - 1)),
        base(logits.const_data_ptr<scalar_t>()),
        rad(radius.has_value() ? radius->const_data_ptr<acc_t>() : nullptr),
        loss(out.loss.mutable_data_ptr<acc_t>()),
        lse(out.lse.mutable_data_ptr<acc_t>()),
        weight(out.weight.mutable_data_ptr<acc_t>()),
        index(out.index.mutable_data_ptr<int64_t>()),
        dradius(rad ? out.dradius.mutable_data_ptr<acc_t>() : nullptr) {}
};

// Where class-major rows lie (kernel_layout's kClassMajor): row b at offset
// (b / S) * sample_stride + b % S, class c a further c * cs. 3-D (B, 1, C) rows are one block of
// S = B consecutive rows; spatial (N, S, 1, C) rows are a block per sample. The gradient has the
// same strides (backward_through_copy), so the same offsets.
struct ClassMajorRows {
  int64_t S, sample_stride;

  explicit ClassMajorRows(const at::Tensor& logits)
      : S(std::max<int64_t>(1, logits.dim() == 4 ? logits.size(1) : logits.size(0))),
        sample_stride(logits.dim() == 4 ? logits.stride(0) : 0) {}

  int64_t offset(int64_t b) const { return (b / S) * sample_stride + b % S; }
  // Rows of [b, end) that lie consecutively in memory, at most `most`: a block never spans two
  // samples.
  int64_t block(int64_t b, int64_t end, int64_t most) const {
    return std::min({end - b, most, S - b % S});
  }
};

// Whether rows [b0, b0 + n) of a class-major block all have a class target and a finite max (so
// their statistics stand as class_major_stats computed them): a branch-free check, so the common
// block takes a loop without per-row branches.
template <typename Loss, typename acc_t>
bool all_plain_rows(int64_t b0, int64_t n, const acc_t* mx, int64_t C, int64_t ignore_index,
                    const Loss& L) {
  bool plain = true;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = L.index_target(b0 + i);
    plain &= (y >= 0) & (y < C) & (y != ignore_index) & (mx[i] - mx[i] == acc_t(0));
  }
  return plain;
}

// The plain-loss forward of class-major rows (k = 1, no radius): blocks of consecutive rows, their
// statistics and logsumexps from cpu::class_major_stats (a few vector loads per class, the logs in
// lanes), then each row's loss as in forward_small_rows. With the hard maximum (tau = 0) one copy's
// loss is the sample's loss, weight 1 (reduce_copies' result, written directly; a block whose rows
// are all plain in a loop of its own).
template <typename Loss>
void forward_class_major(const at::Tensor& logits, double temperature, int64_t ignore_index,
                         const Loss& L, WorstOfKForward& out) {
  using scalar_t = typename Loss::scalar_t;
  using acc_t = typename Loss::acc_t;
  constexpr int64_t kBlock = 4 * cpu::kMajorTile;
  const ForwardRows<scalar_t, acc_t> p(logits, c10::nullopt, out);
  const ClassMajorRows rows(logits);
  const int64_t B = p.B, C = p.C, cs = p.cs;
  const acc_t tau = static_cast<acc_t>(temperature);
  const bool want_sum = L.eps != acc_t(0);
  const int64_t grain = std::max<int64_t>(kBlock, 32768 / C);

  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    acc_t mx[kBlock], lse[kBlock], sz[kBlock];
    int64_t n = 0;
    for (int64_t b0 = begin; b0 < end; b0 += n) {
      n = rows.block(b0, end, kBlock);
      const scalar_t* x = p.base + rows.offset(b0);  // row b0 + i at x + i
      cpu::class_major_stats(x, cs, n, C, want_sum, mx, lse, sz);
      if (tau == acc_t(0) && all_plain_rows(b0, n, mx, C, ignore_index, L)) {
        for (int64_t i = 0; i < n; ++i) {
          const int64_t b = b0 + i;
          const acc_t zy = static_cast<acc_t>(x[i + L.index_target(b) * cs]);
          p.loss[b] = ce_from_stats(lse[i], zy, sz[i], L.eps, C);
          p.lse[b] = lse[i];
          p.weight[b] = acc_t(1);
          p.index[b] = 0;
        }
        continue;
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = b0 + i, y = L.index_target(b);
        const TargetKind kind = classify_target(y, ignore_index, C);
        p.index[b] = 0;
        if (kind != TargetKind::kClass) {
          cpu::fill_skipped_sample(kind, 1, p.loss + b, p.lse + b, p.weight + b,
                                   static_cast<acc_t*>(nullptr));
          continue;
        }
        RowStats<acc_t> st{mx[i], acc_t(0), sz[i]};
        acc_t lse_b = lse[i];
        if (!cpu::is_finite(mx[i])) {  // all -inf / +inf / all NaN: the scalar online pass
          st = RowStats<acc_t>::empty();
          for (int64_t c = 0; c < C; ++c) st.add(static_cast<acc_t>(x[i + c * cs]), want_sum);
          lse_b = st.lse();
        }
        const acc_t loss =
            ce_from_stats(lse_b, static_cast<acc_t>(x[i + y * cs]), st.sumz, L.eps, C);
        if (tau == acc_t(0)) {
          p.lse[b] = lse_b;
          p.weight[b] = acc_t(1);
          p.loss[b] = loss;
          continue;
        }
        cpu::reduce_copies(
            1, tau,
            [&](int64_t, acc_t& lse_j) {
              lse_j = lse_b;
              return loss;
            },
            p.lse + b, p.weight + b, p.loss + b, p.index + b);
      }
    }
  });
}

// dL/dr of the valid samples [b0, b1) of a small-row block (sample_dradius): zt holds each row's
// z~_y - lse, turned into p~_y by one vectorised exp over the block (cpu::exp_inplace) instead of
// a libm call per row, whose latency dominated the per-sample loop.
template <typename Loss, typename scalar_t, typename acc_t>
void small_rows_dradius(const Loss& L, const ForwardRows<scalar_t, acc_t>& p, int64_t b0,
                        int64_t b1, acc_t* zt) {
  const int64_t k = p.k;
  cpu::exp_inplace(zt, (b1 - b0) * k);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t y = L.index_target(b);
    if (y < 0 || y >= p.C) continue;  // skipped sample: filled by fill_skipped_sample
    const acc_t* w_b = p.weight + b * k;
    const acc_t* p_y = zt + (b - b0) * k;
    acc_t dr = acc_t(0);
    for (int64_t j = 0; j < k; ++j) {
      if (w_b[j] == acc_t(0)) continue;
      dr += w_b[j] * dce_dradius_from_prob(p_y[j], L.eps, p.C);
    }
    p.dradius[b] = dr;
  }
}

// The plain-loss forward for rows of at most cpu::kSmallRow classes: the k rows of a block of
// samples are reduced together (cpu::small_rows_stats: the rows of a tile in the lanes of one
// vector instead of a short pass per row), then each sample's copies are reduced as in
// forward_impl. When the rows sit at one stride (k = 1, or the copies packed next to each other)
// they are read where they lie, the radius applied as each tile is loaded (cpu::RowShift);
// otherwise the robust rows are gathered into acc_t scratch first.
template <typename Loss>
void forward_small_rows(const at::Tensor& logits, const c10::optional<at::Tensor>& radius,
                        double temperature, int64_t ignore_index, const Loss& L,
                        WorstOfKForward& out) {
  using scalar_t = typename Loss::scalar_t;
  using acc_t = typename Loss::acc_t;
  const ForwardRows<scalar_t, acc_t> p(logits, radius, out);
  const int64_t B = p.B, k = p.k, C = p.C, sb = p.sb, sk = p.sk;
  const acc_t tau = static_cast<acc_t>(temperature);
  const bool want_sum = L.eps != acc_t(0);
  const bool direct = k == 1 || sb == k * sk;
  const int64_t row_stride = k == 1 ? sb : sk;                 // of the rows read in place (direct)
  const int64_t block = std::max<int64_t>(1, 1024 / (k * C));  // samples reduced together
  const int64_t grain = std::max<int64_t>(block, 32768 / (k * C));

  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> xs, es, rs, ts;
    Scratch<int64_t> ys;
    std::vector<RowStats<acc_t>> st;
    for (int64_t b0 = begin; b0 < end; b0 += block) {
      const int64_t b1 = std::min(end, b0 + block), rows = (b1 - b0) * k;
      st.resize(static_cast<size_t>(rows));
      acc_t* x = nullptr;  // the gathered robust rows (not direct)
      if (direct) {
        cpu::RowShift<acc_t> shift;
        if (p.rad) {  // each row's radius and target class (none for skipped samples)
          acc_t* r = rs.get(rows);
          int64_t* cls = ys.get(rows);
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t y = L.index_target(b);
            const bool valid = y >= 0 && y < C;
            for (int64_t j = 0; j < k; ++j) {
              r[(b - b0) * k + j] = valid ? p.rad[b] : acc_t(0);
              cls[(b - b0) * k + j] = valid ? y : -1;
            }
          }
          shift = {r, cls};
        }
        cpu::small_rows_stats(p.base + b0 * sb, row_stride, rows, C, want_sum, es.get(3 * rows),
                              st.data(), shift);
      } else {
        x = xs.get(rows * C);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t y = L.index_target(b);
          const bool valid = y >= 0 && y < C;
          const acc_t r = p.rad ? p.rad[b] : acc_t(0);
          for (int64_t j = 0; j < k; ++j) {
            const scalar_t* z = p.base + b * sb + j * sk;
            acc_t* xr = x + ((b - b0) * k + j) * C;
            if (!valid) {  // ignored / invalid sample: a zero row, never used
              std::fill(xr, xr + C, acc_t(0));
              continue;
            }
            for (int64_t c = 0; c < C; ++c) xr[c] = static_cast<acc_t>(z[c]) + r;
            xr[y] = robust_logit(static_cast<acc_t>(z[y]), true, r);
          }
        }
        cpu::small_rows_stats(x, C, rows, C, want_sum, es.get(3 * rows), st.data());
      }
      // The rows' logsumexps first, in a loop of their own: the log calls pipeline there, while
      // inside the branchy per-sample loop below each one stalled it.
      acc_t* lse_rows = p.lse + b0 * k;
      for (int64_t i = 0; i < rows; ++i) lse_rows[i] = st[static_cast<size_t>(i)].lse();
      acc_t* zt = ts.get(rows);  // z~_y - lse of each row, for dL/dr (0: skipped sample)
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t y = L.index_target(b);
        acc_t* lse_b = p.lse + b * k;
        acc_t* w_b = p.weight + b * k;
        p.index[b] = 0;
        const TargetKind kind = classify_target(y, ignore_index, C);
        if (kind != TargetKind::kClass)
          std::fill(zt + (b - b0) * k, zt + (b - b0 + 1) * k, acc_t(0));
        if (kind != TargetKind::kClass) {
          cpu::fill_skipped_sample(kind, k, p.loss + b, lse_b, w_b,
                                   p.dradius ? p.dradius + b : nullptr);
          continue;
        }
        const int64_t row0 = (b - b0) * k;
        const acc_t r = p.rad ? p.rad[b] : acc_t(0);
        cpu::reduce_copies(
            k, tau,
            [&](int64_t j, acc_t& lse_j) {
              const RowStats<acc_t>& sj = st[static_cast<size_t>(row0 + j)];
              lse_j = lse_rows[row0 + j];  // the same element: reduce_copies passes lse_b[j]
              const acc_t zy =
                  direct ? robust_logit(static_cast<acc_t>(p.base[b * sb + j * sk + y]), true, r)
                         : x[(row0 + j) * C + y];
              zt[row0 + j] = zy - lse_j;
              return ce_from_stats(lse_j, zy, sj.sumz, L.eps, C);
            },
            lse_b, w_b, p.loss + b, p.index + b);
      }
      if (p.dradius) small_rows_dradius(L, p, b0, b1, zt);
    }
  });
}

template <typename Loss>
void forward_impl(const at::Tensor& logits, const c10::optional<at::Tensor>& radius,
                  double temperature, int64_t ignore_index, const Loss& L, WorstOfKForward& out) {
  if constexpr (Loss::kSmallRowBatches) {
    const int64_t C = num_classes(logits);
    if (is_class_major(C, logits.stride(logits.dim() - 1))) {
      forward_class_major(logits, temperature, ignore_index, L, out);
      return;
    }
    if (C > 0 && C <= cpu::kSmallRow) {
      forward_small_rows(logits, radius, temperature, ignore_index, L, out);
      return;
    }
  }
  using scalar_t = typename Loss::scalar_t;
  using acc_t = typename Loss::acc_t;
  const ForwardRows<scalar_t, acc_t> p(logits, radius, out);
  const int64_t B = p.B, k = p.k, C = p.C, sb = p.sb, sk = p.sk;
  const acc_t tau = static_cast<acc_t>(temperature);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k * C));

  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> xs, as;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t y = L.index_target(b);
      acc_t* lse_b = p.lse + b * k;
      acc_t* w_b = p.weight + b * k;
      p.index[b] = 0;
      const TargetKind kind = L.soft() ? TargetKind::kClass : classify_target(y, ignore_index, C);
      if (kind != TargetKind::kClass) {
        cpu::fill_skipped_sample(kind, k, p.loss + b, lse_b, w_b,
                                 p.dradius ? p.dradius + b : nullptr);
        continue;
      }
      const acc_t r = p.rad ? p.rad[b] : acc_t(0);
      const scalar_t* zb = p.base + b * sb;
      acc_t asum = acc_t(0);  // A of index-target rows (the same for every copy)
      cpu::reduce_copies(
          k, tau,
          [&](int64_t j, acc_t& lse_j) {
            return L.row_loss(zb + j * sk, b, j, y, r, xs, as, lse_j, asum);
          },
          lse_b, w_b, p.loss + b, p.index + b);
      if (p.dradius) p.dradius[b] = sample_dradius(L, zb, sk, k, y, r, lse_b, w_b, asum);
    }
  });
}

// The backward's shapes and raw pointers, and the gradient of one row the general way.
template <typename Loss>
struct BackwardRows {
  using scalar_t = typename Loss::scalar_t;
  using acc_t = typename Loss::acc_t;
  const Loss& L;
  int64_t k, C, sb, sk, gb, gk, cs;
  const scalar_t* base;
  scalar_t* gbase;
  const acc_t* rad;  // nullptr without a radius
  const acc_t* g;
  const acc_t* lse;
  const acc_t* w;

  BackwardRows(const Loss& loss, const at::Tensor& grad_loss, const at::Tensor& logits,
               const c10::optional<at::Tensor>& radius, const at::Tensor& lse_t,
               const at::Tensor& weight, at::Tensor& grad)
      : L(loss),
        k(num_copies(logits)),
        C(num_classes(logits)),
        sb(logits.stride(0)),  // of 3-D logits (4-D ones are class-major: ClassMajorRows)
        sk(logits.stride(logits.dim() - 2)),
        gb(grad.stride(0)),
        gk(grad.stride(grad.dim() - 2)),
        cs(logits.stride(logits.dim() - 1)),
        base(logits.const_data_ptr<scalar_t>()),
        gbase(grad.mutable_data_ptr<scalar_t>()),
        rad(radius.has_value() ? radius->const_data_ptr<acc_t>() : nullptr),
        g(grad_loss.const_data_ptr<acc_t>()),
        lse(lse_t.const_data_ptr<acc_t>()),
        w(weight.const_data_ptr<acc_t>()) {}

  void row(int64_t row_id, Scratch<acc_t>& as) const {
    const int64_t b = row_id / k, j = row_id % k;
    scalar_t* out = gbase + b * gb + j * gk;
    const acc_t wr = w[row_id];
    if (wr == acc_t(0)) {  // unselected copy or ignored sample: zeros, logits not read
      std::fill(out, out + C, scalar_t(0));
      return;
    }
    const int64_t y = L.index_target(b);
    if (!L.soft() && (y < 0 || y >= C)) {  // invalid index target: NaN row (weight is NaN)
      std::fill(out, out + C, static_cast<scalar_t>(quiet_nan<acc_t>()));
      return;
    }
    L.grad_row(base + b * sb + j * sk, b, j, y, rad ? rad[b] : acc_t(0), lse[row_id], wr * g[b], as,
               out);
  }

  // Rows (b, j) at row_id * stride of the logits and of the gradient (k == 1, or copies packed
  // next to each other): the condition of the tiled plain backward.
  bool uniform_rows() const {
    return (k == 1 || (sb == k * sk && gb == k * gk)) && (k == 1 ? sb : sk) == (k == 1 ? gb : gk);
  }
};

// The plain-loss backward for rows of at most cpu::kSmallRow classes: tiles of kLanes rows go
// through cpu::softmax_grad_small_rows (the tile's rows in the lanes of one vector) when every row
// has a gradient (weight != 0, valid target); the target class is rewritten after, from the
// target logit read first (the in-place backward writes over the logits). Other tiles row by row.
template <typename Loss>
void backward_small_rows(const BackwardRows<Loss>& p, int64_t rows) {
  using acc_t = typename Loss::acc_t;
  constexpr int64_t kLanes = cpu::kLanes;
  const Loss& L = p.L;
  const int64_t C = p.C, stride = p.k == 1 ? p.sb : p.sk;
  const int64_t grain = std::max<int64_t>(kLanes, 32768 / C);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> as;
    for (int64_t t0 = begin; t0 < end; t0 += kLanes) {
      const int64_t n = std::min(kLanes, end - t0);
      acc_t r[kLanes], lse[kLanes], s[kLanes], zy[kLanes];
      int64_t y[kLanes];
      bool dense = true;
      for (int64_t i = 0; i < n && dense; ++i) {
        const int64_t row_id = t0 + i, b = row_id / p.k;
        y[i] = L.index_target(b);
        dense = p.w[row_id] != acc_t(0) && y[i] >= 0 && y[i] < C;
        if (!dense) break;
        r[i] = p.rad ? p.rad[b] : acc_t(0);
        lse[i] = p.lse[row_id];
        s[i] = p.w[row_id] * p.g[b];
        zy[i] = acc_t(p.base[row_id * stride + y[i]]);
      }
      if (!dense) {
        for (int64_t row_id = t0; row_id < t0 + n; ++row_id) p.row(row_id, as);
        continue;
      }
      cpu::softmax_grad_small_rows(p.base + t0 * stride, stride, n, C, r, lse, s, L.eps_over_c,
                                   p.gbase + t0 * stride, stride);
      // The target classes' p~_y in one vectorised exp (a libm call per row cost as much as the
      // rest of the row), then the target entries rewritten.
      for (int64_t i = 0; i < n; ++i) zy[i] = robust_logit(zy[i], true, r[i]) - lse[i];
      cpu::exp_inplace(zy, n);
      for (int64_t i = 0; i < n; ++i) {
        p.gbase[(t0 + i) * stride + y[i]] = static_cast<typename Loss::scalar_t>(
            ce_grad_from_prob(zy[i], true, L.eps, L.eps_over_c, s[i]));
      }
    }
  });
}

// The plain-loss backward of class-major rows (k = 1, the gradient laid out as the logits): blocks
// of consecutive rows, a few vectors per class (cpu::class_major_grad, which also applies the
// target class's term in its lanes); rows without a gradient (weight 0: zeros; an invalid target:
// NaN) are overwritten after.
template <typename Loss>
void backward_class_major(const BackwardRows<Loss>& p, const ClassMajorRows& layout, int64_t rows) {
  using scalar_t = typename Loss::scalar_t;
  using acc_t = typename Loss::acc_t;
  constexpr int64_t kBlock = 4 * cpu::kMajorTile;
  const Loss& L = p.L;
  const int64_t C = p.C, cs = p.cs;
  const int64_t grain = std::max<int64_t>(kBlock, 32768 / C);
  const acc_t q_off = acc_t(1) - L.eps;
  // kernel_layout gives class-major rows the plain loss only: no radius term to apply.
  TORCH_INTERNAL_ASSERT(p.rad == nullptr, "class-major rows with a radius");
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    acc_t lse[kBlock], s[kBlock];
    int32_t y[kBlock];
    int64_t n = 0;
    for (int64_t b0 = begin; b0 < end; b0 += n) {
      n = layout.block(b0, end, kBlock);
      const int64_t at = layout.offset(b0);  // row b0 + i at at + i, in the logits and gradient
      bool all_dense = true;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = b0 + i, yi = L.index_target(b);
        const bool dense = p.w[b] != acc_t(0) && yi >= 0 && yi < C;
        all_dense = all_dense && dense;
        y[i] = dense ? static_cast<int32_t>(yi) : -1;
        lse[i] = dense ? p.lse[b] : acc_t(0);
        s[i] = dense ? p.w[b] * p.g[b] : acc_t(0);
      }
      cpu::class_major_grad(p.base + at, cs, n, C, y, lse, s, L.eps_over_c, q_off, p.gbase + at);
      if (all_dense) continue;
      for (int64_t i = 0; i < n; ++i) {
        if (y[i] >= 0) continue;
        scalar_t* out = p.gbase + at + i;
        const scalar_t fill = p.w[b0 + i] == acc_t(0)
                                  ? scalar_t(0)  // unselected copy or ignored sample
                                  : static_cast<scalar_t>(quiet_nan<acc_t>());  // invalid target
        for (int64_t c = 0; c < C; ++c) out[c * cs] = fill;
      }
    }
  });
}

template <typename Loss>
void backward_impl(const at::Tensor& grad_loss, const at::Tensor& logits,
                   const c10::optional<at::Tensor>& radius, const at::Tensor& lse,
                   const at::Tensor& weight, const Loss& L, at::Tensor& grad) {
  using acc_t = typename Loss::acc_t;
  const BackwardRows<Loss> p(L, grad_loss, logits, radius, lse, weight, grad);
  const int64_t rows = num_rows(logits) * p.k, C = p.C;
  if constexpr (Loss::kSmallRowBatches) {
    if (is_class_major(C, p.cs)) {
      backward_class_major(p, ClassMajorRows(logits), rows);
      return;
    }
    if (C > 0 && C <= cpu::kSmallRow && p.uniform_rows()) {
      backward_small_rows(p, rows);
      return;
    }
  }
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> as;
    for (int64_t row_id = begin; row_id < end; ++row_id) p.row(row_id, as);
  });
}

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

// Builds the loss policy for the logits' dtype (and the soft target's) and runs body(loss).
template <typename Body>
void with_loss(bool weighted, const at::Tensor& logits, const at::Tensor& tgt,
               const c10::optional<at::Tensor>& class_weight, double label_smoothing, Body&& body) {
  const int64_t C = num_classes(logits);
  if (weighted) {
    dispatch_weighted(logits, tgt, [&](auto s, auto t) {
      body(WeightedLoss<decltype(s), decltype(t)>(tgt, class_weight, label_smoothing, C));
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "worst_of_k_ce_cpu",
      [&] { body(PlainLoss<scalar_t>(tgt, class_weight, label_smoothing, C)); });
}

// How the CPU ops read the logits (kernel_layout): class-major rows of any class count.
KernelLayout layout_of(const at::Tensor& logits, const at::Tensor& target,
                       const c10::optional<at::Tensor>& radius,
                       const c10::optional<at::Tensor>& class_weight) {
  return kernel_layout(logits, target, radius, class_weight, std::numeric_limits<int64_t>::max());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> worst_of_k_ce_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& radius,
    double temperature, double label_smoothing, int64_t ignore_index,
    const c10::optional<at::Tensor>& class_weight) {
  const KernelLayout layout = layout_of(logits, target, radius, class_weight);
  if (layout == KernelLayout::kCopy) {
    return worst_of_k_ce_fwd_cpu(rows_copy(logits), target, radius, temperature, label_smoothing,
                                 ignore_index, class_weight);
  }
  const bool weighted = check_worst_of_k_args(logits, target, radius, class_weight,
                                              layout == KernelLayout::kClassMajor);
  WorstOfKForward out = WorstOfKForward::allocate(logits, radius.has_value());
  const at::Tensor tgt = is_soft_target(target) ? target : target.contiguous();
  const c10::optional<at::Tensor> rad = contiguous(radius), cw = contiguous(class_weight);
  with_loss(weighted, logits, tgt, cw, label_smoothing,
            [&](const auto& L) { forward_impl(logits, rad, temperature, ignore_index, L, out); });
  return out.as_tuple();
}

// The backward into `grad`, which may be the logits themselves: each row is read before it is
// written (the target logit is read first, since it is rewritten after the row loop).
void backward_into(bool weighted, const at::Tensor& grad_loss, const at::Tensor& logits,
                   const at::Tensor& target, const c10::optional<at::Tensor>& radius,
                   const at::Tensor& lse, const at::Tensor& weight, double label_smoothing,
                   const c10::optional<at::Tensor>& class_weight, at::Tensor& grad) {
  const at::Tensor g = grad_loss.contiguous();
  const at::Tensor tgt = is_soft_target(target) ? target : target.contiguous();
  const c10::optional<at::Tensor> rad = contiguous(radius), cw = contiguous(class_weight);
  with_loss(weighted, logits, tgt, cw, label_smoothing,
            [&](const auto& L) { backward_impl(g, logits, rad, lse, weight, L, grad); });
}

at::Tensor worst_of_k_ce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                 const at::Tensor& target, const c10::optional<at::Tensor>& radius,
                                 const at::Tensor& lse, const at::Tensor& weight,
                                 double label_smoothing, int64_t ignore_index,
                                 const c10::optional<at::Tensor>& class_weight) {
  const KernelLayout layout = layout_of(logits, target, radius, class_weight);
  at::Tensor grad = at::empty_like(logits);
  if (backward_through_copy(layout, logits, grad)) {
    grad.copy_(worst_of_k_ce_bwd_cpu(grad_loss, rows_copy(logits), target, radius, lse, weight,
                                     label_smoothing, ignore_index, class_weight)
                   .view(grad.sizes()));
    return grad;
  }
  const bool weighted = check_worst_of_k_backward(grad_loss, logits, target, radius, lse, weight,
                                                  class_weight, layout != KernelLayout::kRows);
  (void)ignore_index;  // ignored samples arrive with weight 0
  backward_into(weighted, grad_loss, logits, target, radius, lse, weight, label_smoothing,
                class_weight, grad);
  return grad;
}

void worst_of_k_ce_bwd_inplace_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                   const at::Tensor& target,
                                   const c10::optional<at::Tensor>& radius, const at::Tensor& lse,
                                   const at::Tensor& weight, double label_smoothing,
                                   int64_t ignore_index,
                                   const c10::optional<at::Tensor>& class_weight) {
  const KernelLayout layout = layout_of(logits, target, radius, class_weight);
  if (layout == KernelLayout::kCopy) {
    check_inplace_backward(logits, target);
    const at::Tensor rows = rows_copy(logits);
    worst_of_k_ce_bwd_inplace_cpu(grad_loss, rows, target, radius, lse, weight, label_smoothing,
                                  ignore_index, class_weight);
    copy_rows_back(logits, rows);
    return;
  }
  const bool weighted = check_worst_of_k_backward(grad_loss, logits, target, radius, lse, weight,
                                                  class_weight, layout != KernelLayout::kRows);
  check_inplace_backward(logits, target);
  (void)ignore_index;
  at::Tensor out = logits;  // the same storage: the gradient replaces the logits
  backward_into(weighted, grad_loss, logits, target, radius, lse, weight, label_smoothing,
                class_weight, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmargin, CPU, m) {
  m.impl("worst_of_k_ce_fwd", &worst_of_k_ce_fwd_cpu);
  m.impl("worst_of_k_ce_bwd", &worst_of_k_ce_bwd_cpu);
  m.impl("worst_of_k_ce_bwd_inplace", &worst_of_k_ce_bwd_inplace_cpu);
}

}  // namespace fastmargin
