// Decode attention over the paged KV cache on CPU: one query token per sequence, keys and values read
// in place through the block table (no gathered copy).
// Parallel over (sequence, kv head); the query heads of a GQA group share each loaded key/value row.
// One pass, block by block, sixteen keys at a time, with the softmax kept online: a chunk's keys and then
// its values are read while both are in cache, and the running sums are rescaled once per chunk, not per
// token. With a sliding window (window > 0) a sequence attends to its last `window` keys only: the blocks
// before them are neither read nor prefetched. Queries, cache and outputs are fp32 or bf16 (widened to fp32 as
// they are loaded: bf16 is fp32's upper half; outputs rounded once); the arithmetic is fp32. softcap > 0 caps
// each scaled score as softcap * tanh(score / softcap) (Gemma 2).
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd_math.h"

#define CHUNK 16  // keys attended at a time: one AVX-512 vector of scores

// Cache layout: [num_blocks, num_kv_heads, block_size, head_dim], so one head's rows in a block are one
// contiguous run (4 KB at 16 x 64 floats). Blocks are scattered, so the hardware's stream prefetchers lose the
// trail at every block: the loop prefetches its keys and values itself, PREFETCH_BLOCKS blocks ahead and on
// into the next (sequence, kv head) item, into L2 rather than L1 (a block's lines would crowd out the
// accumulators, and L1 tracks too few misses at a time). From DRAM that read 26 GB/s on a 2-core EPYC VM where
// one block ahead into L1 read 15 (benchmarks/RESULTS.md).
#define PREFETCH_BLOCKS 2

// The address of element `index` of a cache (fp32, or bf16 where bf16 is set).
static inline const char *element(const void *cache, int64_t index, const int bf16) {
  return (const char *)cache + index * (bf16 ? 2 : 4);
}

static inline const char *head_block(const void *cache, int64_t block, int64_t num_kv_heads, int64_t kvh,
                                     int64_t block_size, int64_t head_dim, const int bf16) {
  return element(cache, (block * num_kv_heads + kvh) * block_size * head_dim, bf16);
}

// One kv head's keys and values in one block, into L2 (prefetcht1), a 64-byte line at a time.
static inline void prefetch_head_block(const void *k_cache, const void *v_cache, int64_t block,
                                       int64_t num_kv_heads, int64_t kvh, int64_t block_size, int64_t head_dim,
                                       const int bf16) {
  const char *k = head_block(k_cache, block, num_kv_heads, kvh, block_size, head_dim, bf16);
  const char *v = head_block(v_cache, block, num_kv_heads, kvh, block_size, head_dim, bf16);
  const int64_t bytes = block_size * head_dim * (bf16 ? 2 : 4);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(k + i, 0, 2);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(v + i, 0, 2);
}

