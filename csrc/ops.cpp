// Every fastmargin op schema, in one place. Kernels register under TORCH_LIBRARY_IMPL in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) kernels and autograd live in fastmargin/_ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastmargin, m) {
  // Worst-of-k cross-entropy over (B, k, C) logits (class dim contiguous), optionally on the
  // weight-robust rows z~ (radius (B,) >= 0). Returns (loss (B,), lse (B, k), weight (B, k),
  // index (B,) int64, dloss_dradius (B,) or (0,)).
  m.def(
      "worst_of_k_ce_fwd(Tensor logits, Tensor target, Tensor? radius, float temperature, "
      "float label_smoothing, int ignore_index) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradient of sum_b grad_loss[b] * loss[b] with respect to logits, in the logits' dtype,
  // laid out like empty_like(logits). Rows whose weight is 0 are written as zeros unread.
  m.def(
      "worst_of_k_ce_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? radius, "
      "Tensor lse, Tensor weight, float label_smoothing, int ignore_index) -> Tensor");

  // --- weight_noise_ce (issue 7): worst-of-k over k random last-layer weight perturbations ---
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

// A Python module named _C so `import fastmargin._C` loads the library (and its registrations).
static struct PyModuleDef fastmargin_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastmargin_module); }
