// The experts' GEMMs of a mixture-of-experts layer on CPU (fp32). A step's (token, expert) rows arrive sorted
// by expert; each expert's rows are multiplied by its weight, packed at load time (layers/fused_moe.py) as
// [E, ceil(n / 16), k, 16]: for every block of 16 output columns, the k rows of 16 weights one after another.
// A task (expert, block of columns) streams its 16 * k weights once, in order, and uses each vector of 16
// against up to 8 token rows held in registers; experts without rows are skipped. At decode sizes (a few
// rows per expert) that reads the weights at the memory's speed, where a library GEMM per expert spends a
// call's setup and packing on 1-8 rows; at prefill sizes it still beat torch's grouped GEMM on the machine
// of benchmarks/RESULTS.md.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd_math.h"

#define LANES 16  // output columns per block: one AVX-512 vector (two AVX2 ones)
#define TILE 8    // token rows per pass over a block

// Rows x[0:rows] (of length k) times one block of packed weights, into out's columns j to j + 16 (fewer at
// the matrix's edge). Inlined with constant `rows` and `bf16`, so the accumulators live in registers.
static inline __attribute__((always_inline)) void block_tile(const float *x, const void *wp, float *out, int64_t n,
                                                             int64_t k, int64_t j, const int rows, const int bf16) {
  float acc[TILE][LANES];
  for (int t = 0; t < rows; t++)
#pragma omp simd
    for (int l = 0; l < LANES; l++) acc[t][l] = 0.f;
  float widened[LANES];
  for (int64_t i = 0; i < k; i++) {
    // fp32 weights are read where they are (a copy first made fp32 prefill 2.4x slower); bf16 ones widened
    const float *wv = (const float *)wp + i * LANES;
    if (bf16) {
#pragma omp simd
      for (int l = 0; l < LANES; l++) widened[l] = load_f32(wp, i * LANES + l, 1);
      wv = widened;
    }
    for (int t = 0; t < rows; t++) {
      const float xv = x[t * k + i];
#pragma omp simd
      for (int l = 0; l < LANES; l++) acc[t][l] += xv * wv[l];
    }
  }
  const int64_t cols = n - j < LANES ? n - j : LANES;
  for (int t = 0; t < rows; t++) memcpy(out + t * n + j, acc[t], cols * sizeof(float));
}

// A tile of `rows` (1 to 8) rows, dispatched to its inlined copy.
static void rows_tile(const float *x, const void *wp, float *out, int64_t n, int64_t k, int64_t j, int64_t rows,
                      int bf16) {
#define TILE_CASES(b)                                     \
  switch (rows) {                                         \
    case 1: block_tile(x, wp, out, n, k, j, 1, b); break; \
    case 2: block_tile(x, wp, out, n, k, j, 2, b); break; \
    case 3: block_tile(x, wp, out, n, k, j, 3, b); break; \
    case 4: block_tile(x, wp, out, n, k, j, 4, b); break; \
    case 5: block_tile(x, wp, out, n, k, j, 5, b); break; \
    case 6: block_tile(x, wp, out, n, k, j, 6, b); break; \
    case 7: block_tile(x, wp, out, n, k, j, 7, b); break; \
    default: block_tile(x, wp, out, n, k, j, TILE, b);    \
  }
  if (bf16)
    TILE_CASES(1)
  else
    TILE_CASES(0)
#undef TILE_CASES
}

// out[p, :] = x[p, :] @ w[e]^T for the rows p of expert e: rows ends[e-1] (0 for e = 0) to ends[e] of x.
// x: [P, k] fp32, packed w: [E, ceil(n / 16), k, 16] fp32 or (weights_bf16) bf16, out: [P, n] fp32, all
// contiguous.
//
// Each thread takes one contiguous run of the (expert, block) tasks, runs cut so the threads' costs are equal
// (a task costs its weights' stream plus its tiles of rows). Contiguous runs keep each thread's reads one
// forward stream the prefetchers follow: handing tasks out one by one (dynamic scheduling) read the weights
// of a decode step at 25 GB/s where this reads them at 31, the memory's speed (benchmarks/RESULTS.md).
void moe_grouped_gemm(const float *x, const void *w_packed, const int32_t *ends, float *out, int64_t num_experts,
                      int64_t n, int64_t k, int64_t weights_bf16, int num_threads) {
  const int64_t weight_bytes = weights_bf16 ? 2 : 4;
  const int64_t blocks = (n + LANES - 1) / LANES;
  int64_t total = 0;  // in units of one block's weight stream; a tile of rows costs about two
  for (int64_t e = 0; e < num_experts; e++) {
    const int64_t rows = ends[e] - (e ? ends[e - 1] : 0);
    total += rows ? blocks * (1 + 2 * ((rows + TILE - 1) / TILE)) : 0;
  }
#pragma omp parallel num_threads(num_threads)
  {
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t lo = total * me / threads, hi = total * (me + 1) / threads;
    int64_t cost = 0;  // of the tasks before this one
    for (int64_t e = 0; e < num_experts && cost < hi; e++) {
      const int64_t start = e ? ends[e - 1] : 0, end = ends[e];
      if (start == end) continue;
      const int64_t task_cost = 1 + 2 * ((end - start + TILE - 1) / TILE);
      for (int64_t block = 0; block < blocks; block++, cost += task_cost) {
        if (cost < lo || cost >= hi) continue;  // another thread's task
        const char *wp = (const char *)w_packed + (e * blocks + block) * k * LANES * weight_bytes;
        const int64_t j = block * LANES;
        for (int64_t p = start; p < end; p += TILE)
          rows_tile(x + p * k, wp, out + p * n, n, k, j, end - p < TILE ? end - p : TILE, weights_bf16 != 0);
      }
    }
  }
}

