// csrc/cuda/weight_noise_ce.cu compiled for the host against the CUDA emulation (cuda_emu.h,
// first).
#include "cuda_emu.h"
#include "../cuda/weight_noise_ce.cu"