// One query head against m <= CHUNK keys k[i] = k0 + i * head_dim (values likewise): raises the running
// maximum *maxv if the chunk has a larger score (rescaling acc and *sum), then adds e^(score - max) * v
// to acc (head_dim values, padded to a multiple of 16 with zeros) and e^(score - max) to *sum.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
static inline __attribute__((always_inline)) void attend_chunk(const float *qg, const char *k0, const char *v0,
                                                               int64_t m, int64_t head_dim, float scale,
                                                               float softcap, float *acc, float *maxv, float *sum,
                                                               const int bf16) {
  const int64_t nvec = (head_dim + 15) / 16;
  const __mmask16 last = head_dim % 16 ? (__mmask16)((1u << (head_dim % 16)) - 1) : (__mmask16)0xFFFF;
  const __mmask16 valid = (__mmask16)((1u << m) - 1);
  float sc[CHUNK];
  for (int64_t i = 0; i < m; i++) {
    const char *k = element(k0, i * head_dim, bf16);
    __m512 dot = _mm512_setzero_ps();
    for (int64_t c = 0; c < nvec; c++) {
      const __mmask16 mask = c + 1 < nvec ? (__mmask16)0xFFFF : last;
      dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, qg + 16 * c), masked_load16_f32(k, 16 * c, mask, bf16), dot);
    }
    sc[i] = _mm512_reduce_add_ps(dot);
  }
  // The scores as one vector: the chunk's maximum, exponentials and their sum are one operation each.
  __m512 scores = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, sc), _mm512_set1_ps(scale));
  if (softcap > 0.f) {  // softcap * tanh(s / softcap), tanh(x) = 1 - 2 / (1 + e^2x)
    const __m512 e = exp16(_mm512_mul_ps(scores, _mm512_set1_ps(2.f / softcap)));
    const __m512 t = _mm512_sub_ps(_mm512_set1_ps(1.f), _mm512_div_ps(_mm512_set1_ps(2.f),
                                                                     _mm512_add_ps(_mm512_set1_ps(1.f), e)));
    scores = _mm512_mul_ps(t, _mm512_set1_ps(softcap));
  }
  const float chunk_max = _mm512_mask_reduce_max_ps(valid, scores);
  if (chunk_max > *maxv) {  // rescale what was summed under the old maximum
    const float r = expf(*maxv - chunk_max);
    for (int64_t c = 0; c < nvec; c++)
      _mm512_storeu_ps(acc + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * c), _mm512_set1_ps(r)));
    *sum *= r;
    *maxv = chunk_max;
  }
  const __m512 p = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(scores, _mm512_set1_ps(*maxv))));
  *sum += _mm512_reduce_add_ps(p);
  float pw[CHUNK];
  _mm512_storeu_ps(pw, p);
  for (int64_t c = 0; c < nvec; c++) {
    const __mmask16 mask = c + 1 < nvec ? (__mmask16)0xFFFF : last;
    __m512 o = _mm512_loadu_ps(acc + 16 * c);
    for (int64_t i = 0; i < m; i++) {
      const __m512 v = masked_load16_f32(element(v0, i * head_dim, bf16), 16 * c, mask, bf16);
      o = _mm512_fmadd_ps(_mm512_set1_ps(pw[i]), v, o);
    }
    _mm512_storeu_ps(acc + 16 * c, o);
  }
}
#else
static inline __attribute__((always_inline)) void attend_chunk(const float *qg, const char *k0, const char *v0,
                                                               int64_t m, int64_t head_dim, float scale,
                                                               float softcap, float *acc, float *maxv, float *sum,
                                                               const int bf16) {
  float sc[CHUNK];
  float chunk_max = -INFINITY;
  for (int64_t i = 0; i < m; i++) {
    const char *k = element(k0, i * head_dim, bf16);
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < head_dim; d++) dot += qg[d] * load_f32(k, d, bf16);
    sc[i] = dot * scale;
    if (softcap > 0.f) sc[i] = softcap * tanhf(sc[i] / softcap);
    if (sc[i] > chunk_max) chunk_max = sc[i];
  }
  if (chunk_max > *maxv) {  // rescale what was summed under the old maximum
    const float r = expf(*maxv - chunk_max);
#pragma omp simd
    for (int64_t d = 0; d < head_dim; d++) acc[d] *= r;
    *sum *= r;
    *maxv = chunk_max;
  }
  for (int64_t i = 0; i < m; i++) {
    const float p = expf(sc[i] - *maxv);
    const char *v = element(v0, i * head_dim, bf16);
    *sum += p;
#pragma omp simd
    for (int64_t d = 0; d < head_dim; d++) acc[d] += p * load_f32(v, d, bf16);
  }
}
#endif

// The kernel for one cache dtype (inlined with a constant bf16 into each of the exported function's branches).
static inline __attribute__((always_inline)) void decode_attention(
    const void *q, const void *k_cache, const void *v_cache, const int64_t *block_tables, const int64_t *seq_lens,
    void *out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
    int64_t max_blocks, int64_t stride_q, float scale, int64_t window, float softcap, int num_threads,
    const int bf16) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t width = (head_dim + 15) / 16 * 16;  // a head's accumulator, padded to whole vectors
  const int64_t num_items = num_seqs * num_kv_heads;  // (sequence, kv head) pairs, in equal runs per thread
