// csrc/cuda/all_layer_perturb.cu compiled for the host against the CUDA emulation (cuda_emu.h,
// first). Its split mode allocates the partial-sum buffer on `at::kCUDA`; the emulated tensors
// live on the CPU, so inside the kernel file (after every header it includes has been read)
// kCUDA names the CPU device.
#include "cuda_emu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "fastmargin/all_layer_perturb.h"
#include "fastmargin/cuda_utils.cuh"

#define kCUDA kCPU
#include "../cuda/all_layer_perturb.cu"
#undef kCUDA
