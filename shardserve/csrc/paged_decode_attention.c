// Decode attention over the paged KV cache on CPU: one query token per sequence, keys and values read
// in place through the block table (no gathered copy), softmax in two passes over the scores.
// Parallel over (sequence, kv head); the query heads of a GQA group share each loaded key/value row.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

// A head's rows within a block are contiguous, but blocks are scattered: prefetch a few tokens ahead so the
// jump to the next block does not stall.
#define PREFETCH_DISTANCE 16

// Cache layout: [num_blocks, num_kv_heads, block_size, head_dim].
static inline const float *token_row(const float *cache, const int64_t *table, int64_t t, int64_t block_size,
                                     int64_t num_kv_heads, int64_t kvh, int64_t head_dim) {
  return cache + ((table[t / block_size] * num_kv_heads + kvh) * block_size + t % block_size) * head_dim;
}

static inline void prefetch_row(const float *row, int64_t head_dim) {
  for (int64_t d = 0; d < head_dim; d += 16) __builtin_prefetch(row + d, 0, 3);
}

void paged_decode_attention_f32(
    const float *q,            // [num_seqs, num_heads, head_dim]
    const float *k_cache,      // [num_blocks, num_kv_heads, block_size, head_dim]
    const float *v_cache,      // same layout as k_cache
    const int64_t *block_tables,  // [num_seqs, max_blocks]
    const int64_t *seq_lens,   // [num_seqs]
    float *out,                // [num_seqs, num_heads, head_dim]
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t max_blocks, float scale, int num_threads) {
  const int64_t group = num_heads / num_kv_heads;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t s = 0; s < num_seqs; s++) {
    for (int64_t kvh = 0; kvh < num_kv_heads; kvh++) {
      const int64_t len = seq_lens[s];
      const int64_t *table = block_tables + s * max_blocks;
      float *scores = (float *)malloc(sizeof(float) * len * group);
      float *acc = (float *)calloc(group * head_dim, sizeof(float));
      const float *qh = q + (s * num_heads + kvh * group) * head_dim;
      float maxv[64];
      for (int64_t g = 0; g < group; g++) maxv[g] = -INFINITY;
      for (int64_t t = 0; t < len; t++) {
        if (t + PREFETCH_DISTANCE < len)
          prefetch_row(token_row(k_cache, table, t + PREFETCH_DISTANCE, block_size, num_kv_heads, kvh, head_dim),
                       head_dim);
        const float *k = token_row(k_cache, table, t, block_size, num_kv_heads, kvh, head_dim);
        for (int64_t g = 0; g < group; g++) {
          const float *qg = qh + g * head_dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; d++) dot += qg[d] * k[d];
          dot *= scale;
          scores[g * len + t] = dot;
          if (dot > maxv[g]) maxv[g] = dot;
        }
      }
      float sum[64];
      for (int64_t g = 0; g < group; g++) {
        float total = 0.f;
        for (int64_t t = 0; t < len; t++) {
          float e = expf(scores[g * len + t] - maxv[g]);
          scores[g * len + t] = e;
          total += e;
        }
        sum[g] = total;
      }
      for (int64_t t = 0; t < len; t++) {
        if (t + PREFETCH_DISTANCE < len)
          prefetch_row(token_row(v_cache, table, t + PREFETCH_DISTANCE, block_size, num_kv_heads, kvh, head_dim),
                       head_dim);
        const float *v = token_row(v_cache, table, t, block_size, num_kv_heads, kvh, head_dim);
        for (int64_t g = 0; g < group; g++) {
          const float p = scores[g * len + t];
          float *a = acc + g * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; d++) a[d] += p * v[d];
        }
      }
      for (int64_t g = 0; g < group; g++) {
        float *o = out + (s * num_heads + kvh * group + g) * head_dim;
        const float inv = 1.f / sum[g];
        for (int64_t d = 0; d < head_dim; d++) o[d] = acc[g * head_dim + d] * inv;
      }
      free(scores);
      free(acc);
    }
  }
}
