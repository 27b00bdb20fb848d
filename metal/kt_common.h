// Helpers shared by every backend for MLX affine-quantized weights.
// Packing: a row of D values is D*BITS/32 uint32 words; value i of a word sits in bits
// [i*BITS, (i+1)*BITS) (little-endian); w = scale * q + bias per group of GS values.
// A 16-byte chunk (4 words, 128/BITS values) always lies inside one group (GS % chunk == 0).
//
// Dequantization without int->float conversions (slow on GPUs): q is moved into the top
// mantissa bits of 1.0f, giving f = 1 + q / 2^BITS exactly (one shift, one and-or). Then
//   sum_i (s q_i + b) x_i = (s 2^BITS) sum_i f_i x_i + (b - s 2^BITS) sum_i x_i,
// so each weight costs a shift, a logic op and one fma. The first sum exceeds the second by
// sum_i q_i x_i / 2^BITS, so the cancellation costs about BITS bits of float32's 24.

// Word i (0..3) of a 16-byte chunk.
KT_FN uint32_t kt_word(uint4 v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// 1 + q_i / 2^BITS for value i of a word (i is a compile-time constant after unrolling).
template <int BITS>
KT_FN float kt_f(uint32_t w, int i) {
  const int up = 23 - BITS - i * BITS;  // shift that puts value i at bits [23-BITS, 23)
  const uint32_t m = up >= 0 ? (w << up) : (w >> (-up));
  return KT_AS_FLOAT((kt_and_or<((1u << BITS) - 1u) << (23 - BITS), 0x3F800000u>(m)));
}

// acc + sum_j f_{i0+j} v_j over the four values i0..i0+3 of a word.
template <int BITS>
KT_FN float kt_fma4(float acc, uint32_t w, int i0, float4 v) {
  acc = KT_FMA(kt_f<BITS>(w, i0), v.x, acc);
  acc = KT_FMA(kt_f<BITS>(w, i0 + 1), v.y, acc);
  acc = KT_FMA(kt_f<BITS>(w, i0 + 2), v.z, acc);
  return KT_FMA(kt_f<BITS>(w, i0 + 3), v.w, acc);
}

KT_FN float kt_sum4(float4 v) {
  return (v.x + v.y) + (v.z + v.w);
}

// The down kernel's DQ = 1 ("windows"): one shift serves M = 8 / BITS values (2 at 4 bits,
// 4 at 2 bits). After a shift by 15 - 8 j, value M j + m of a word sits at bits
// [15 + BITS m, 15 + BITS (m + 1)): window m of the mantissa, f = 1 + q / 2^k with
// k = 8 - BITS m (at most 8 of float32's 24 bits lost to the cancellation). At 8 bits M = 1
// and this is kt_f. Products accumulate per window: component m of a float4 (so, unlike
// thread arrays, it passes to functions on Metal).
template <int BITS, int WIN>
KT_FN float kt_fwin(uint32_t w, int i) {
  constexpr int M = 8 / BITS;
  const int up = 15 - 8 * (i / M);  // the same shift for the M values of a group: CSE'd
  const uint32_t m = up >= 0 ? (w << up) : (w >> (-up));
  return KT_AS_FLOAT((kt_and_or<((1u << BITS) - 1u) << (15 + BITS * WIN), 0x3F800000u>(m)));
}

KT_FN float4 kt_f4(float a) {
  float4 v;
  v.x = a;
  v.y = a;
  v.z = a;
  v.w = a;
  return v;
}

template <int C>
KT_FN float4 kt_fma_at(float4 d, float a, float b) {
  if (C == 0) {
    d.x = KT_FMA(a, b, d.x);
  } else if (C == 1) {
    d.y = KT_FMA(a, b, d.y);
  } else if (C == 2) {
    d.z = KT_FMA(a, b, d.z);
  } else {
    d.w = KT_FMA(a, b, d.w);
  }
  return d;
}

KT_FN float kt_comp(float4 v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// d_m + sum of f x over the four values i0..i0+3 of a word (i0 % 4 == 0: value i0+e is in
// window e % M).
template <int BITS>
KT_FN float4 kt_fma4w(float4 d, uint32_t w, int i0, float4 v) {
  constexpr int M = 8 / BITS;
  d = kt_fma_at<0>(d, kt_fwin<BITS, 0>(w, i0), v.x);
  d = kt_fma_at<1 % M>(d, kt_fwin<BITS, 1 % M>(w, i0 + 1), v.y);
  d = kt_fma_at<2 % M>(d, kt_fwin<BITS, 2 % M>(w, i0 + 2), v.z);
  return kt_fma_at<3 % M>(d, kt_fwin<BITS, 3 % M>(w, i0 + 3), v.w);
}

// Per-window sums of the four values of v (value e in window e % M).
template <int M>
KT_FN float4 kt_sum4w(float4 s, float4 v) {
  if (M == 1) {
    s.x += kt_sum4(v);
  } else if (M == 2) {
    s.x += v.x + v.z;
    s.y += v.y + v.w;
  } else {
    s.x += v.x;
    s.y += v.y;
    s.z += v.z;
    s.w += v.w;
  }
  return s;
}

// s sum_i q_i x_i + b sum_i x_i of one chunk from its window sums d (of f x) and xs (of x):
// sum_m (s 2^k_m) (d_m - xs_m) + b xs, written as in DQ = 0 (gs d + (b - gs) xs) per window.
template <int BITS>
KT_FN float kt_chunk_dot(float s, float b, float4 d, float4 xs) {
  constexpr int M = 8 / BITS;
  float r = 0.0f;
  KT_UNROLL
  for (int m = 0; m < M; ++m) {
    const float gs = s * float(1 << (8 - BITS * m));
    r += gs * kt_comp(d, m) + (b - gs) * kt_comp(xs, m);
  }
  return r;
}

// WP (1, 2 or 4) consecutive words of a row, starting at word WP p, in one 4-, 8- or 16-byte
// load (the words past WP are zero).
template <int WP>
KT_FN uint4 kt_load_words(const KT_GLOBAL uint32_t* row, int p) {
  uint4 r;
  if (WP == 4) {
    r = *((const KT_GLOBAL uint4*)(row) + p);
  } else if (WP == 2) {
    const uint2 u = *((const KT_GLOBAL uint2*)(row) + p);
    r.x = u.x;
    r.y = u.y;
    r.z = 0u;
    r.w = 0u;
  } else {
    r.x = row[p];
    r.y = 0u;
    r.z = 0u;
    r.w = 0u;
  }
  return r;
}

// A float16 from its bits, without intrinsics: the exponent and mantissa shifted into
// float32's, then scaled by 2^112 (exact for normal and subnormal values; inf/NaN not kept).
KT_FN float kt_f16_bits(uint32_t h) {
  const float f = KT_AS_FLOAT((h & 0x7fffu) << 13) * 5.192296858534828e33f;
  return (h & 0x8000u) ? -f : f;
}

// TK 1: float16 bits, TK 2: bfloat16 bits.
template <int TK>
KT_FN float kt_half_bits(uint32_t h) {
  return TK == 2 ? KT_AS_FLOAT(h << 16) : kt_f16_bits(h);
}

// Four consecutive values of x as float: TK 0 float32 (one 16-byte load), 1 float16 or
// 2 bfloat16 (one 8-byte load).
template <int TK, typename T>
KT_FN float4 kt_load4(const KT_GLOBAL T* p) {
  float4 r;
  if (TK == 0) {
    r = *((const KT_GLOBAL float4*)(p));
  } else {
    const uint2 u = *((const KT_GLOBAL uint2*)(p));
    r.x = kt_half_bits<TK>(u.x & 0xffffu);
    r.y = kt_half_bits<TK>(u.x >> 16);
    r.z = kt_half_bits<TK>(u.y & 0xffffu);
    r.w = kt_half_bits<TK>(u.y >> 16);
  }
  return r;
}

// acc + a . b over four components.
KT_FN float kt_dot4(float4 a, float4 b, float acc) {
  acc = KT_FMA(a.x, b.x, acc);
  acc = KT_FMA(a.y, b.y, acc);
  acc = KT_FMA(a.z, b.z, acc);
  return KT_FMA(a.w, b.w, acc);
}

// acc + s v, component-wise.
KT_FN float4 kt_axpy4(float s, float4 v, float4 acc) {
  acc.x = KT_FMA(s, v.x, acc.x);
  acc.y = KT_FMA(s, v.y, acc.y);
  acc.z = KT_FMA(s, v.z, acc.z);
  acc.w = KT_FMA(s, v.w, acc.w);
  return acc;
}

KT_FN float4 kt_mul4(float4 a, float4 b) {
  a.x *= b.x;
  a.y *= b.y;
  a.z *= b.z;
  a.w *= b.w;
  return a;
}

KT_FN float4 kt_scale4(float s, float4 v) {
  v.x *= s;
  v.y *= s;
  v.z *= s;
  v.w *= s;
  return v;
}
