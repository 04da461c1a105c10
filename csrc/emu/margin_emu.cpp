// csrc/cuda/margin.cu compiled for the host against the CUDA emulation (cuda_emu.h, first).
#include "cuda_emu.h"
#include "../cuda/margin.cu"
