// Internal helper of fastmargin/_ce_layout.py (not a public op): spatial logits (N, C, d1, ...)
// as the (N * d1 * ..., 1, C) rows the cross-entropy ops read, in the layout each device's kernels
// read fastest.
//
// CPU: class-major rows, memory (C, N * d1 * ...): per class, the N runs of d1 * ... positions
// copied one after the other (a block copy, not a transpose). The CPU cross-entropy kernels read
// such rows in place with consecutive rows in the lanes of a vector (csrc/cpu/worst_of_k_ce.cpp,
// cpu_class_major.h), as PyTorch's own spatial log_softmax does, and write the gradient in the
// same layout, which maps back to (N, C, d1, ...) as a view. CUDA (csrc/cuda/class_last.cu):
// class-major rows as well for C <= 32, which its kernels read with a thread per row. Every other
// device, and CUDA above 32 classes: contiguous rows (class dim contiguous), the ops' general
// contract (CompositeExplicitAutograd).
//
// _ce_layout.py calls it in eager mode only, inside an autograd.Function (a traced graph and the
// AD transforms keep movedim + reshape), so it needs no fake kernel or autograd formula.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "fastmargin/class_last.h"

namespace fastmargin {
namespace {

at::Tensor class_last_cpu(const at::Tensor& x) {
  if (!x.is_contiguous() || x.is_conj() || x.is_neg()) return class_major_rows(x);
  // Contiguous logits: each (sample, class) run of S positions is one memcpy, without the
  // TensorIterator set-up of copy_ (a sizeable part of the copy at segmentation sizes).
  const SpatialShape sh = spatial_shape(x);
  at::Tensor memory = class_major_memory(sh, x.options());
  const int64_t run = sh.S * static_cast<int64_t>(x.element_size());
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(memory.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(run, 1));
  at::parallel_for(0, sh.N * sh.C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / sh.C, c = i % sh.C;  // src run i = (n, c), dst run (c, n)
      std::memcpy(dst + (c * sh.N + n) * run, src + i * run, static_cast<size_t>(run));
    }
  });
  return class_major_rows_of(memory);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmargin, CPU, m) { m.impl("_class_last", &class_last_cpu); }

TORCH_LIBRARY_IMPL(fastmargin, CompositeExplicitAutograd, m) {
  m.impl("_class_last", &contiguous_rows);
}

}  // namespace fastmargin
