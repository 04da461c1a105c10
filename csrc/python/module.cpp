// The Python module fastmargin._C: importing it loads this library, whose static initialisers
// register every op (csrc/ops.cpp, the kernels, csrc/autograd, csrc/composite). It also carries
// the functions of the eager fast path of the public losses (fastmargin/_fast_path.py), where
// the host time of a call on a small batch is the cost that matters:
//
//   first_bad_class_target(target, num_classes, ignore_index) -> int | None
//     The first class-index target outside [0, num_classes) that is not ignore_index (None:
//     every index is ignored or a class; ignore_index None: no value is ignored), for a CPU
//     int64 tensor: one pass, no temporaries. The error message is built in Python.
//
//   worst_of_k_ce_loss(logits, target, radius, temperature, label_smoothing, ignore_index,
//                      class_weight, reduction, dtype, layout) -> (loss, index)
//     For arguments the Python layer has checked: the loss of the rows of `logits` in `layout`
//     (fastmargin::RowsLayout: 0 (B, k, C), 1 (k, B, C), 2 (N, C)) with its reduction as one
//     C++ autograd node (csrc/autograd), in `dtype`.
//
//   first_negative_or_nonfinite(values) -> int | None
//     The index of the first element of a 1-D floating CPU tensor that is negative, NaN or
//     infinite (a radius or scale that must be finite and >= 0), or None.
//
//   worst_of_k_cross_entropy(logits, target, dim, temperature, label_smoothing, ignore_index,
//                            reduction, return_index, weight, dtype, validate)
//       -> loss | (loss, index) | None
//     fastmargin.worst_of_k_cross_entropy for the common case, unchecked arguments and all:
//     (N, C) or contiguous spatial (N, C, d1, ...) logits without dim, or (k, B, C) /
//     (B, k, C) with it, int64 class indices, class
//     weights None or already in the statistics dtype, scalars of the exact Python types in
//     range, and (with validate) targets all in range. Anything else, valid or not, gives
//     None: the caller then runs the general path, which computes the same thing or raises its
//     own error. So this function never reports an error itself and adds no rule of its own.
//
// Plain CPython calls (METH_FASTCALL) rather than pybind11: a call costs well under a
// microsecond. Errors raised by ATen come back as the matching Python exceptions.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Reduction.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstring>

#include "fastmargin/checks.h"
#include "fastmargin/worst_of_k_ce_autograd.h"

namespace {

// --- argument conversion (errors here are the caller's bugs: the Python layer passes these) --

const at::Tensor& tensor_arg(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), name, ": expected a torch.Tensor, got ",
                   Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

c10::optional<at::Tensor> optional_tensor_arg(PyObject* obj, const char* name) {
  if (obj == Py_None) return c10::nullopt;
  return tensor_arg(obj, name);
}

double float_arg(PyObject* obj) {
  const double value = PyFloat_AsDouble(obj);
  if (value == -1.0 && PyErr_Occurred()) throw python_error();
  return value;
}

int64_t int_arg(PyObject* obj) {
  const long long value = PyLong_AsLongLong(obj);
  if (value == -1 && PyErr_Occurred()) throw python_error();
  return value;
}

at::ScalarType dtype_arg(PyObject* obj) {
  TORCH_CHECK_TYPE(THPDtype_Check(obj), "dtype: expected a torch.dtype");
  return reinterpret_cast<THPDtype*>(obj)->scalar_type;
}

// at::Reduction of 'none' / 'mean' / 'sum'; -1 for anything else.
int64_t reduction_code(PyObject* obj) {
  if (!PyUnicode_Check(obj)) return -1;
  const char* s = PyUnicode_AsUTF8(obj);
  if (s == nullptr) throw python_error();
  if (std::strcmp(s, "mean") == 0) return at::Reduction::Mean;
  if (std::strcmp(s, "sum") == 0) return at::Reduction::Sum;
  if (std::strcmp(s, "none") == 0) return at::Reduction::None;
  return -1;
}

void check_arg_count(Py_ssize_t nargs, Py_ssize_t expected, const char* function) {
  TORCH_CHECK_TYPE(nargs == expected, function, ": expected ", expected, " arguments, got ", nargs);
}

PyObject* pair(at::Tensor first, at::Tensor second) {
  PyObject* out = PyTuple_New(2);
  if (out == nullptr) return nullptr;
  PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(std::move(first)));
  PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(std::move(second)));
  return out;
}

