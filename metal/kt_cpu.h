// Backend macros for the CPU emulation used by the tests: every GPU thread of a block is a
// std::thread, blocks run one after another, so `static` locals act as shared memory.
// It runs the very kernel bodies the GPUs run, to check their indexing without a GPU.
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

struct uint4 {
  uint32_t x, y, z, w;
};
struct uint2 {
  uint32_t x, y;
};
struct float4 {
  float x, y, z, w;
};

namespace kt_emu {
inline std::barrier<>* block_barrier = nullptr;
inline std::barrier<>* warp_barrier[32] = {};
inline float lanes[1024];
inline thread_local int tid = 0;
}  // namespace kt_emu

#define KT_FN inline
#define KT_GLOBAL
#define KT_SHARED static
#define KT_SYNC() kt_emu::block_barrier->arrive_and_wait()
#define KT_UNROLL
#define KT_EXP(v) std::exp(v)
#define KT_FMA(a, b, c) std::fma(a, b, c)
#define KT_RSQRT(v) (1.0f / std::sqrt(v))
#define KT_COS(v) std::cos(v)
#define KT_SIN(v) std::sin(v)

inline float KT_AS_FLOAT(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Every lane of the warp must call these, as with __shfl_xor_sync on a full mask.
inline float kt_warp_reduce(float v, bool take_max) {
  const int w = kt_emu::tid / 32;
  kt_emu::lanes[kt_emu::tid] = v;
  kt_emu::warp_barrier[w]->arrive_and_wait();
  float s = take_max ? kt_emu::lanes[w * 32] : 0.0f;
  for (int i = take_max ? 1 : 0; i < 32; ++i) {
    const float u = kt_emu::lanes[w * 32 + i];
    s = take_max ? (u > s ? u : s) : s + u;
  }
  kt_emu::warp_barrier[w]->arrive_and_wait();
  return s;
}

inline float kt_warp_sum(float v) {
  return kt_warp_reduce(v, false);
}

inline float kt_warp_max(float v) {
  return kt_warp_reduce(v, true);
}

// Sum over each aligned group of N lanes (kt_group_sum of kt_cuda.h); every lane calls it.
template <int N>
inline float kt_group_sum(float v) {
  const int w = kt_emu::tid / 32;
  kt_emu::lanes[kt_emu::tid] = v;
  kt_emu::warp_barrier[w]->arrive_and_wait();
  const int first = kt_emu::tid / N * N;
  float s = 0.0f;
  for (int i = first; i < first + N; ++i) {
    s += kt_emu::lanes[i];
  }
  kt_emu::warp_barrier[w]->arrive_and_wait();
  return s;
}

template <uint32_t MASK, uint32_t BITS_OR>
KT_FN uint32_t kt_and_or(uint32_t a) {
  return (a & MASK) | BITS_OR;
}
