// Reverse-mode autograd of fastmargin::all_layer_perturb_fwd in C++ (its Autograd kernel, CPU and
// CUDA alike), for the reason the worst-of-k cross-entropy's is (worst_of_k_ce_autograd.cpp): a
// backward registered from Python cost about 60 us of host time per forward + backward, four
// times the two kernels on small activations, and AMO calls the op once per perturbed layer.
//
// out = u + ||u_b|| delta, with norm (B,) a second, non-differentiable output saved for the
// backward. First order calls the fused backward op; with create_graph=True the backward calls
// fastmargin::all_layer_perturb_bwd_composite (defined in fastmargin/_ops.py, a
// CompositeImplicitAutograd op that differentiates the composite form), so that the gradient is
// itself differentiable. Forward-mode AD and functorch transforms never reach this node: the
// public function runs the composite form under them (fastmargin/_routes.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "fastmargin/op_handles.h"

namespace fastmargin {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Pair = std::tuple<at::Tensor, at::Tensor>;
using FwdSignature = Pair(const at::Tensor&, const at::Tensor&);
// (grad, u, delta, norm, need_grad_u, need_grad_delta) -> (grad_u, grad_delta)
using BwdSignature = Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, bool, bool);
// (grad, u, delta, need_grad_u, need_grad_delta) -> (grad_u, grad_delta)
using CompositeSignature = Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                bool);

const c10::TypedOperatorHandle<FwdSignature>& forward_op() {
  static const auto op = find_op<FwdSignature>("fastmargin::all_layer_perturb_fwd");
  return op;
}

const c10::TypedOperatorHandle<BwdSignature>& backward_op() {
  static const auto op = find_op<BwdSignature>("fastmargin::all_layer_perturb_bwd");
  return op;
}

// Defined from Python when the package is imported: looked up on first use.
const c10::TypedOperatorHandle<CompositeSignature>& composite_backward_op() {
  static const auto op = find_op<CompositeSignature>("fastmargin::all_layer_perturb_bwd_composite");
  return op;
}

struct AllLayerPerturb : public torch::autograd::Function<AllLayerPerturb> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& u, const at::Tensor& delta) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, norm] = forward_op().call(u, delta);
    ctx->save_for_backward({u, delta, norm});
    ctx->mark_non_differentiable({norm});
    ctx->set_materialize_grads(false);  // no zero-filled gradient for the norm output
    return {out, norm};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(2);  // (d/du, d/ddelta); undefined = no gradient
    const bool need_u = ctx->needs_input_grad(0), need_delta = ctx->needs_input_grad(1);
    if (!grads[0].defined() || !(need_u || need_delta)) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &u = saved[0], &delta = saved[1], &norm = saved[2];
    const at::Tensor grad = grads[0].to(u.scalar_type());
    at::Tensor grad_u, grad_delta;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable gradient
      std::tie(grad_u, grad_delta) =
          composite_backward_op().call(grad, u, delta, need_u, need_delta);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // the op has no autograd of its own
      std::tie(grad_u, grad_delta) = backward_op().call(grad, u, delta, norm, need_u, need_delta);
    }
    if (need_u) out[0] = grad_u;
    if (need_delta) out[1] = grad_delta;
    return out;
  }
};

Pair all_layer_perturb_fwd_autograd(const at::Tensor& u, const at::Tensor& delta) {
  auto r = AllLayerPerturb::apply(u, delta);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmargin, Autograd, m) {
  m.impl("all_layer_perturb_fwd", &all_layer_perturb_fwd_autograd);
}

}  // namespace fastmargin
