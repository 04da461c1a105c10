// The op schemas (csrc/ops.cpp) defined again in the emulation's namespace, fastmargin_emu.
#include "cuda_emu.h"
#include "../ops.cpp"
