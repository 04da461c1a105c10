// Internal helpers of fastmargin/_ce_layout.py (not public ops): the transposing copies between
// spatial logits (N, C, d1, ...) and the (N * d1 * ..., 1, C) rows the cross-entropy kernels
// read, and back for their gradient. PyTorch's strided copy moves these at about 0.6 ns per
// element at C = 21 (a short inner loop over the classes with a strided read); tiles of positions
// that fit in L1 move them several times faster.
//
// The schemas are internal: _ce_layout.py calls them from eager mode only (a traced graph and the
// AD transforms keep movedim + reshape, which compilers and functorch already understand), and the
// autograd of the pair lives there (each is the other's backward). The CompositeExplicitAutograd
// kernels serve every other device with movedim + contiguous, so no caller branches on one.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastmargin {
namespace {

// Positions per tile: kTile * C elements of each side stay in L1 for C up to a few hundred.
constexpr int64_t kTile = 64;

// (S, C) of x = (N, C, d1, ...): the positions per sample and the classes.
std::pair<int64_t, int64_t> positions_and_classes(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 3, "_class_last: expected (N, C, d1, ...) logits, got ", x.sizes());
  return {x.numel() == 0 ? 0 : x.numel() / (x.size(0) * x.size(1)), x.size(1)};
}

std::vector<int64_t> rows_shape(const at::Tensor& x) {
  const auto sc = positions_and_classes(x);
  return {x.size(0) * sc.first, 1, sc.second};
}

// dst[n][s][c] = src[n][c][s] (to_rows) or dst[n][c][s] = src[n][s][c] (!to_rows), for N samples
// of S positions and C classes, both sides contiguous. Element bits are moved, never converted.
template <typename bits_t>
void transpose_tiles(const void* src_v, void* dst_v, int64_t N, int64_t C, int64_t S,
                     bool to_rows) {
  const bits_t* src = static_cast<const bits_t*>(src_v);
  bits_t* dst = static_cast<bits_t*>(dst_v);
  const int64_t tiles = (S + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kTile * C));
  at::parallel_for(0, N * tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tiles, s0 = (t % tiles) * kTile;
      const int64_t len = std::min(kTile, S - s0);
      const int64_t base = n * C * S;
      if (to_rows) {  // read C runs of len positions, write len * C contiguous elements
        bits_t* out = dst + base + s0 * C;
        for (int64_t c = 0; c < C; ++c) {
          const bits_t* in = src + base + c * S + s0;
          for (int64_t s = 0; s < len; ++s) out[s * C + c] = in[s];
        }
      } else {  // read len * C contiguous elements, write C runs of len positions
        const bits_t* in = src + base + s0 * C;
        for (int64_t c = 0; c < C; ++c) {
          bits_t* out = dst + base + c * S + s0;
          for (int64_t s = 0; s < len; ++s) out[s] = in[s * C + c];
        }
      }
    }
  });
}

void transpose(const at::Tensor& src, at::Tensor& dst, int64_t N, int64_t C, int64_t S,
               bool to_rows) {
  if (dst.numel() == 0) return;
  const void* in = src.const_data_ptr();
  void* out = dst.mutable_data_ptr();
  switch (src.element_size()) {
    case 1:
      transpose_tiles<uint8_t>(in, out, N, C, S, to_rows);
      break;
    case 2:
      transpose_tiles<uint16_t>(in, out, N, C, S, to_rows);
      break;
    case 4:
      transpose_tiles<uint32_t>(in, out, N, C, S, to_rows);
      break;
    case 8:
      transpose_tiles<uint64_t>(in, out, N, C, S, to_rows);
      break;
    default:
      TORCH_CHECK(false, "_class_last: unsupported element size ", src.element_size());
  }
}

// (N, C, d1, ...) -> contiguous (N * d1 * ..., 1, C).
at::Tensor class_last_cpu(const at::Tensor& x) {
  const auto sc = positions_and_classes(x);
  at::Tensor out = at::empty(rows_shape(x), x.options());
  transpose(x.contiguous(), out, x.size(0), sc.second, sc.first, true);
  return out;
}

// (N * d1 * ..., 1, C) rows -> contiguous `shape` = (N, C, d1, ...).
at::Tensor class_first_cpu(const at::Tensor& rows, at::IntArrayRef shape) {
  at::Tensor out = at::empty(shape, rows.options());
  const auto sc = positions_and_classes(out);
  TORCH_CHECK(rows.numel() == out.numel() && rows.size(-1) == sc.second,
              "_class_first: rows of shape ", rows.sizes(), " do not hold logits of shape ", shape);
  transpose(rows.contiguous(), out, out.size(0), sc.second, sc.first, false);
  return out;
}

at::Tensor class_last_composite(const at::Tensor& x) {
  return x.movedim(1, -1).reshape(rows_shape(x)).contiguous();
}

at::Tensor class_first_composite(const at::Tensor& rows, at::IntArrayRef shape) {
  std::vector<int64_t> last(shape.begin(), shape.end());  // (N, d1, ..., C)
  last.erase(last.begin() + 1);
  last.push_back(shape[1]);
  return rows.reshape(last).movedim(-1, 1).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastmargin, m) {
  m.def("_class_last(Tensor logits) -> Tensor");
  m.def("_class_first(Tensor rows, int[] shape) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmargin, CPU, m) {
  m.impl("_class_last", &class_last_cpu);
  m.impl("_class_first", &class_first_cpu);
}

TORCH_LIBRARY_IMPL(fastmargin, CompositeExplicitAutograd, m) {
  m.impl("_class_last", &class_last_composite);
  m.impl("_class_first", &class_first_composite);
}

}  // namespace fastmargin
