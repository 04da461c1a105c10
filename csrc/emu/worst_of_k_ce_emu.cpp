// csrc/cuda/worst_of_k_ce.cu compiled for the host against the CUDA emulation (cuda_emu.h, first).
#include "cuda_emu.h"
#include "../cuda/worst_of_k_ce.cu"
