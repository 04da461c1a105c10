// Host emulation of the CUDA execution model, so the kernels of csrc/cuda/*.cu run on the CPU
// (under AddressSanitizer and UBSan's alignment check) in CI machines without a GPU.
//
// Model: every CUDA thread is an OS thread. A launch starts blockDim threads and runs the blocks
// of the grid one after another (so at most one block's threads exist at a time); threadIdx,
// blockIdx, blockDim and gridDim are thread-local. Shared memory (`__shared__`) is a function-
// local static: one copy per kernel instantiation, which the threads of the running block share.
//
// The collectives are CHECKED barriers. __syncthreads waits for every thread of the block and
// __shfl_xor_sync for every lane of the warp; the emulation reports (and fails the launch with
// a RuntimeError naming the source line) when
//   * a collective is reached after threads of the block / lanes of the warp exited,
//   * a thread exits while others wait for it in a collective,
//   * the threads of a block or lanes of a warp meet at different collectives (divergence:
//     different source lines, or different kinds),
//   * a shuffle's mask is not the full warp,
//   * every live thread waits and no collective can complete (deadlock).
// Launches check the configuration the hardware checks: 1 <= grid.x <= 2^31 - 1, grid.y and
// grid.z <= 65535, 1 <= threads per block <= 1024; the grid is taken as the 64-bit value the
// host code computed, so a narrowing to 32 bits cannot hide.
//
// What it cannot see (docs/cuda_emulation.md): device-math ulps, warp lockstep effects,
// uninitialised shared memory (statics start zeroed), real resource limits (registers, shared
// memory size, occupancy), and memory-model races between threads that do not synchronise.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define FASTMARGIN_EMU 1

// ---- CUDA language keywords ------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

// ---- CUDA runtime calls made by the host code (no device: fixed answers) ---------------------
using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace fm_emu {

// SMs reported to the host code (the split decisions depend on it): an H100 SXM / H200 has 132.
// FASTMARGIN_EMU_SMS overrides it.
inline int multiprocessor_count() {
  static const int n = [] {
    const char* s = std::getenv("FASTMARGIN_EMU_SMS");
    return s ? std::max(1, std::atoi(s)) : 132;
  }();
  return n;
}

}  // namespace fm_emu

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = fm_emu::multiprocessor_count();
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid value";
}

namespace fm_emu {

struct Site {
  const char* file;
  int line;
  const char* what;
};

inline std::string where(const Site& s) {
  std::ostringstream o;
  o << s.what << " at " << s.file << ":" << s.line;
  return o.str();
}

inline bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && std::strcmp(a.file, b.file) == 0 && std::strcmp(a.what, b.what) == 0;
}

// Thrown inside an emulated thread once its block has failed: unwinds the kernel quietly.
struct Poisoned {};

constexpr int kWarpSize = 32;

struct Warp {
  int lanes = 0;    // lanes that exist (blockDim may not be a multiple of 32)
  int exited = 0;   // lanes that returned from the kernel
  int arrived = 0;  // lanes waiting in the current collective
  uint64_t gen = 0;
  Site site{"", 0, ""};
  unsigned char buf[2][kWarpSize][8] = {};  // double-buffered by generation parity
  std::condition_variable cv;
};

// The state of the running block: one mutex for all of its collectives.
struct Block {
  std::mutex mu;
  std::condition_variable cv;  // __syncthreads and the end of the block
  int threads = 0;
  int exited = 0;
  int blocked = 0;  // threads waiting in a collective that has not completed
  int sync_arrived = 0;
  uint64_t sync_gen = 0;
  Site sync_site{"", 0, ""};
  int done = 0;  // threads finished with this block
  uint64_t block_gen = 0;
  bool poisoned = false;
  std::string error;
  std::vector<Warp> warps;

  // Records the first violation, releases every waiter (they unwind with Poisoned).
  void fail(const std::string& msg) {
    if (!poisoned) {
      poisoned = true;
      std::ostringstream o;
      o << msg << " (block " << blockIdx.x << ", thread " << threadIdx.x << ")";
      error = o.str();
    }
    cv.notify_all();
    for (Warp& w : warps) w.cv.notify_all();
  }
};

inline thread_local Block* current_block = nullptr;

inline Warp& my_warp(Block& b) { return b.warps[threadIdx.x / kWarpSize]; }

// Every live thread is waiting and the arrival that made it so completed nothing.
inline void check_deadlock(Block& b, const Site& s) {
  if (b.blocked == b.threads - b.exited) {
    b.fail("deadlock: every live thread waits in a collective that cannot complete (last: " +
           where(s) + ")");
  }
}

template <typename Pred>
inline void wait_until(Block& b, std::condition_variable& cv, std::unique_lock<std::mutex>& lk,
                       Pred done) {
  cv.wait(lk, [&] { return b.poisoned || done(); });
  if (b.poisoned) throw Poisoned{};
}

