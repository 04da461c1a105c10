// Reverse-mode autograd of the worst-of-k cross-entropy, in C++: the Autograd kernel of
// fastmargin::worst_of_k_ce_fwd (CPU and CUDA alike), and the reduced loss of the eager fast path
// (fastmargin/_fast_path.py, csrc/python/module.cpp) as one node.
//
// Why C++: a backward registered from Python (torch.library.register_autograd) costs about
// 100 us per forward + backward on the host (the Python autograd kernel, its argument
// normalisation and the Python node in the engine), more than the whole F.cross_entropy step on
// small batches. torch.compile traces this node as it traces any C++ autograd kernel (the ops it
// calls have fake kernels in fastmargin/_ops.py), and opcheck sees an Autograd registration.
//
// One node also covers F.cross_entropy's 'mean' / 'sum' reduction for the fast path: the forward
// reduces with the same function as fastmargin::reduce_cross_entropy, and the backward turns the
// scalar's gradient into the per-sample one exactly as autograd of that reduction would
// (g / divisor, broadcast over the samples), saving two nodes and their host time.
//
// First order (grad mode off while the backward runs: every .backward() and compiled graph)
// calls the fused backward op. With create_graph=True the gradient must itself be
// differentiable, so the backward calls fastmargin::worst_of_k_ce_bwd_composite instead: an op
// whose kernel (CompositeImplicitAutograd, registered in fastmargin/_ops.py) differentiates the
// op's composite PyTorch form, so autograd records every step of it.
#include "fastmargin/worst_of_k_ce_autograd.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Reduction.h>
#include <torch/autograd.h>
#include <c10/util/strides.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "fastmargin/op_handles.h"
#include "fastmargin/reduce_cross_entropy.h"

namespace fastmargin {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Defined from Python (fastmargin/_ops.py) when the package is imported, so looked up on first
// use rather than at library load.
using CompositeGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using CompositeSignature = CompositeGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const c10::optional<at::Tensor>&,
                                          const c10::optional<at::Tensor>&, const at::Tensor&,
                                          double, double, int64_t, bool, bool, bool);
const c10::TypedOperatorHandle<CompositeSignature>& composite_backward_op() {
  static const auto op = find_op<CompositeSignature>("fastmargin::worst_of_k_ce_bwd_composite");
  return op;
}

c10::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// dL/dp for probability targets (one logits-sized temporary; not fused). With
// l_bj = sum_c w_c ((1 - eps) p_c + eps / C) (lse_bj - z_bjc):
// dL/dp_bjc = g_b * weight_bj * (1 - eps) * w_c * (lse_bj - z_bjc), summed over the copies j
// when the k copies share one (B, C) target row.
at::Tensor soft_target_grad(const at::Tensor& grad_loss, const at::Tensor& logits,
                            const at::Tensor& target, const at::Tensor& lse,
                            const at::Tensor& weight, const at::Tensor& class_weight,
                            double label_smoothing) {
  const at::Tensor scale = (grad_loss.unsqueeze(1) * weight) * (1.0 - label_smoothing);  // (B, k)
  at::Tensor g = (lse.unsqueeze(2) - logits.to(lse.scalar_type())) * scale.unsqueeze(2);
  if (class_weight.defined()) g = g * class_weight;
  if (target.dim() == 2) g = g.sum(1);
  return g.to(target.scalar_type());
}

// The divisor of 'mean' (see reduce_cross_entropy.h) as a 0-d tensor: the batch size B for
// probability targets, else the number of samples not ignored (or their class weights). CPU
// class indices without class weights are counted on the host, one pass over B integers, which
// is cheaper than the three small ATen ops of the general form. This runs only for the reduced
// loss of the eager fast path, whose tensors are plain (no fake tensors or subclasses:
// fastmargin/_fast_path.py).
at::Tensor mean_divisor(const at::Tensor& target, int64_t ignore_index,
                        const c10::optional<at::Tensor>& class_weight) {
  const auto as_long = target.options().dtype(at::kLong);
  if (target.is_floating_point()) return at::scalar_tensor(target.size(0), as_long);
  if (!target.device().is_cpu() || class_weight.has_value()) {
    return index_target_normaliser(target, ignore_index, class_weight);
  }
  const int64_t* y = target.const_data_ptr<int64_t>();
  const int64_t n = target.size(0), stride = target.stride(0);
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += y[i * stride] != ignore_index;
  return at::scalar_tensor(count, as_long);
}

// The (B, k, C) rows of logits in `layout` (see worst_of_k_ce_autograd.h), a view: for contiguous
// spatial logits (N, C, d1, ...) the (N, S, 1, C) rows of their memory (N, C, S), row n * S + s
// at n * C * S + s, class stride S, which the ops read in place (or copy inside the op where a
// device's kernels do not: worst_of_k_ce.h's kernel_layout). Inside the node, so that no view node
// of its own is recorded: one node per loss.
at::Tensor rows_of(const at::Tensor& logits, int64_t layout) {
  if (layout == kCopiesFirst) return logits.transpose(0, 1);
  if (layout == kOneCopy) return logits.unsqueeze(1);
  if (layout == kSpatial) {  // one as_strided, not view + permute: two ops of host time
    const int64_t N = logits.size(0), C = logits.size(1), S = logits.numel() / (N * C);
    return logits.as_strided({N, S, 1, C}, {C * S, 1, C * S, S});
  }
  return logits;
}

