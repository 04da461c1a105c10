// Where the ops register: the library namespace (ops.cpp's TORCH_LIBRARY) and the dispatch key
// of the CUDA kernels (csrc/cuda/*.cu's TORCH_LIBRARY_IMPL). A normal build registers
// fastmargin::* with the kernels on the CUDA key. The host emulation build of the CUDA sources
// (csrc/emu, docs/cuda_emulation.md) defines both first, so the same CUDA host code registers
// fastmargin_emu::* on the CPU key and runs next to the real CPU kernels.
#pragma once

#ifndef FASTMARGIN_OPS_NS
#define FASTMARGIN_OPS_NS fastmargin
#endif
#ifndef FASTMARGIN_CUDA_KEY
#define FASTMARGIN_CUDA_KEY CUDA
#endif
