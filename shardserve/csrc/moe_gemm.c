// The experts' GEMMs of a mixture-of-experts layer on CPU (fp32). A step's (token, expert) rows arrive sorted
// by expert; each expert's rows are multiplied by its weight, packed at load time (layers/fused_moe.py) as
// [E, ceil(n / 16), k, 16]: for every block of 16 output columns, the k rows of 16 weights one after another.
// A task (expert, block of columns) streams its 16 * k weights once, in order, and uses each vector of 16
// against up to 8 token rows held in registers; experts without rows are skipped. At decode sizes (a few
// rows per expert) that reads the weights at the memory's speed, where a library GEMM per expert spends a
// call's setup and packing on 1-8 rows; at prefill sizes it still beat torch's grouped GEMM on the machine
// of benchmarks/RESULTS.md.
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define LANES 16  // output columns per block: one AVX-512 vector (two AVX2 ones)
#define TILE 8    // token rows per pass over a block

// Rows x[0:rows] (of length k) times one block of packed weights, into out's columns j to j + 16 (fewer at
// the matrix's edge). Inlined with a constant `rows`, so the accumulators live in registers.
static inline __attribute__((always_inline)) void block_tile(const float *x, const float *wp, float *out, int64_t n,
                                                             int64_t k, int64_t j, const int rows) {
  float acc[TILE][LANES];
  for (int t = 0; t < rows; t++)
#pragma omp simd
    for (int l = 0; l < LANES; l++) acc[t][l] = 0.f;
  for (int64_t i = 0; i < k; i++) {
    const float *wv = wp + i * LANES;
    for (int t = 0; t < rows; t++) {
      const float xv = x[t * k + i];
#pragma omp simd
      for (int l = 0; l < LANES; l++) acc[t][l] += xv * wv[l];
    }
  }
  const int64_t cols = n - j < LANES ? n - j : LANES;
  for (int t = 0; t < rows; t++) memcpy(out + t * n + j, acc[t], cols * sizeof(float));
}

// out[p, :] = x[p, :] @ w[e]^T for the rows p of expert e: rows ends[e-1] (0 for e = 0) to ends[e] of x.
// x: [P, k], packed w: [E, ceil(n / 16), k, 16], out: [P, n], all contiguous.
//
// Each thread takes one contiguous run of the (expert, block) tasks, runs cut so the threads' costs are equal
// (a task costs its weights' stream plus its tiles of rows). Contiguous runs keep each thread's reads one
// forward stream the prefetchers follow: handing tasks out one by one (dynamic scheduling) read the weights
// of a decode step at 25 GB/s where this reads them at 31, the memory's speed (benchmarks/RESULTS.md).
void moe_grouped_gemm_f32(const float *x, const float *w_packed, const int32_t *ends, float *out,
                          int64_t num_experts, int64_t n, int64_t k, int num_threads) {
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
        const float *wp = w_packed + (e * blocks + block) * k * LANES;
        const int64_t j = block * LANES;
        for (int64_t p = start; p < end; p += TILE) {
          const float *xp = x + p * k;
          float *op = out + p * n;
          switch (end - p < TILE ? end - p : TILE) {
            case 1: block_tile(xp, wp, op, n, k, j, 1); break;
            case 2: block_tile(xp, wp, op, n, k, j, 2); break;
            case 3: block_tile(xp, wp, op, n, k, j, 3); break;
            case 4: block_tile(xp, wp, op, n, k, j, 4); break;
            case 5: block_tile(xp, wp, op, n, k, j, 5); break;
            case 6: block_tile(xp, wp, op, n, k, j, 6); break;
            case 7: block_tile(xp, wp, op, n, k, j, 7); break;
            default: block_tile(xp, wp, op, n, k, j, TILE); break;
          }
        }
      }
    }
  }
}