// The rows of spatial logits as differentiable PyTorch ops (the create_graph path differentiates
// through them; the values equal rows_of's).
at::Tensor differentiable_spatial_rows(const at::Tensor& logits) {
  const int64_t C = logits.size(1);
  return logits.movedim(1, -1).reshape({-1, 1, C});
}

// Whether (N, S, 1, C) rows lie as contiguous (N, C, S) logits (rows_of's in-place view, and
// empty_like of it).
bool lies_as_contiguous_logits(const at::Tensor& rows) {
  if (rows.dim() != 4) return false;
  const int64_t S = rows.size(1), C = rows.size(3);
  return rows.stride(0) == S * C && rows.stride(1) == 1 && rows.stride(3) == S;
}

// A gradient of the rows, back in the logits' layout (a view).
at::Tensor grad_in_layout(const at::Tensor& grad_rows, int64_t layout, at::IntArrayRef shape) {
  if (layout == kCopiesFirst) return grad_rows.transpose(0, 1);
  if (layout == kOneCopy) return grad_rows.squeeze(1);
  // (N * d1 * ..., 1, C) or (N, S, 1, C) -> (N, d1, ..., C) -> (N, C, d1, ...), a view. The
  // gradient of in-place rows lies as the contiguous logits do: one as_strided (host time), and
  // AccumulateGrad takes it as it is.
  if (layout == kSpatial && lies_as_contiguous_logits(grad_rows)) {
    return grad_rows.as_strided(shape, c10::contiguous_strides(shape));
  }
  if (layout == kSpatial) {
    std::vector<int64_t> class_last(shape.begin(), shape.end());
    class_last.erase(class_last.begin() + 1);
    class_last.push_back(shape[1]);
    return grad_rows.reshape(class_last).movedim(-1, 1);
  }
  return grad_rows;
}

// F.cross_entropy's reduction of the per-sample losses (as fastmargin::reduce_cross_entropy
// computes it); *divisor is set for 'mean'.
at::Tensor reduce_forward(const at::Tensor& per_sample, const at::Tensor& target,
                          int64_t ignore_index, const c10::optional<at::Tensor>& class_weight,
                          int64_t reduction, at::Tensor* divisor) {
  at::Tensor total = per_sample.sum();
  if (reduction == at::Reduction::Sum) return total;
  *divisor = mean_divisor(target, ignore_index, class_weight);
  if (total.device().is_cpu() && divisor->device().is_cpu() &&
      divisor->scalar_type() == at::kLong) {
    // A count on the CPU: the same rounded division (the count converted to the sum's dtype,
    // as ATen's division by an integer tensor converts it), done on the host into the fresh
    // sum, which nothing else has seen yet, instead of one more ATen op.
    const int64_t count = divisor->const_data_ptr<int64_t>()[0];
    AT_DISPATCH_FLOATING_TYPES(total.scalar_type(), "worst_of_k_mean", [&] {
      scalar_t* value = total.mutable_data_ptr<scalar_t>();
      *value = *value / static_cast<scalar_t>(count);
    });
    return total;
  }
  return total / *divisor;
}

// The per-sample gradient (B,) for the reduced loss's gradient g: g / divisor ('mean') or g
// ('sum') for every sample, as autograd of sum() and of the division computes it.
at::Tensor reduce_backward(const at::Tensor& grad, int64_t batch, const at::Tensor& divisor) {
  const bool count = !divisor.defined() || divisor.scalar_type() == at::kLong;
  if (count && grad.device().is_cpu() && (!divisor.defined() || divisor.device().is_cpu()) &&
      !at::GradMode::is_enabled()) {
    // First order on the CPU: the same float division done once on the host, then one fill,
    // instead of a division, an expand and a copy as ATen ops.
    return AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "worst_of_k_reduce_backward", [&] {
      scalar_t g = *grad.const_data_ptr<scalar_t>();
      if (divisor.defined()) g = g / static_cast<scalar_t>(divisor.const_data_ptr<int64_t>()[0]);
      return at::full({batch}, g, grad.options());
    });
  }
  return (divisor.defined() ? grad / divisor : grad).expand({batch});
}

// The op's per-row statistics, handed out of the autograd Function beside its outputs: they
// are not differentiable, and returning them as outputs would need mark_non_differentiable,
// which compiled autograd does not support.
struct Statistics {
  at::Tensor lse, weight, dradius;
};

