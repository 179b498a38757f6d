// Helpers shared by the CPU kernels of this directory (compiled together into one library): elements of fp32
// or bf16 tensors read and written as fp32, and SIMD math.
#pragma once

#include <stdint.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

// Element i of an fp32 array, or of a bf16 one where bf16 is set, as fp32 (bf16 is fp32's upper half: widened
// exactly by a shift). Called with a constant bf16, so each caller compiles one loop per dtype.
ALWAYS_INLINE float load_f32(const void *p, int64_t i, const int bf16) {
  if (!bf16) return ((const float *)p)[i];
  const uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
  float value;
  memcpy(&value, &bits, sizeof value);
  return value;
}

// f's bf16 bits, rounded to nearest even as torch rounds (a NaN becomes torch's quiet NaN, 0x7fc0).
ALWAYS_INLINE uint16_t bf16_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  const uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : rounded;
}

// Writes f as element i of an fp32 array, or (bf16) rounded into a bf16 one.
ALWAYS_INLINE void store_f32(void *p, int64_t i, float f, const int bf16) {
  if (bf16)
    ((uint16_t *)p)[i] = bf16_bits(f);
  else
    ((float *)p)[i] = f;
}

// f as a tensor of the dtype holds it: unchanged in fp32, rounded to bf16 and widened back in bf16 (a torch op
// on bf16 tensors rounds its result so; kernels that fuse several ops round where each op would).
ALWAYS_INLINE float as_stored(float f, const int bf16) {
  if (!bf16) return f;
  const uint32_t bits = (uint32_t)bf16_bits(f) << 16;
  float value;
  memcpy(&value, &bits, sizeof value);
  return value;
}

#if defined(__AVX512F__)
#include <immintrin.h>

// 16 bf16 values as fp32 (a bf16 is the upper half of the fp32 of the same value).
ALWAYS_INLINE __m512 widen_bf16x16(__m256i half) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// 16 elements from i on of an fp32 (or bf16) array, as fp32.
ALWAYS_INLINE __m512 load16_f32(const void *p, int64_t i, const int bf16) {
  if (!bf16) return _mm512_loadu_ps((const float *)p + i);
  return widen_bf16x16(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
}

#if defined(__AVX512BW__) && defined(__AVX512VL__)
// The lanes of `mask` of load16_f32 (the others zero), read without touching memory past them.
ALWAYS_INLINE __m512 masked_load16_f32(const void *p, int64_t i, __mmask16 mask, const int bf16) {
  if (!bf16) return _mm512_maskz_loadu_ps(mask, (const float *)p + i);
  return widen_bf16x16(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)p + i));
}
#endif

// v rounded to bf16 as torch rounds, in the upper halves of fp32 lanes (the lower halves zero).
ALWAYS_INLINE __m512i bf16_rounded16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, _mm512_and_si512(rounded, _mm512_set1_epi32((int)0xffff0000u)),
                                 _mm512_set1_epi32(0x7fc00000));
}

// Writes 16 fp32 lanes from element i on of an fp32 (or, rounded, bf16) array.
ALWAYS_INLINE void store16_f32(void *p, int64_t i, __m512 v, const int bf16) {
  if (bf16)
    _mm256_storeu_si256((__m256i *)((uint16_t *)p + i),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_rounded16(v), 16)));
  else
    _mm512_storeu_ps((float *)p + i, v);
}

// v as a tensor of the dtype holds it (as_stored on 16 lanes).
ALWAYS_INLINE __m512 as_stored16(__m512 v, const int bf16) {
  return bf16 ? _mm512_castsi512_ps(bf16_rounded16(v)) : v;
}

// e^x on 16 lanes to about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r from Cephes' expf polynomial,
// then scaled by 2^n. Inputs below -87 (e^x under float's normal range) are taken as -87; NaN stays NaN.
ALWAYS_INLINE __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: r stays exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

#endif
