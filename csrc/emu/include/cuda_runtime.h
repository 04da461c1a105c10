// Emulated build: the CUDA runtime API the host code uses comes from the emulation header.
#pragma once

#include "../cuda_emu.h"
