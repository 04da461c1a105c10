// Emulated build: the device guard has nothing to switch (the tensors live on the CPU).
#pragma once

#include <c10/core/Device.h>

#include "CUDAFunctions.h"

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device /*device*/) {}
};

}  // namespace c10::cuda