// The loss node and the cast, with the GIL released as PyTorch's own ops do.
std::tuple<at::Tensor, at::Tensor> loss_in_dtype(const at::Tensor& logits, int64_t layout,
                                                 const at::Tensor& target,
                                                 const c10::optional<at::Tensor>& radius,
                                                 double temperature, double label_smoothing,
                                                 int64_t ignore_index,
                                                 const c10::optional<at::Tensor>& class_weight,
                                                 int64_t reduction, at::ScalarType dtype) {
  pybind11::gil_scoped_release no_gil;
  auto [loss, index] =
      fastmargin::worst_of_k_ce_loss(logits, target, radius, temperature, label_smoothing,
                                     ignore_index, class_weight, reduction, layout);
  return {loss.to(dtype), index};
}

// --- first_bad_class_target ------------------------------------------------------------------

int64_t first_bad(const at::Tensor& target, int64_t num_classes, bool has_ignore,
                  int64_t ignore_index, bool* found) {
  const int64_t* values = target.const_data_ptr<int64_t>();
  const int64_t n = target.size(0), stride = target.stride(0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = values[i * stride];
    if ((y < 0 || y >= num_classes) && !(has_ignore && y == ignore_index)) {
      *found = true;
      return y;
    }
  }
  *found = false;
  return 0;
}

PyObject* first_bad_class_target(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_arg_count(nargs, 3, "first_bad_class_target");
  const at::Tensor& target = tensor_arg(args[0], "target");
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong && target.dim() == 1,
              "first_bad_class_target: expected a 1-D int64 CPU tensor");
  const bool has_ignore = args[2] != Py_None;
  bool found = false;
  const int64_t y =
      first_bad(target, int_arg(args[1]), has_ignore, has_ignore ? int_arg(args[2]) : 0, &found);
  if (found) return PyLong_FromLongLong(y);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// --- worst_of_k_ce_loss ------------------------------------------------------------------------

PyObject* worst_of_k_ce_loss(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_arg_count(nargs, 10, "worst_of_k_ce_loss");
  const int64_t reduction = reduction_code(args[7]);
  TORCH_CHECK_VALUE(reduction >= 0, "reduction: expected 'mean', 'sum' or 'none'");
  const int64_t layout = int_arg(args[9]);
  TORCH_CHECK_VALUE(layout >= fastmargin::kRowsAsGiven && layout <= fastmargin::kOneCopy,
                    "layout: expected 0, 1 or 2");
  auto [loss, index] = loss_in_dtype(
      tensor_arg(args[0], "logits"), layout, tensor_arg(args[1], "target"),
      optional_tensor_arg(args[2], "radius"), float_arg(args[3]), float_arg(args[4]),
      int_arg(args[5]), optional_tensor_arg(args[6], "weight"), reduction, dtype_arg(args[8]));
  return pair(std::move(loss), std::move(index));
  END_HANDLE_TH_ERRORS
}

// --- first_negative_or_nonfinite ----------------------------------------------------------------

PyObject* first_negative_or_nonfinite(PyObject* /*module*/, PyObject* const* args,
                                      Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_arg_count(nargs, 1, "first_negative_or_nonfinite");
  const at::Tensor& values = tensor_arg(args[0], "values");
  TORCH_CHECK(values.device().is_cpu() && values.dim() == 1 &&
                  (values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble),
              "first_negative_or_nonfinite: expected a 1-D float32 or float64 CPU tensor");
  const int64_t found = AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "first_bad", [&] {
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const int64_t n = values.size(0), stride = values.stride(0);
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t x = v[i * stride];
      if (!(std::isfinite(x) && x >= 0)) return i;
    }
    return int64_t{-1};
  });
  if (found >= 0) return PyLong_FromLongLong(found);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// --- worst_of_k_cross_entropy: the common case, or None ---------------------------------------

