// Backend macros for mx.fast.metal_kernel. The kernel bodies use only these.
#define KT_FN inline
#define KT_GLOBAL device
#define KT_SHARED threadgroup
#define KT_SYNC() threadgroup_barrier(mem_flags::mem_threadgroup)
#define KT_UNROLL _Pragma("clang loop unroll(full)")
#define KT_AS_FLOAT(u) as_type<float>(u)
#define KT_EXP(v) metal::exp(v)
#define KT_FMA(a, b, c) metal::fma(a, b, c)
#define KT_RSQRT(v) metal::rsqrt(v)
#define KT_COS(v) metal::precise::cos(v)
#define KT_SIN(v) metal::precise::sin(v)

// Sum of v over the 32 lanes of a simdgroup; every lane gets the sum.
KT_FN float kt_warp_sum(float v) {
  return simd_sum(v);
}

KT_FN float kt_warp_max(float v) {
  return simd_max(v);
}

// Sum of v over each aligned group of N lanes (N a power of two up to 32).
template <int N>
KT_FN float kt_group_sum(float v) {
  KT_UNROLL
  for (ushort o = N / 2; o > 0; o >>= 1) {
    v += simd_shuffle_xor(v, o);
  }
  return v;
}

template <uint32_t MASK, uint32_t BITS_OR>
KT_FN uint32_t kt_and_or(uint32_t a) {
  return (a & MASK) | BITS_OR;
}
