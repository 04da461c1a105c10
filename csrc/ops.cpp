// Every fastmargin op schema, in one place. Kernels register under TORCH_LIBRARY_IMPL in
// csrc/cpu/*.cpp and csrc/cuda/*.cu (composite ones in csrc/composite); fake (meta) kernels and
// most autograd live in fastmargin/_ops.py, the worst-of-k cross-entropy's in csrc/autograd.
#include <torch/library.h>

#include "fastmargin/op_namespace.h"

TORCH_LIBRARY(FASTMARGIN_OPS_NS, m) {
  // Worst-of-k cross-entropy over (B, k, C) logits (class dim contiguous, or class-major
  // rows), optionally on the weight-robust rows z~ (radius (B,) >= 0). 4-D logits (N, S, k, C)
  // are B = N * S rows (row n * S + s): the view (N, S, 1, C) of contiguous spatial logits
  // (N, C, S) is read in place (the plain loss; on CUDA up to 32 classes); other 4-D inputs run
  // on a (B, k, C) copy (see csrc/include/fastmargin/worst_of_k_ce.h). Returns (loss (B,), lse (B,
  // k), weight (B, k), index (B,) int64, dloss_dradius (B,) or (0,)). target: (B,) int64 class
  // indices, or class probabilities (B, C) shared by the copies or (B, k, C) per copy (floating; no
  // radius). class_weight: (C,) in the statistics dtype.
  m.def(
      "worst_of_k_ce_fwd(Tensor logits, Tensor target, Tensor? radius, float temperature, "
      "float label_smoothing, int ignore_index, Tensor? class_weight=None) -> (Tensor, Tensor, "
      "Tensor, Tensor, Tensor)");
  // Gradient of sum_b grad_loss[b] * loss[b] with respect to logits, in the logits' dtype,
  // laid out like empty_like(logits). Rows whose weight is 0 are written as zeros unread.
  m.def(
      "worst_of_k_ce_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? radius, "
      "Tensor lse, Tensor weight, float label_smoothing, int ignore_index, "
      "Tensor? class_weight=None) -> Tensor");
  // The same gradient written over the logits themselves (each row is read before it is
  // written, by the same thread): the in-place option of worst_of_k_cross_entropy.
  m.def(
      "worst_of_k_ce_bwd_inplace(Tensor grad_loss, Tensor(a!) logits, Tensor target, "
      "Tensor? radius, Tensor lse, Tensor weight, float label_smoothing, int ignore_index, "
      "Tensor? class_weight=None) -> ()");

  // F.cross_entropy's 'mean' / 'sum' of per-sample losses (B,) for the target kind: class
  // indices (B,) ('mean' over the samples whose target is not ignore_index, or over their class
  // weights sum_b weight[target_b]), or probabilities ('mean' over B). Composite (ATen ops).
  m.def(
      "reduce_cross_entropy(Tensor per_sample, Tensor target, int ignore_index, str reduction, "
      "Tensor? weight=None) -> Tensor");
  // The 'mean' divisor of class-index targets (B,): the number of samples whose target is not
  // ignore_index (int64, 0-d), or with class weights sum_b weight[target_b] over those samples
  // with an in-range target. Composite (ATen ops).
  m.def("index_target_normaliser(Tensor target, int ignore_index, Tensor? weight=None) -> Tensor");

  // Internal (fastmargin/_ce_layout.py, eager only):
  // spatial logits (N, C, d1, ...) as the (N * d1 * ..., 1, C) rows the ops above read, in the
  // layout the device's kernels read fastest: class-major on the CPU (csrc/cpu/class_last.cpp)
  // and on CUDA for C <= 32, class-contiguous elsewhere.
  m.def("_class_last(Tensor logits) -> Tensor");

  // --- multiclass margin ---
  // Margins m = z_y - max_{c != y} z_c of (N, C) logits (C >= 2, class dim contiguous), in
  // float32 (float64 for float64 logits), and the int64 runner-up class (ties to the lowest
  // index). A target outside [0, C) gives a NaN margin and runner-up -1; no logit is read for it.
  m.def("multiclass_margin_fwd(Tensor logits, Tensor target) -> (Tensor, Tensor)");
  // Gradient of sum_n grad_margin[n] * m[n]: a contiguous (N, num_classes) tensor of `dtype`,
  // +g at the target, -g at the runner-up, 0 elsewhere (NaN rows for invalid targets). Takes
  // no logits, so the forward saves only O(N) integers.
  m.def(
      "multiclass_margin_bwd(Tensor grad_margin, Tensor target, Tensor runner_up, "
      "SymInt num_classes, ScalarType dtype) -> Tensor");
  // --- all_layer_perturb (AMO) ---
  // out = u + ||u_b||_2 * delta for u (B, ...), the norm over every non-batch dim of example b;
  // delta has u's shape and u's dtype (or float32 for float16 / bfloat16 u). Returns
  // (out in u's dtype, norm (B,) float32 (float64 for float64 u), saved for the backward).
  m.def("all_layer_perturb_fwd(Tensor u, Tensor delta) -> (Tensor, Tensor)");
  // (grad_u, grad_delta) for out's gradient `grad`: grad_u = grad + u * <grad_b, delta_b> /
  // ||u_b|| (0 where ||u_b|| = 0), grad_delta = ||u_b|| * grad (in delta's dtype). A gradient
  // that is not needed comes back as an empty (0,) tensor.
  m.def(
      "all_layer_perturb_bwd(Tensor grad, Tensor u, Tensor delta, Tensor norm, bool need_grad_u, "
      "bool need_grad_delta) -> (Tensor, Tensor)");

  // --- weight_noise_ce: worst-of-k over k random last-layer weight perturbations ---
  // Copy j of row n is z_n + scale_n * xi_nj, xi_nj ~ N(0, I_C) drawn in-kernel by Philox
  // (csrc/include/fastmargin/philox.h) from philox = int64 [seed, offset] (2,) on the logits'
  // device. Forward returns (loss (N,), lse (N, k), weight (N, k) = dL/dl_nj, index (N,) int64).
  m.def(
      "weight_noise_ce_fwd(Tensor logits, Tensor target, Tensor scale, Tensor philox, int k, "
      "float temperature, float label_smoothing, int ignore_index) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
  // Gradients of sum_n grad_loss[n] * loss[n]: (grad_logits like empty_like(logits), grad_scale
  // (N,)). The noise is regenerated from philox, never stored.
  m.def(
      "weight_noise_ce_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor scale, "
      "Tensor philox, Tensor lse, Tensor weight, float label_smoothing, int ignore_index) -> "
      "(Tensor, Tensor)");
  // The exact noise xi (n, k, c) float32 the two ops above use for this philox state (testing).
  m.def("weight_noise_normal(Tensor philox, int n, int k, int c) -> Tensor");
}
