// A CPU stand-in for the CUDA built-ins that the block-synchronous kernels use, so that their source
// runs under g++ (tests/emulate.py). Not a GPU model: one block at a time, its threads run as fibers
// (ucontext) in turn on one OS thread, switching only at __syncthreads. That checks a kernel's indexing,
// tiling, masking and its launcher's plan on real data; it cannot show races, warp-level behaviour,
// memory-model or timing issues (compute-sanitizer on a GPU does: benchmarks/gpu/cuda.sh).
//
// Shared memory is the size the launcher asks for, filled with 0xFF (NaN as floats: a read before a
// write poisons the result), inside an arena of 256 KiB or more (more than any GPU gives a block) whose
// rest is checked after each block: a write past the requested size fails the launch.
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

struct emu_dim3 {
  unsigned x, y, z;
};
struct float4 {
  float x, y, z, w;
};

inline emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

// IEEE binary16 -> float (stands in for the PTX cvt.f32.f16 of common.cuh).
inline float emu_half_to_float(unsigned short h) {
  const unsigned sign = (h >> 15) & 1u, exponent = (h >> 10) & 31u, mantissa = h & 1023u;
  float value;
  if (exponent == 0)
    value = std::ldexp((float)mantissa, -24);
  else if (exponent == 31)
    value = mantissa ? NAN : INFINITY;
  else
    value = std::ldexp((float)(mantissa | 1024u), (int)exponent - 25);
  return sign ? -value : value;
}

namespace emu {

constexpr std::size_t STACK = 64 * 1024;
constexpr std::size_t ARENA = 256 * 1024 + 4096;
constexpr int READY = 0, AT_BARRIER = 1, DONE = 2;

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  int state;
};

inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline int current = 0;
inline const std::function<void()>* body = nullptr;
inline unsigned char* smem = nullptr;

inline void trampoline() {
  (*body)();
  fibers[current].state = DONE;  // returns to uc_link: the scheduler
}

// Runs `kernel` (the kernel call with its arguments) on every block of the grid; returns an error
// message, or nullptr.
inline const char* run_grid(emu_dim3 grid, unsigned threads, std::size_t smem_bytes,
                            const std::function<void()>& kernel) {
  body = &kernel;
  gridDim = grid;
  blockDim = {threads, 1, 1};
  fibers.resize(threads);
  for (auto& f : fibers) f.stack.resize(STACK);
  std::vector<unsigned char> shared(smem_bytes + ARENA);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = {bx, by, bz};
        std::memset(shared.data(), 0xFF, shared.size());
        smem = shared.data();
        for (auto& f : fibers) {
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.data();
          f.context.uc_stack.ss_size = f.stack.size();
          f.context.uc_link = &scheduler;
          makecontext(&f.context, trampoline, 0);
          f.state = READY;
        }
        for (;;) {
          for (unsigned t = 0; t < threads; ++t) {
            if (fibers[t].state != READY) continue;
            current = (int)t;
            threadIdx = {t, 0, 0};
            swapcontext(&scheduler, &fibers[t].context);
          }
          unsigned done = 0, waiting = 0;
          for (auto& f : fibers) (f.state == DONE ? done : waiting) += 1;
          if (done == threads) break;
          if (done > 0) return "some threads of a block exited while others wait at __syncthreads";
          for (auto& f : fibers) f.state = READY;
        }
        for (std::size_t i = smem_bytes; i < shared.size(); ++i)
          if (shared[i] != 0xFF) return "a block wrote past the end of its dynamic shared memory";
      }
  return nullptr;
}

}  // namespace emu

inline void __syncthreads() {
  emu::fibers[emu::current].state = emu::AT_BARRIER;
  swapcontext(&emu::fibers[emu::current].context, &emu::scheduler);
}