inline void syncthreads(Site s) {
  Block& b = *current_block;
  std::unique_lock<std::mutex> lk(b.mu);
  if (b.poisoned) throw Poisoned{};
  if (b.exited > 0) {
    b.fail(where(s) + " reached after " + std::to_string(b.exited) +
           " thread(s) of the block exited");
    throw Poisoned{};
  }
  if (b.sync_arrived == 0) {
    b.sync_site = s;
  } else if (!same_site(b.sync_site, s)) {
    b.fail("divergent __syncthreads: threads wait at " + where(b.sync_site) + " and " + where(s));
    throw Poisoned{};
  }
  if (++b.sync_arrived == b.threads) {
    b.sync_arrived = 0;
    ++b.sync_gen;
    b.blocked -= b.threads - 1;
    b.cv.notify_all();
    return;
  }
  const uint64_t gen = b.sync_gen;
  ++b.blocked;
  check_deadlock(b, s);
  wait_until(b, b.cv, lk, [&] { return b.sync_gen != gen; });
}

// One warp collective: lane `lane` contributes `in` (up to 8 bytes) and receives the bytes of
// lane src_lane(lane).
template <typename SrcLane>
inline void warp_exchange(Site s, unsigned mask, const void* in, void* out, size_t size,
                          SrcLane src_lane) {
  Block& b = *current_block;
  std::unique_lock<std::mutex> lk(b.mu);
  if (b.poisoned) throw Poisoned{};
  Warp& w = my_warp(b);
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  if (mask != 0xffffffffu || w.lanes != kWarpSize) {
    std::ostringstream o;
    o << where(s) << " with mask 0x" << std::hex << mask << std::dec << " in a warp of " << w.lanes
      << " lanes: the kernels' shuffles assume full warps";
    b.fail(o.str());
    throw Poisoned{};
  }
  if (w.exited > 0) {
    b.fail(where(s) + " reached after " + std::to_string(w.exited) + " lane(s) of warp " +
           std::to_string(threadIdx.x / kWarpSize) + " exited");
    throw Poisoned{};
  }
  if (w.arrived == 0) {
    w.site = s;
  } else if (!same_site(w.site, s)) {
    b.fail("divergent warp collective: lanes of warp " + std::to_string(threadIdx.x / kWarpSize) +
           " wait at " + where(w.site) + " and " + where(s));
    throw Poisoned{};
  }
  const uint64_t gen = w.gen;
  std::memcpy(w.buf[gen & 1][lane], in, size);
  if (++w.arrived == w.lanes) {
    w.arrived = 0;
    ++w.gen;
    b.blocked -= w.lanes - 1;
    w.cv.notify_all();
  } else {
    ++b.blocked;
    check_deadlock(b, s);
    wait_until(b, w.cv, lk, [&] { return w.gen != gen; });
  }
  // The buffer of this generation is rewritten only after every lane arrived at the
  // collective after next, i.e. after this lane has read it.
  std::memcpy(out, w.buf[gen & 1][src_lane(lane)], size);
}

template <typename T>
inline T shfl_xor_sync(Site s, unsigned mask, T v, int lane_mask, int width = kWarpSize) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a 1-8 byte value");
  if (width != kWarpSize) {
    Block& b = *current_block;
    std::lock_guard<std::mutex> lk(b.mu);
    b.fail(where(s) + " with width " + std::to_string(width) + " (not emulated)");
    throw Poisoned{};
  }
  T out;
  warp_exchange(s, mask, &v, &out, sizeof(T), [&](int lane) { return lane ^ lane_mask; });
  return out;
}

// A thread returns from the kernel: nobody may be waiting for it.
inline void thread_exit(Block& b) {
  std::unique_lock<std::mutex> lk(b.mu);
  ++b.exited;
  Warp& w = my_warp(b);
  ++w.exited;
  if (b.poisoned) return;
  if (w.arrived > 0) {
    b.fail("lane " + std::to_string(threadIdx.x % kWarpSize) + " of warp " +
           std::to_string(threadIdx.x / kWarpSize) + " exited while " + std::to_string(w.arrived) +
           " lane(s) wait in " + where(w.site));
  } else if (b.sync_arrived > 0) {
    b.fail("thread exited while " + std::to_string(b.sync_arrived) + " thread(s) wait in " +
           where(b.sync_site));
  } else if (b.blocked > 0 && b.blocked == b.threads - b.exited) {
    b.fail("deadlock: the last running thread exited while others wait in a collective");
  }
}

// Waits until every thread of the block is done, then the last one resets it for the next.
inline void block_end(Block& b) {
  std::unique_lock<std::mutex> lk(b.mu);
  const uint64_t gen = b.block_gen;
  if (++b.done == b.threads) {
    b.done = b.exited = b.blocked = b.sync_arrived = 0;
    for (Warp& w : b.warps) w.exited = w.arrived = 0;
    ++b.block_gen;
    b.cv.notify_all();
    return;
  }
  b.cv.wait(lk, [&] { return b.block_gen != gen; });
}

constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxThreads = 1024;

inline dim3 checked_grid(int64_t g, const Site& s) {
  TORCH_CHECK(g >= 1 && g <= kMaxGridX, "fastmargin-emu: invalid launch at ", s.file, ":", s.line,
              ": grid.x = ", g, " (must be in [1, 2^31 - 1])");
  return dim3(static_cast<unsigned>(g));
}
inline dim3 checked_grid(dim3 g, const Site& s) {
  TORCH_CHECK(g.x >= 1 && g.x <= kMaxGridX && g.y >= 1 && g.y <= kMaxGridYZ && g.z >= 1 &&
                  g.z <= kMaxGridYZ,
              "fastmargin-emu: invalid launch at ", s.file, ":", s.line, ": grid (", g.x, ", ", g.y,
              ", ", g.z, ")");
  return g;
}
inline dim3 checked_block(int64_t t, const Site& s) {
  TORCH_CHECK(t >= 1 && t <= kMaxThreads, "fastmargin-emu: invalid launch at ", s.file, ":", s.line,
              ": ", t, " threads per block (must be in [1, 1024])");
  return dim3(static_cast<unsigned>(t));
}

// One launch at a time: the statics that stand for shared memory belong to the running block.
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Runs kernel(args...) over grid x block: 1-D grids and blocks (all the kernels use).
template <typename Grid, typename Threads, typename... KernelArgs, typename... Args>
void launch(Site s, void (*kernel)(KernelArgs...), Grid grid_in, Threads block_in,
            cudaStream_t /*stream*/, Args&&... args) {
  const dim3 grid = checked_grid(grid_in, s);
  const dim3 block = checked_block(static_cast<int64_t>(block_in), s);
  TORCH_CHECK(grid.y == 1 && grid.z == 1, "fastmargin-emu: only 1-D grids are emulated");
  std::lock_guard<std::mutex> serial(launch_mutex());
  // The kernel takes its parameters by value, as a launch copies them.
  std::tuple<std::decay_t<KernelArgs>...> params(std::forward<Args>(args)...);
  Block b;
  b.threads = static_cast<int>(block.x);
  b.warps = std::vector<Warp>((b.threads + kWarpSize - 1) / kWarpSize);
  for (size_t w = 0; w < b.warps.size(); ++w) {
    b.warps[w].lanes = std::min<int>(kWarpSize, b.threads - static_cast<int>(w) * kWarpSize);
  }
  std::mutex err_mu;
  std::string other_error;  // an exception other than a collective violation
  auto worker = [&](unsigned tid) {
    current_block = &b;
    threadIdx = {tid, 0, 0};
    blockDim = block;
    gridDim = grid;
    for (unsigned bid = 0; bid < grid.x; ++bid) {
      blockIdx = {bid, 0, 0};
      try {
        std::apply(kernel, params);
      } catch (const Poisoned&) {
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lk(err_mu);
        if (other_error.empty()) other_error = e.what();
      }
      thread_exit(b);
      block_end(b);
      bool stop;
      {
        std::lock_guard<std::mutex> lk(b.mu);
        stop = b.poisoned;
      }
      if (stop) break;
    }
    current_block = nullptr;
  };
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned t = 0; t < block.x; ++t) threads.emplace_back(worker, t);
  for (std::thread& t : threads) t.join();
  TORCH_CHECK(!b.poisoned, "fastmargin-emu: collective violation in the kernel launched at ",
              s.file, ":", s.line, ": ", b.error);
  TORCH_CHECK(other_error.empty(), "fastmargin-emu: kernel launched at ", s.file, ":", s.line,
              " threw: ", other_error);
}

}  // namespace fm_emu

// ---- Intrinsics the kernels use ----------------------------------------------------------------
#define __syncthreads() ::fm_emu::syncthreads(::fm_emu::Site{__FILE__, __LINE__, "__syncthreads"})
#define __shfl_xor_sync(...) \
  ::fm_emu::shfl_xor_sync(::fm_emu::Site{__FILE__, __LINE__, "__shfl_xor_sync"}, __VA_ARGS__)

// The project's launch macro (csrc/include/fastmargin/cuda_utils.cuh) routed to the emulation.
#define FM_KERNEL_LAUNCH(kernel, grid, block, stream, ...)                                    \
  ::fm_emu::launch(::fm_emu::Site{__FILE__, __LINE__, "launch"}, kernel, grid, block, stream, \
                   __VA_ARGS__)

// The emulated build registers the CUDA host code on the CPU key of its own namespace, next to
// the real CPU kernels (torch.ops.fastmargin_emu.* vs torch.ops.fastmargin.*).
#define FASTMARGIN_OPS_NS fastmargin_emu
#define FASTMARGIN_CUDA_KEY CPU
