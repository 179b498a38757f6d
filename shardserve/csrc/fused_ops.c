// A decoder layer's small elementwise steps in one pass each on CPU (fp32), where the torch expressions
// cost several operator dispatches and a temporary per step: (residual add +) RMSNorm, neox rotary of q
// and k in place, and SwiGLU's silu(gate) * up. They compute what layers/layernorm.py, layers/rotary.py
// and layers/activation.py compute in torch; rows are split across threads when there are enough of them.
#include <math.h>
#include <stdint.h>

#include "simd_math.h"

// Below this many elements a call runs on the calling thread: waking the team costs more than it saves.
#define PARALLEL_MIN 32768

// out = weight * x / rms(x); with residual: x += residual first, and the sum is written to residual_out.
void rms_norm_f32(const float *x, const float *residual, const float *weight, float *out, float *residual_out,
                  int64_t rows, int64_t n, int64_t stride_x, int64_t stride_r, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * n >= PARALLEL_MIN)
  for (int64_t t = 0; t < rows; t++) {
    const float *xr = x + t * stride_x;
    float *o = out + t * n;
    const float *src = xr;
    if (residual != 0) {
      const float *rr = residual + t * stride_r;
      float *ro = residual_out + t * n;
#pragma omp simd
      for (int64_t i = 0; i < n; i++) ro[i] = xr[i] + rr[i];
      src = ro;
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) sum += src[i] * src[i];
    const float inv = 1.f / sqrtf(sum / (float)n + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) o[i] = weight[i] * (src[i] * inv);
  }
}

// q: [T, Hq, D] and k: [T, Hk, D] with their own token and head strides (views of one QKV output), rotated
// in place: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) on the two halves; cos, sin: [T, D / 2] rows of
// stride stride_c.
void rotary_neox_f32(float *q, float *k, const float *cos, const float *sin, int64_t tokens, int64_t num_q_heads,
                     int64_t num_k_heads, int64_t head_dim, int64_t stride_qt, int64_t stride_qh, int64_t stride_kt,
                     int64_t stride_kh, int64_t stride_c, int num_threads) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if (tokens * (num_q_heads + num_k_heads) * head_dim >= PARALLEL_MIN)
  for (int64_t t = 0; t < tokens; t++) {
    const float *c = cos + t * stride_c, *s = sin + t * stride_c;
    for (int64_t h = 0; h < num_q_heads + num_k_heads; h++) {
      float *x = h < num_q_heads ? q + t * stride_qt + h * stride_qh : k + t * stride_kt + (h - num_q_heads) * stride_kh;
#pragma omp simd
      for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
  }
}

// x: [T, 2 * n] rows of stride stride_x holding gate then up; out: [T, n] = act(gate) * up, where act is
// SiLU, g / (1 + e^-g), or (tanh_gelu) GELU's tanh form 0.5 g (1 + tanh(u)), u = sqrt(2/pi) (g + 0.044715 g^3),
// written the same way: 0.5 (1 + tanh(u)) = 1 / (1 + e^-2u), so act(g) = g / (1 + e^a) with a = -g or -2u.
#define GELU_K 0.7978845608028654f  // sqrt(2 / pi)
void gated_act_and_mul_f32(const float *x, float *out, int64_t rows, int64_t n, int64_t stride_x, int64_t tanh_gelu,
                           int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * n >= PARALLEL_MIN)
  for (int64_t t = 0; t < rows; t++) {
    const float *gate = x + t * stride_x, *up = gate + n;
    float *o = out + t * n;
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
    const __m512 k2 = _mm512_set1_ps(-2.f * GELU_K), k3 = _mm512_set1_ps(-2.f * GELU_K * 0.044715f);
    for (; i + 16 <= n; i += 16) {
      const __m512 g = _mm512_loadu_ps(gate + i);
      // -2u = g * (-2k - 2k * 0.044715 g^2)
      const __m512 a =
          tanh_gelu ? _mm512_mul_ps(g, _mm512_fmadd_ps(_mm512_mul_ps(g, g), k3, k2)) : _mm512_sub_ps(zero, g);
      const __m512 act = _mm512_div_ps(g, _mm512_add_ps(one, exp16(a)));
      _mm512_storeu_ps(o + i, _mm512_mul_ps(act, _mm512_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) {
      const float g = gate[i];
      const float a = tanh_gelu ? -2.f * GELU_K * (g + 0.044715f * g * g * g) : -g;
      o[i] = g / (1.f + expf(a)) * up[i];
    }
  }
}