// A finite float >= 0 (and <= max) given as a Python float or int (not bool), into *value.
bool plain_nonnegative(PyObject* obj, double max, double* value) {
  if (PyFloat_CheckExact(obj)) {
    *value = PyFloat_AS_DOUBLE(obj);
  } else if (PyLong_CheckExact(obj)) {
    *value = PyLong_AsDouble(obj);
    if (*value == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
  } else {
    return false;
  }
  return std::isfinite(*value) && *value >= 0.0 && *value <= max;
}

bool floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// The layout of the rows (worst_of_k_ce_autograd.h) for the common cases, with their (B, k, C)
// shape read off the logits without making a view; -1 for anything else.
int64_t common_layout(const at::Tensor& logits, PyObject* dim, int64_t* B, int64_t* C) {
  int64_t layout = -1, k = 1, class_dim = 2;
  if (dim == Py_None && logits.dim() >= 3) {
    // Spatial: contiguous logits with more than one class and position (the other spatial
    // inputs, e.g. channels-last, take the general path), rows (N * d1 * ..., 1, C).
    const int64_t N = logits.size(0);
    *C = logits.size(1);
    if (!logits.is_contiguous() || *C < 2 || logits.numel() <= N * *C) return -1;
    *B = logits.numel() / *C;
    return fastmargin::kSpatial;
  } else if (dim == Py_None) {
    if (logits.dim() != 2) return -1;
    layout = fastmargin::kOneCopy;
    *B = logits.size(0);
    class_dim = 1;
  } else if (PyLong_CheckExact(dim) && logits.dim() == 3) {
    const long d = PyLong_AsLong(dim);
    if (d == -1 && PyErr_Occurred()) PyErr_Clear();
    const bool copies_first = d == 0 || d == -3;
    if (!copies_first && d != 1 && d != -2) return -1;
    layout = copies_first ? fastmargin::kCopiesFirst : fastmargin::kRowsAsGiven;
    *B = logits.size(copies_first ? 1 : 0);
    k = logits.size(copies_first ? 0 : 1);
  } else {
    return -1;
  }
  *C = logits.size(class_dim);
  if (k == 0 || *C == 0 || (*C > 1 && logits.stride(class_dim) != 1)) return -1;
  return layout;
}

// Whether every class index is in [0, C) or ignore_index (validation on). CPU targets: one pass
// on the host. CUDA: the same reduction and one host synchronisation as the Python check
// (fastmargin/_validation.py), with the GIL released while the device finishes.
bool all_in_range(const at::Tensor& target, int64_t C, int64_t ignore_index) {
  if (target.device().is_cpu()) {
    bool found = false;
    first_bad(target, C, true, ignore_index, &found);
    return !found;
  }
  pybind11::gil_scoped_release no_gil;
  const at::Tensor bad = ((target < 0) | (target >= C)) & (target != ignore_index);
  return !bad.any().item<bool>();
}

// A spatial class-index target: (N, d1, ...) for logits (N, C, d1, ...).
bool spatial_target(const at::Tensor& logits, const at::Tensor& target) {
  if (target.dim() != logits.dim() - 1 || target.size(0) != logits.size(0)) return false;
  for (int64_t d = 1; d < target.dim(); ++d) {
    if (target.size(d) != logits.size(d + 1)) return false;
  }
  return true;
}

PyObject* worst_of_k_cross_entropy(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_arg_count(nargs, 11, "worst_of_k_cross_entropy");
  PyObject *logits_obj = args[0], *target_obj = args[1], *weight_obj = args[8];
  if (!THPVariable_CheckExact(logits_obj) || !THPVariable_CheckExact(target_obj)) Py_RETURN_NONE;
  const at::Tensor& logits = THPVariable_Unpack(logits_obj);
  const at::Tensor& target = THPVariable_Unpack(target_obj);
  if (!floating(logits.scalar_type())) Py_RETURN_NONE;
  int64_t B = 0, C = 0;
  const int64_t layout = common_layout(logits, args[2], &B, &C);
  if (layout < 0) Py_RETURN_NONE;
  if (target.scalar_type() != at::kLong || target.device() != logits.device()) Py_RETURN_NONE;
  const bool spatial = layout == fastmargin::kSpatial;
  if (spatial ? !spatial_target(logits, target) : (target.dim() != 1 || target.size(0) != B)) {
    Py_RETURN_NONE;
  }
  // One class index per row: the positions of a spatial target in order (a view when it is
  // contiguous).
  const at::Tensor rows_target = spatial ? target.reshape({-1}) : target;
  double temperature = 0.0, label_smoothing = 0.0;
  if (!plain_nonnegative(args[3], HUGE_VAL, &temperature) ||
      !plain_nonnegative(args[4], 1.0, &label_smoothing) || !PyLong_CheckExact(args[5])) {
    Py_RETURN_NONE;
  }
  const long long ignore_index = PyLong_AsLongLong(args[5]);
  if (ignore_index == -1 && PyErr_Occurred()) {
    PyErr_Clear();  // beyond int64: the general path says so
    Py_RETURN_NONE;
  }
  const int64_t reduction = reduction_code(args[6]);
  PyObject* return_index = args[7];
  if (reduction < 0 || (return_index != Py_True && return_index != Py_False)) Py_RETURN_NONE;
  c10::optional<at::Tensor> weight;
  if (weight_obj != Py_None) {
    if (!THPVariable_CheckExact(weight_obj)) Py_RETURN_NONE;
    const at::Tensor& w = THPVariable_Unpack(weight_obj);
    if (w.scalar_type() != fastmargin::stats_dtype(logits) || w.dim() != 1 || w.size(0) != C ||
        !w.is_contiguous() || w.device() != logits.device() || w.requires_grad()) {
      Py_RETURN_NONE;
    }
    weight = w;
  }
  if (args[10] == Py_True) {
    // Values are read on the CPU and CUDA only (meta tensors have none: the general path knows).
    if (!target.device().is_cpu() && !target.device().is_cuda()) Py_RETURN_NONE;
    if (!all_in_range(rows_target, C, ignore_index)) Py_RETURN_NONE;  // the general path raises
  }
  auto [loss, index] =
      loss_in_dtype(logits, layout, rows_target, c10::nullopt, temperature, label_smoothing,
                    ignore_index, weight, reduction, dtype_arg(args[9]));
  // Spatial per-sample results in the target's shape, as F.cross_entropy gives them.
  if (spatial && reduction == at::Reduction::None) loss = loss.view(target.sizes());
  if (return_index == Py_True) {
    return pair(std::move(loss), spatial ? index.view(target.sizes()) : std::move(index));
  }
  return THPVariable_Wrap(std::move(loss));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"first_bad_class_target", reinterpret_cast<PyCFunction>(first_bad_class_target), METH_FASTCALL,
     "The first out-of-range class-index target of a CPU int64 tensor, or None."},
    {"worst_of_k_ce_loss", reinterpret_cast<PyCFunction>(worst_of_k_ce_loss), METH_FASTCALL,
     "The worst-of-k loss of checked logits in a rows layout, reduced, in the given dtype."},
    {"first_negative_or_nonfinite", reinterpret_cast<PyCFunction>(first_negative_or_nonfinite),
     METH_FASTCALL, "The index of the first negative or non-finite element, or None."},
    {"worst_of_k_cross_entropy", reinterpret_cast<PyCFunction>(worst_of_k_cross_entropy),
     METH_FASTCALL, "worst_of_k_cross_entropy for the common case, or None for the general path."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