// Routing, for the GEMMs above: each token's top_k experts by router logit (the softmax keeps their order, so
// the choice is exact), weighted by their softmax probabilities (over all experts, or renormalised over the
// chosen k), then the (token, expert) pairs grouped by expert, in token order within an expert (a stable
// sort: what torch's argsort(stable=True) of the flattened expert ids gives). Outputs: pair_token and
// pair_weight [tokens * top_k] in that order, ends [num_experts] (pairs of experts 0..e end at ends[e]).
// A step's dozen small torch ops cost ~0.4 ms a layer at decode sizes; this is a few microseconds.
void moe_route(const float *logits, int64_t tokens, int64_t num_experts, int64_t top_k, int64_t renormalize,
               int64_t *pair_token, float *pair_weight, int32_t *ends) {
  int64_t *chosen = malloc(sizeof(int64_t) * tokens * top_k);
  float *weight = malloc(sizeof(float) * tokens * top_k);
  for (int64_t e = 0; e < num_experts; e++) ends[e] = 0;
  for (int64_t t = 0; t < tokens; t++) {
    const float *row = logits + t * num_experts;
    int64_t *ids = chosen + t * top_k;
    float *w = weight + t * top_k;
    int64_t n = 0;  // the top_k largest so far, in descending order (ties: the lower expert first)
    float max = row[0], total = 0.f;
    for (int64_t e = 0; e < num_experts; e++) {
      if (row[e] > max) max = row[e];
      int64_t i;
      if (n < top_k)
        i = n++;
      else if (row[e] > row[ids[top_k - 1]])
        i = top_k - 1;  // displaces the smallest
      else
        continue;
      for (; i > 0 && row[ids[i - 1]] < row[e]; i--) ids[i] = ids[i - 1];
      ids[i] = e;
    }
    for (int64_t e = 0; e < num_experts; e++) total += expf(row[e] - max);
    float chosen_total = 0.f;
    for (int64_t j = 0; j < top_k; j++) chosen_total += (w[j] = expf(row[ids[j]] - max) / total);
    for (int64_t j = 0; j < top_k; j++) {
      if (renormalize) w[j] /= chosen_total;
      ends[ids[j]]++;
    }
  }
  for (int64_t e = 1; e < num_experts; e++) ends[e] += ends[e - 1];
  int64_t *next = malloc(sizeof(int64_t) * num_experts);  // each expert's next free pair
  for (int64_t e = 0; e < num_experts; e++) next[e] = e ? ends[e - 1] : 0;
  for (int64_t t = 0; t < tokens; t++)
    for (int64_t j = 0; j < top_k; j++) {
      const int64_t p = next[chosen[t * top_k + j]]++;
      pair_token[p] = t;
      pair_weight[p] = weight[t * top_k + j];
    }
  free(next);
  free(weight);
  free(chosen);
}

// out[t, :] = sum of pair_weight[p] * y[p, :] over the pairs p of token t (out zeroed by the caller); columns
// are split across threads, so no two threads add into one element.
void moe_combine(const float *y, const int64_t *pair_token, const float *pair_weight, float *out, int64_t pairs,
                 int64_t hidden, int num_threads) {
  const int64_t chunk = 64;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (pairs * hidden >= 65536)
  for (int64_t c0 = 0; c0 < hidden; c0 += chunk) {
    const int64_t c1 = c0 + chunk < hidden ? c0 + chunk : hidden;
    for (int64_t p = 0; p < pairs; p++) {
      const float w = pair_weight[p];
      const float *yp = y + p * hidden;
      float *o = out + pair_token[p] * hidden;
#pragma omp simd
      for (int64_t c = c0; c < c1; c++) o[c] += w * yp[c];
    }
  }
}
