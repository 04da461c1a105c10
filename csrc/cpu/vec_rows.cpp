// The float row loops of cpu_rows.h and the noise generator of cpu_noise.h, compiled for the x86-64
// baseline and (gcc on x86-64) also for x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512):
// target_clones emits all three and an ifunc resolver picks the best one the CPU supports when the
// library loads. `flatten` inlines the templates into each clone, so each clone vectorises them for
// its own target (otherwise both would call one shared baseline instantiation). FMA contraction
// changes results only at the rounding level; NaN / inf semantics are the same.
#include "fastmargin/cpu_class_major.h"
#include "fastmargin/cpu_noise.h"
#include "fastmargin/cpu_rows.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FM_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define FM_CPU_CLONES
#endif

namespace fastmargin {
namespace cpu {

FM_CPU_CLONES float max_f32(const float* x, int64_t n) { return lane_max(x, n); }

FM_CPU_CLONES float sum_exp_f32(const float* x, int64_t n, float shift) {
  return lane_sum_exp(x, n, shift);
}

FM_CPU_CLONES float sum_f32(const float* x, int64_t n) { return lane_sum(x, n); }

FM_CPU_CLONES float coef_dot_f32(const float* a, const float* x, int64_t n, float m) {
  return coef_dot_loop(a, x, n, m);
}

FM_CPU_CLONES void softmax_grad_f32(const float* z, int64_t n, float r, float lse, float A,
                                    const float* a, float a_off, float s, float* out) {
  softmax_grad_loop(z, n, r, lse, A, a, a_off, s, out);
}

FM_CPU_CLONES float softmax_grad_acc_f32(const float* x, const float* xi, int64_t n, float lse,
                                         float w, float a_off, float* acc) {
  return softmax_grad_acc_loop(x, xi, n, lse, w, a_off, acc);
}

FM_CPU_CLONES void exp_inplace_f32(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = exp_lane(x[i]);
}

FM_CPU_CLONES void small_rows_lanes_f32(const float* x, int64_t stride, int64_t rows, int64_t C,
                                        bool want_sum, RowShift<float> shift, float* mx, float* se,
                                        float* sz) {
  small_rows_lanes(x, stride, rows, C, want_sum, shift, mx, se, sz);
}

FM_CPU_CLONES void softmax_grad_small_rows_f32(const float* z, int64_t zs, int64_t rows, int64_t C,
                                               const float* r, const float* lse, const float* s,
                                               float a_off, float* out, int64_t os) {
  softmax_grad_small_rows_loop(z, zs, rows, C, r, lse, s, a_off, out, os);
}

// The class-major loops per logits dtype: bfloat16 and half convert in the lanes, so each clone
// vectorises the conversion too.
#define FM_CLASS_MAJOR_CLONES(T, suffix)                                                           \
  FM_CPU_CLONES void class_major_stats_##suffix(const T* x, int64_t cs, int64_t rows, int64_t C,   \
                                                bool want_sum, float* mx, float* lse, float* sz) { \
    class_major_stats_loop(x, cs, rows, C, want_sum, mx, lse, sz);                                 \
  }                                                                                                \
  FM_CPU_CLONES void class_major_grad_##suffix(const T* z, int64_t cs, int64_t rows, int64_t C,    \
                                               const int32_t* y, const float* lse, const float* s, \
                                               float a_off, float q_off, T* out) {                 \
    class_major_grad_loop(z, cs, rows, C, y, lse, s, a_off, q_off, out);                           \
  }
FM_CLASS_MAJOR_CLONES(float, f32)
FM_CLASS_MAJOR_CLONES(c10::BFloat16, bf16)
FM_CLASS_MAJOR_CLONES(c10::Half, f16)
#undef FM_CLASS_MAJOR_CLONES

FM_CPU_CLONES void noise_blocks_f32(uint64_t seed, const uint64_t* w, const uint64_t* row,
                                    int64_t count, float* out) {
  noise_blocks_loop(seed, w, row, count, out);
}

}  // namespace cpu
}  // namespace fastmargin
