// A decoder layer's small elementwise steps in one pass each on CPU, fp32 or bf16, where the torch expressions
// cost several operator dispatches and a temporary per step: (residual add +) RMSNorm, neox rotary of q and k
// in place, SwiGLU's silu(gate) * up (or GeGLU's). They compute what layers/layernorm.py, layers/rotary.py and
// layers/activation.py compute, in fp32 arithmetic; in bf16 each intermediate is rounded where the torch
// expression's op rounds its result (as_stored), so the two paths agree to float noise. Rows are split across
// threads when there are enough of them.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd_math.h"

// Below this many elements a call runs on the calling thread: waking the team costs more than it saves.
#define PARALLEL_MIN 32768

// One row of rms_norm: the torch path's x + residual (rounded as the residual stream holds it), its sum of
// squares in fp32, then weight * (x / rms) with the normed row rounded before the scale.
ALWAYS_INLINE void rms_norm_row(const void *x, const void *residual, const void *weight, void *out,
                                void *residual_out, int64_t n, float eps, const int bf16) {
  const void *src = x;
  float sum = 0.f;
  if (residual != 0) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) {
      const float s = as_stored(load_f32(x, i, bf16) + load_f32(residual, i, bf16), bf16);
      store_f32(residual_out, i, s, bf16);
      sum += s * s;
    }
    src = residual_out;
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) sum += load_f32(x, i, bf16) * load_f32(x, i, bf16);
  }
  const float inv = 1.f / sqrtf(sum / (float)n + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; i++)
    store_f32(out, i, load_f32(weight, i, bf16) * as_stored(load_f32(src, i, bf16) * inv, bf16), bf16);
}

// out = weight * x / rms(x); with residual: x += residual first, and the sum is written to residual_out. All
// of x's dtype (bf16 set: bf16, else fp32); out and residual_out are contiguous [rows, n].
void rms_norm(const void *x, const void *residual, const void *weight, void *out, void *residual_out,
              int64_t rows, int64_t n, int64_t stride_x, int64_t stride_r, float eps, int64_t bf16,
              int num_threads) {
  const int64_t size = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * n >= PARALLEL_MIN)
  for (int64_t t = 0; t < rows; t++) {
    const char *xr = (const char *)x + t * stride_x * size;
    const char *rr = residual != 0 ? (const char *)residual + t * stride_r * size : 0;
    char *o = (char *)out + t * n * size, *ro = (char *)residual_out + t * n * size;
    if (bf16)
      rms_norm_row(xr, rr, weight, o, ro, n, eps, 1);
    else
      rms_norm_row(xr, rr, weight, o, ro, n, eps, 0);
  }
}

// One head of rotary_neox: each half rotated as the torch path computes it, x1 cos - x2 sin and
// x2 cos + x1 sin, each product and sum rounded where torch's op would round it.
ALWAYS_INLINE void rotate_head(void *x, const void *c, const void *s, int64_t half, const int bf16) {
#pragma omp simd
  for (int64_t i = 0; i < half; i++) {
    const float x1 = load_f32(x, i, bf16), x2 = load_f32(x, i + half, bf16);
    const float ci = load_f32(c, i, bf16), si = load_f32(s, i, bf16);
    store_f32(x, i, as_stored(x1 * ci, bf16) - as_stored(x2 * si, bf16), bf16);
    store_f32(x, i + half, as_stored(x2 * ci, bf16) + as_stored(x1 * si, bf16), bf16);
  }
}

// q: [T, Hq, D] and k: [T, Hk, D] with their own token and head strides (views of one QKV output), rotated
// in place: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) on the two halves; cos, sin: [T, D / 2] rows of
// stride stride_c. All of one dtype (bf16 set: bf16, else fp32).
void rotary_neox(void *q, void *k, const void *cos, const void *sin, int64_t tokens, int64_t num_q_heads,
                 int64_t num_k_heads, int64_t head_dim, int64_t stride_qt, int64_t stride_qh, int64_t stride_kt,
                 int64_t stride_kh, int64_t stride_c, int64_t bf16, int num_threads) {
  const int64_t half = head_dim / 2, size = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if (tokens * (num_q_heads + num_k_heads) * head_dim >= PARALLEL_MIN)
  for (int64_t t = 0; t < tokens; t++) {
    const char *c = (const char *)cos + t * stride_c * size, *s = (const char *)sin + t * stride_c * size;
    for (int64_t h = 0; h < num_q_heads + num_k_heads; h++) {
      char *x = h < num_q_heads ? (char *)q + (t * stride_qt + h * stride_qh) * size
                                : (char *)k + (t * stride_kt + (h - num_q_heads) * stride_kh) * size;
      if (bf16)
        rotate_head(x, c, s, half, 1);
      else
        rotate_head(x, c, s, half, 0);
    }
  }
}

// act(g) = g / (1 + e^a) with a = -g (SiLU) or, for GELU's tanh form 0.5 g (1 + tanh(u)),
// u = sqrt(2/pi) (g + 0.044715 g^3), a = -2u: 0.5 (1 + tanh(u)) = 1 / (1 + e^-2u).
#define GELU_K 0.7978845608028654f  // sqrt(2 / pi)

// One row of gated_act_and_mul: act(gate) rounded as torch's activation op rounds it, times up.
ALWAYS_INLINE void gated_row(const void *gate, const void *up, void *out, int64_t n, const int tanh_gelu,
                             const int bf16) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
  const __m512 k2 = _mm512_set1_ps(-2.f * GELU_K), k3 = _mm512_set1_ps(-2.f * GELU_K * 0.044715f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = load16_f32(gate, i, bf16);
    // -2u = g * (-2k - 2k * 0.044715 g^2)
    const __m512 a =
        tanh_gelu ? _mm512_mul_ps(g, _mm512_fmadd_ps(_mm512_mul_ps(g, g), k3, k2)) : _mm512_sub_ps(zero, g);
    const __m512 act = as_stored16(_mm512_div_ps(g, _mm512_add_ps(one, exp16(a))), bf16);
    store16_f32(out, i, _mm512_mul_ps(act, load16_f32(up, i, bf16)), bf16);
  }
#endif
  for (; i < n; i++) {
    const float g = load_f32(gate, i, bf16);
    const float a = tanh_gelu ? -2.f * GELU_K * (g + 0.044715f * g * g * g) : -g;
    store_f32(out, i, as_stored(g / (1.f + expf(a)), bf16) * load_f32(up, i, bf16), bf16);
  }
}

// x: [T, 2 * n] rows of stride stride_x holding gate then up; out: [T, n] = act(gate) * up, act SiLU or
// (tanh_gelu) GELU's tanh form. Both of one dtype (bf16 set: bf16, else fp32).
void gated_act_and_mul(const void *x, void *out, int64_t rows, int64_t n, int64_t stride_x, int64_t tanh_gelu,
                       int64_t bf16, int num_threads) {
  const int64_t size = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * n >= PARALLEL_MIN)
  for (int64_t t = 0; t < rows; t++) {
    const char *gate = (const char *)x + t * stride_x * size, *up = gate + n * size;
    char *o = (char *)out + t * n * size;
    if (bf16 && tanh_gelu)
      gated_row(gate, up, o, n, 1, 1);
    else if (bf16)
      gated_row(gate, up, o, n, 0, 1);
    else if (tanh_gelu)
      gated_row(gate, up, o, n, 1, 0);
    else
      gated_row(gate, up, o, n, 0, 0);
  }
}