struct WorstOfKCrossEntropy : public torch::autograd::Function<WorstOfKCrossEntropy> {
  // Outputs: (loss, index); the loss per sample for reduction None, else the 0-d reduced loss.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& target, const c10::optional<at::Tensor>& radius,
                               double temperature, double label_smoothing, int64_t ignore_index,
                               const c10::optional<at::Tensor>& class_weight, int64_t reduction,
                               int64_t layout, Statistics* statistics) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor rows = rows_of(logits, layout);
    auto [loss, lse, weight, index, dradius] = worst_of_k_ce_fwd_op().call(
        rows, target, radius, temperature, label_smoothing, ignore_index, class_weight);
    at::Tensor divisor;  // set for 'mean'
    if (reduction != at::Reduction::None) {
      loss = reduce_forward(loss, target, ignore_index, class_weight, reduction, &divisor);
    }
    ctx->save_for_backward({logits, target, radius.value_or(at::Tensor()), lse, weight, dradius,
                            class_weight.value_or(at::Tensor()), index, divisor});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["layout"] = layout;
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the statistics outputs
    // Outputs: the loss and the (integer, so never differentiable) index. The statistics are
    // saved tensors, not outputs (fewer outputs to wrap; saved non-outputs unpack without a new
    // tensor each), and are handed to the op's Autograd kernel through *statistics.
    if (statistics != nullptr) *statistics = {lse, weight, dradius};
    return {loss, index};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(10);  // one per forward argument; undefined = no gradient
    at::Tensor grad_loss = grads[0];
    if (!grad_loss.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const int64_t layout = ctx->saved_data["layout"].toInt();
    // The rows of the logits (with create_graph=True differentiable functions of them).
    const at::Tensor& input = saved[0];
    const at::Tensor logits = layout == kSpatial && at::GradMode::is_enabled()
                                  ? differentiable_spatial_rows(input)
                                  : rows_of(input, layout);
    const at::Tensor &target = saved[1], &radius = saved[2], &lse = saved[3], &weight = saved[4],
                     &dradius = saved[5], &class_weight = saved[6], &index = saved[7],
                     &divisor = saved[8];
    const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const bool need_logits = ctx->needs_input_grad(0);
    const bool need_target = ctx->needs_input_grad(1) && target.is_floating_point();
    // Gradient edges exist for tensor arguments only: radius is edge 2 when it is given.
    const bool need_radius = radius.defined() && ctx->needs_input_grad(2);

    if (ctx->saved_data["reduction"].toInt() != at::Reduction::None) {
      grad_loss = reduce_backward(grad_loss, lse.size(0), divisor);
    }

    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable gradient
      auto [g_logits, g_target, g_radius] = composite_backward_op().call(
          grad_loss, logits, target, optional_of(radius), optional_of(class_weight), index,
          ctx->saved_data["temperature"].toDouble(), label_smoothing, ignore_index, need_logits,
          need_target, need_radius);
      if (need_logits) out[0] = grad_in_layout(g_logits, layout, input.sizes());
      if (need_target) out[1] = g_target;
      if (need_radius) out[2] = g_radius;
      return out;
    }
    grad_loss = grad_loss.to(lse.scalar_type()).contiguous();
    // Grad mode is off here: skip the Autograd key's fallback for the backward op (it has no
    // autograd of its own) and call the kernel directly.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (need_logits) {
      out[0] = grad_in_layout(
          worst_of_k_ce_bwd_op().call(grad_loss, logits, target, optional_of(radius), lse, weight,
                                      label_smoothing, ignore_index, optional_of(class_weight)),
          layout, input.sizes());
    }
    if (need_target) {
      out[1] =
          soft_target_grad(grad_loss, logits, target, lse, weight, class_weight, label_smoothing);
    }
    if (need_radius) out[2] = grad_loss * dradius;
    return out;
  }
};

WorstOfKFwdResult worst_of_k_ce_fwd_autograd(const at::Tensor& logits, const at::Tensor& target,
                                             const c10::optional<at::Tensor>& radius,
                                             double temperature, double label_smoothing,
                                             int64_t ignore_index,
                                             const c10::optional<at::Tensor>& class_weight) {
  Statistics stats;
  auto r = WorstOfKCrossEntropy::apply(logits, target, radius, temperature, label_smoothing,
                                       ignore_index, class_weight, int64_t{at::Reduction::None},
                                       int64_t{kRowsAsGiven}, &stats);
  return {r[0], stats.lse, stats.weight, r[1], stats.dradius};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> worst_of_k_ce_loss(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& radius,
    double temperature, double label_smoothing, int64_t ignore_index,
    const c10::optional<at::Tensor>& class_weight, int64_t reduction, int64_t layout) {
  auto r = WorstOfKCrossEntropy::apply(logits, target, radius, temperature, label_smoothing,
                                       ignore_index, class_weight, reduction, layout,
                                       static_cast<Statistics*>(nullptr));
  return {r[0], r[1]};
}

TORCH_LIBRARY_IMPL(fastmargin, Autograd, m) {
  m.impl("worst_of_k_ce_fwd", &worst_of_k_ce_fwd_autograd);
}

}  // namespace fastmargin