#pragma omp parallel num_threads(num_threads)
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t first = num_items * t / threads, end = num_items * (t + 1) / threads;
    for (int64_t item = first; item < end; item++) {
      const int64_t s = item / num_kv_heads, kvh = item % num_kv_heads;
      const int64_t len = seq_lens[s];
      const int64_t start = window > 0 && len > window ? len - window : 0;  // the first key attended
      const int64_t num_blocks = (len + block_size - 1) / block_size;
      const int64_t *table = block_tables + s * max_blocks;
      // The blocks prefetched ahead of block b: this item's, then the next item's first ones.
      const int64_t next_s = (item + 1) / num_kv_heads, next_kvh = (item + 1) % num_kv_heads;
      const int64_t next_len = item + 1 < end ? seq_lens[next_s] : 0;
      const int64_t next_first = window > 0 && next_len > window ? (next_len - window) / block_size : 0;
      const int64_t next_blocks = (next_len + block_size - 1) / block_size;
      const int64_t *next_table = block_tables + next_s * max_blocks;
      if (item == first)
        for (int64_t b = start / block_size; b < start / block_size + PREFETCH_BLOCKS && b < num_blocks; b++)
          prefetch_head_block(k_cache, v_cache, table[b], num_kv_heads, kvh, block_size, head_dim, bf16);
      const float *qh = (const float *)q + s * stride_q + kvh * group * head_dim;
      float widened_q[bf16 ? group * head_dim : 1];  // a bf16 step's queries of this kv head, as fp32
      if (bf16) {
        const uint16_t *qb = (const uint16_t *)q + s * stride_q + kvh * group * head_dim;
        for (int64_t i = 0; i < group * head_dim; i++) widened_q[i] = load_f32(qb, i, 1);
        qh = widened_q;
      }
      float acc[group * width];  // [group, width]
      float maxv[group], sum[group];
      for (int64_t i = 0; i < group * width; i++) acc[i] = 0.f;
      for (int64_t g = 0; g < group; g++) {
        maxv[g] = -INFINITY;
        sum[g] = 0.f;
      }
      for (int64_t b = start / block_size; b < num_blocks; b++) {
        const int64_t ahead = b + PREFETCH_BLOCKS;
        if (ahead < num_blocks)
          prefetch_head_block(k_cache, v_cache, table[ahead], num_kv_heads, kvh, block_size, head_dim, bf16);
        else if (next_first + ahead - num_blocks < next_blocks)
          prefetch_head_block(k_cache, v_cache, next_table[next_first + ahead - num_blocks], num_kv_heads, next_kvh,
                              block_size, head_dim, bf16);
        const char *kb = head_block(k_cache, table[b], num_kv_heads, kvh, block_size, head_dim, bf16);
        const char *vb = head_block(v_cache, table[b], num_kv_heads, kvh, block_size, head_dim, bf16);
        const int64_t n = (b + 1 < num_blocks) ? block_size : len - b * block_size;
        const int64_t j_first = b * block_size < start ? start - b * block_size : 0;
        for (int64_t j0 = j_first; j0 < n; j0 += CHUNK) {
          const int64_t m = n - j0 < CHUNK ? n - j0 : CHUNK;
          for (int64_t g = 0; g < group; g++)
            attend_chunk(qh + g * head_dim, element(kb, j0 * head_dim, bf16), element(vb, j0 * head_dim, bf16), m,
                         head_dim, scale, softcap, acc + g * width, &maxv[g], &sum[g], bf16);
        }
      }
      for (int64_t g = 0; g < group; g++) {
        const int64_t o = (s * num_heads + kvh * group + g) * head_dim;
        const float inv = 1.f / sum[g];
#pragma omp simd
        for (int64_t d = 0; d < head_dim; d++) store_f32(out, o + d, acc[g * width + d] * inv, bf16);
      }
    }
  }
}

void paged_decode_attention(
    const void *q,             // [num_seqs, num_heads, head_dim], rows of stride stride_q (heads contiguous)
    const void *k_cache,       // [num_blocks, num_kv_heads, block_size, head_dim], fp32 or (cache_bf16) bf16
    const void *v_cache,       // same layout and dtype as k_cache
    const int64_t *block_tables,  // [num_seqs, max_blocks]
    const int64_t *seq_lens,   // [num_seqs]
    void *out,                 // [num_seqs, num_heads, head_dim]; q and out are of the cache's dtype
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
    int64_t max_blocks, int64_t stride_q, float scale, int64_t window, float softcap, int64_t cache_bf16,
    int num_threads) {
  if (cache_bf16)
    decode_attention(q, k_cache, v_cache, block_tables, seq_lens, out, num_seqs, num_heads, num_kv_heads, head_dim,
                     block_size, max_blocks, stride_q, scale, window, softcap, num_threads, 1);
  else
    decode_attention(q, k_cache, v_cache, block_tables, seq_lens, out, num_seqs, num_heads, num_kv_heads, head_dim,
                     block_size, max_blocks, stride_q, scale, window, softcap, num_threads, 0);
}

// Writes a step's new keys and values into the paged cache: token t's rows go to slot slots[t] (block
// slots[t] / block_size, offset slots[t] % block_size); a slot of -1 is a padding row, written nowhere.
// k, v: [T, num_kv_heads, head_dim] with their own token and head strides (views of one QKV output), of the
// cache's dtype: elements of `element_size` bytes, copied.
void store_kv(const void *k, const void *v, void *k_cache, void *v_cache, const int64_t *slots, int64_t tokens,
              int64_t num_kv_heads, int64_t head_dim, int64_t stride_kt, int64_t stride_kh, int64_t stride_vt,
              int64_t stride_vh, int64_t block_size, int64_t element_size, int num_threads) {
  const int64_t row_bytes = head_dim * element_size;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (tokens * num_kv_heads * head_dim >= 65536)
  for (int64_t t = 0; t < tokens; t++) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    for (int64_t h = 0; h < num_kv_heads; h++) {
      const int64_t row = ((slot / block_size) * num_kv_heads + h) * block_size + slot % block_size;
      memcpy((char *)k_cache + row * row_bytes, (const char *)k + (t * stride_kt + h * stride_kh) * element_size,
             row_bytes);
      memcpy((char *)v_cache + row * row_bytes, (const char *)v + (t * stride_vt + h * stride_vh) * element_size,
             row_bytes);
    }
  }
}
