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
