// Emulated build: runtime errors become c10::Error; a launch reports its own errors (the
// emulation throws from the launch), so the launch check has nothing left to do.
#pragma once

#include <c10/util/Exception.h>

#include "../../../cuda_emu.h"

#define C10_CUDA_CHECK(EXPR)                                                                \
  do {                                                                                      \
    const cudaError_t fm_emu_err = (EXPR);                                                  \
    TORCH_CHECK(fm_emu_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(fm_emu_err)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
