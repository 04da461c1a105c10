// Emulated build: one device, index 0.
#pragma once

#include <cstdint>

namespace c10::cuda {

inline int8_t current_device() { return 0; }

}  // namespace c10::cuda
