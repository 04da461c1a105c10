// Emulated build: the current stream is a placeholder (launches run synchronously on the host).
#pragma once

#include "../../../cuda_emu.h"

namespace c10::cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }  // NOLINT: implicit, as c10's is
};

inline CUDAStream getCurrentCUDAStream(int8_t /*device*/ = -1) { return {}; }

}  // namespace c10::cuda
