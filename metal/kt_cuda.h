// Backend macros for mx.fast.cuda_kernel (NVRTC). The kernel bodies use only these.
#define KT_FN __device__ __forceinline__
#define KT_GLOBAL
#define KT_SHARED __shared__
#define KT_SYNC() __syncthreads()
#define KT_UNROLL _Pragma("unroll")
#define KT_AS_FLOAT(u) __uint_as_float(u)
#define KT_EXP(v) expf(v)
#define KT_FMA(a, b, c) fmaf(a, b, c)
#define KT_RSQRT(v) rsqrtf(v)
#define KT_COS(v) cosf(v)
#define KT_SIN(v) sinf(v)

// Sum of v over the 32 lanes of a warp; every lane gets the sum.
KT_FN float kt_warp_sum(float v) {
  KT_UNROLL
  for (int o = 16; o > 0; o >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

// Max of v over the 32 lanes of a warp; every lane gets it.
KT_FN float kt_warp_max(float v) {
  KT_UNROLL
  for (int o = 16; o > 0; o >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  }
  return v;
}

// Sum of v over each aligned group of N lanes (N a power of two up to 32); every lane of a
// group gets its group's sum. Every lane of the warp must call it.
template <int N>
KT_FN float kt_group_sum(float v) {
  KT_UNROLL
  for (int o = N / 2; o > 0; o >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

// (a & MASK) | BITS_OR in one LOP3: written plainly, the compiler spends two (two immediates).
template <uint32_t MASK, uint32_t BITS_OR>
KT_FN uint32_t kt_and_or(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "n"(MASK), "n"(BITS_OR));
  return r;
}
