// csrc/cuda/class_last.cu compiled for the host against the CUDA emulation (cuda_emu.h, first).
#include "cuda_emu.h"
#include "../cuda/class_last.cu"
