// Reverse-mode autograd of fastmargin::multiclass_margin_fwd in C++ (its Autograd kernel, CPU and
// CUDA alike), for the reason the worst-of-k cross-entropy's is (worst_of_k_ce_autograd.cpp):
// the backward registered from Python was most of the host time of a small call.
//
// m_n = z_{n,y_n} - max_{c != y_n} z_{n,c}; the forward saves only the targets and the (N,)
// runner-up classes (a second, non-differentiable output), and the backward writes +g at the
// target and -g at the runner-up (fastmargin::multiclass_margin_bwd, which never reads the
// logits). With create_graph=True the backward op is called through its own autograd (registered
// in fastmargin/_ops.py: it is linear in g), so higher order stays exact; otherwise below the
// Autograd key, straight to the kernel. Forward-mode AD and functorch transforms never reach
// this node: the public function runs the composite form under them (fastmargin/_routes.py).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "fastmargin/op_handles.h"

namespace fastmargin {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Pair = std::tuple<at::Tensor, at::Tensor>;
// (grad_margin, target, runner_up, num_classes, dtype) -> grad_logits
using BwdSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                c10::SymInt, at::ScalarType);

const c10::TypedOperatorHandle<Pair(const at::Tensor&, const at::Tensor&)>& forward_op() {
  static const auto op =
      find_op<Pair(const at::Tensor&, const at::Tensor&)>("fastmargin::multiclass_margin_fwd");
  return op;
}

const c10::TypedOperatorHandle<BwdSignature>& backward_op() {
  static const auto op = find_op<BwdSignature>("fastmargin::multiclass_margin_bwd");
  return op;
}

struct MulticlassMargin : public torch::autograd::Function<MulticlassMargin> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& target) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [margin, runner_up] = forward_op().call(logits, target);
    ctx->save_for_backward({target, runner_up});  // O(N) integers, not the logits
    ctx->saved_data["num_classes"] = logits.sym_size(1);
    ctx->saved_data["dtype"] = logits.scalar_type();
    ctx->mark_non_differentiable({runner_up});
    ctx->set_materialize_grads(false);  // no zero-filled gradient for the runner-up output
    return {margin, runner_up};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(2);  // (d/dlogits, none for the target)
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return out;
    const auto saved = ctx->get_saved_variables();
    const at::ScalarType dtype = ctx->saved_data["dtype"].toScalarType();
    const c10::SymInt C = ctx->saved_data["num_classes"].toSymInt();
    const auto stats = dtype == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor grad = grads[0].to(stats).contiguous();
    if (at::GradMode::is_enabled()) {  // create_graph=True: through the op's own autograd
      out[0] = backward_op().call(grad, saved[0], saved[1], C, dtype);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out[0] = backward_op().call(grad, saved[0], saved[1], C, dtype);
    }
    return out;
  }
};

Pair multiclass_margin_fwd_autograd(const at::Tensor& logits, const at::Tensor& target) {
  auto r = MulticlassMargin::apply(logits, target);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmargin, Autograd, m) {
  m.impl("multiclass_margin_fwd", &multiclass_margin_fwd_autograd);
}

}  // namespace fastmargin
