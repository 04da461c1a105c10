// Reverse-mode autograd of fastmargin::worst_of_k_ce_fwd, registered in C++ on the Autograd key
// (CPU and CUDA alike).
//
// Why C++: a backward registered from Python (torch.library.register_autograd) costs about
// 100 us per forward + backward on the host (the Python autograd kernel, its argument
// normalisation and the Python node in the engine), more than the whole F.cross_entropy step on
// small batches. Here the node is a C++ node; torch.compile traces it as it traces any C++
// autograd kernel (the forward and backward ops it calls have fake kernels in
// fastmargin/_ops.py), and opcheck sees an Autograd registration.
//
// First order (grad mode off while the backward runs: every .backward() and compiled graph)
// calls the fused backward op. With create_graph=True the gradient must itself be
// differentiable, so the backward calls fastmargin::worst_of_k_ce_bwd_composite instead: an op
// whose kernel (CompositeImplicitAutograd, registered in fastmargin/_ops.py) differentiates the
// op's composite PyTorch form, so autograd records every step of it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace fastmargin {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

const c10::TypedOperatorHandle<FwdResult(const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, double, double, int64_t,
                                         const c10::optional<at::Tensor>&)>&
forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmargin::worst_of_k_ce_fwd", "")
          .typed<FwdResult(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           double, double, int64_t, const c10::optional<at::Tensor>&)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, double, int64_t, const c10::optional<at::Tensor>&)>&
backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmargin::worst_of_k_ce_bwd", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                            double, int64_t, const c10::optional<at::Tensor>&)>();
  return op;
}

// Defined from Python (fastmargin/_ops.py) when the package is imported, so looked up on first
// use rather than at library load.
using CompositeGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
const c10::TypedOperatorHandle<CompositeGrads(const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const c10::optional<at::Tensor>&,
                                              const c10::optional<at::Tensor>&, const at::Tensor&,
                                              double, double, int64_t, bool, bool, bool)>&
composite_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmargin::worst_of_k_ce_bwd_composite", "")
          .typed<CompositeGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                const at::Tensor&, double, double, int64_t, bool, bool, bool)>();
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

struct WorstOfKCrossEntropy : public torch::autograd::Function<WorstOfKCrossEntropy> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& target, const c10::optional<at::Tensor>& radius,
                               double temperature, double label_smoothing, int64_t ignore_index,
                               const c10::optional<at::Tensor>& class_weight) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, lse, weight, index, dradius] = forward_op().call(
        logits, target, radius, temperature, label_smoothing, ignore_index, class_weight);
    ctx->save_for_backward({logits, target, radius.value_or(at::Tensor()), lse, weight, dradius,
                            class_weight.value_or(at::Tensor()), index});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({lse, weight, index, dradius});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the statistics outputs
    return {loss, lse, weight, index, dradius};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);  // one per forward argument; undefined = no gradient
    at::Tensor grad_loss = grads[0];
    if (!grad_loss.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &target = saved[1], &radius = saved[2], &lse = saved[3],
                     &weight = saved[4], &dradius = saved[5], &class_weight = saved[6],
                     &index = saved[7];
    const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const bool need_logits = ctx->needs_input_grad(0);
    const bool need_target = ctx->needs_input_grad(1) && target.is_floating_point();
    // Gradient edges exist for tensor arguments only: radius is edge 2 when it is given.
    const bool need_radius = radius.defined() && ctx->needs_input_grad(2);

    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable gradient
      auto [g_logits, g_target, g_radius] = composite_backward_op().call(
          grad_loss, logits, target, optional_of(radius), optional_of(class_weight), index,
          ctx->saved_data["temperature"].toDouble(), label_smoothing, ignore_index, need_logits,
          need_target, need_radius);
      if (need_logits) out[0] = g_logits;
      if (need_target) out[1] = g_target;
      if (need_radius) out[2] = g_radius;
      return out;
    }
    grad_loss = grad_loss.to(lse.scalar_type()).contiguous();
    if (need_logits) {
      out[0] = backward_op().call(grad_loss, logits, target, optional_of(radius), lse, weight,
                                  label_smoothing, ignore_index, optional_of(class_weight));
    }
    if (need_target) {
      out[1] =
          soft_target_grad(grad_loss, logits, target, lse, weight, class_weight, label_smoothing);
    }
    if (need_radius) out[2] = grad_loss * dradius;
    return out;
  }
};

FwdResult worst_of_k_ce_fwd_autograd(const at::Tensor& logits, const at::Tensor& target,
                                     const c10::optional<at::Tensor>& radius, double temperature,
                                     double label_smoothing, int64_t ignore_index,
                                     const c10::optional<at::Tensor>& class_weight) {
  auto r = WorstOfKCrossEntropy::apply(logits, target, radius, temperature, label_smoothing,
                                       ignore_index, class_weight);
  return {r[0], r[1], r[2], r[3], r[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmargin, Autograd, m) {
  m.impl("worst_of_k_ce_fwd", &worst_of_k_ce_fwd_autograd);
}

}  // namespace fastmargin
