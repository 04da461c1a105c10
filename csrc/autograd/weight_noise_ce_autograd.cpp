// Reverse-mode autograd of fastmargin::weight_noise_ce_fwd in C++ (its Autograd kernel, CPU and
// CUDA alike), for the reason the worst-of-k cross-entropy's is (worst_of_k_ce_autograd.cpp):
// the backward registered from Python was most of the host time of a small call.
//
// The forward saves the logits, the (2,) Philox state and the statistics, never the noise: the
// backward regenerates it (fastmargin::weight_noise_ce_bwd gives the logits' and the scale's
// gradient in one pass). With create_graph=True the backward calls
// fastmargin::weight_noise_ce_bwd_composite (defined in fastmargin/_ops.py, a
// CompositeImplicitAutograd op that differentiates the composite form with the same noise and
// the same selected copies), so the gradient is itself differentiable. Forward-mode AD and
// functorch transforms never reach this node: the public function runs the composite form under
// them (fastmargin/_routes.py).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "fastmargin/op_handles.h"

namespace fastmargin {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Pair = std::tuple<at::Tensor, at::Tensor>;
// (logits, target, scale, philox, k, temperature, label_smoothing, ignore_index)
using FwdSignature = FwdResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, int64_t, double, double, int64_t);
// (grad_loss, logits, target, scale, philox, lse, weight, label_smoothing, ignore_index)
using BwdSignature = Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, double, int64_t);
// (grad_loss, logits, target, scale, philox, index, k, temperature, label_smoothing,
//  ignore_index, need_grad_logits, need_grad_scale)
using CompositeSignature = Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                double, double, int64_t, bool, bool);

const c10::TypedOperatorHandle<FwdSignature>& forward_op() {
  static const auto op = find_op<FwdSignature>("fastmargin::weight_noise_ce_fwd");
  return op;
}

const c10::TypedOperatorHandle<BwdSignature>& backward_op() {
  static const auto op = find_op<BwdSignature>("fastmargin::weight_noise_ce_bwd");
  return op;
}

const c10::TypedOperatorHandle<CompositeSignature>& composite_backward_op() {
  static const auto op = find_op<CompositeSignature>("fastmargin::weight_noise_ce_bwd_composite");
  return op;
}

struct WeightNoiseCrossEntropy : public torch::autograd::Function<WeightNoiseCrossEntropy> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& target, const at::Tensor& scale,
                               const at::Tensor& philox, int64_t k, double temperature,
                               double label_smoothing, int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, lse, weight, index] = forward_op().call(logits, target, scale, philox, k,
                                                        temperature, label_smoothing, ignore_index);
    // The noise is not saved: the backward regenerates it from the (2,) Philox state.
    ctx->save_for_backward({logits, target, scale, philox, lse, weight, index});
    ctx->saved_data["k"] = k;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({lse, weight, index});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the statistics outputs
    return {loss, lse, weight, index};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);  // one per forward argument; undefined = no gradient
    const bool need_logits = ctx->needs_input_grad(0), need_scale = ctx->needs_input_grad(2);
    if (!grads[0].defined() || !(need_logits || need_scale)) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &target = saved[1], &scale = saved[2], &philox = saved[3],
                     &lse = saved[4], &weight = saved[5], &index = saved[6];
    const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    at::Tensor grad_logits, grad_scale;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable gradient
      std::tie(grad_logits, grad_scale) = composite_backward_op().call(
          grads[0], logits, target, scale, philox, index, ctx->saved_data["k"].toInt(),
          ctx->saved_data["temperature"].toDouble(), label_smoothing, ignore_index, need_logits,
          need_scale);
    } else {
      const at::Tensor grad_loss = grads[0].to(lse.scalar_type()).contiguous();
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // the op has no autograd of its own
      // One pass gives both gradients (the scale's is a by-product of the logits' pass).
      std::tie(grad_logits, grad_scale) = backward_op().call(
          grad_loss, logits, target, scale, philox, lse, weight, label_smoothing, ignore_index);
    }
    if (need_logits) out[0] = grad_logits;
    if (need_scale) out[2] = grad_scale;
    return out;
  }
};

FwdResult weight_noise_ce_fwd_autograd(const at::Tensor& logits, const at::Tensor& target,
                                       const at::Tensor& scale, const at::Tensor& philox, int64_t k,
                                       double temperature, double label_smoothing,
                                       int64_t ignore_index) {
  auto r = WeightNoiseCrossEntropy::apply(logits, target, scale, philox, k, temperature,
                                          label_smoothing, ignore_index);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmargin, Autograd, m) {
  m.impl("weight_noise_ce_fwd", &weight_noise_ce_fwd_autograd);
}

}  // namespace fastmargin
