// The bucket tables as arrays (docs/math.md#bucket-tables): the primitives a recurrent state carried
// between causal calls and a sequence split across processes compose (yoso.backends.Backend):
//
//   bucket_tables  T[b, s, c, j] = sum_{n: codes[b, s, n] = c} mask[b, n] x_n[j]          (no 1/m)
//   add_to_tables  base + bucket_tables(...)
//   read_buckets   out[b, n, j] = (1/m) sum_s T[b, s, codes[b, s, n], j]                  (0 where masked)
//                  with weights: (1/m) sum_s sum_c w[b, n, c] T[b, s, codes[b, s, n], c, f]
//
// A token's entries x_n are its C values, or with `outer` (F > 0) the C x F entries of the outer product
// values[n] (x) outer[n], flattened as j = c * F + f -- formed on the fly, never stored per token.
// Tables are fp32 [B, m, 2^tau, channels], channels = C or C * F.
//
// Design: no atomics; every table entry and every output entry has exactly one owner thread, which adds
// its terms in a fixed order, so results are bitwise reproducible run to run. No shared memory and no
// cooperation between threads at all: each thread reads global memory and writes its own entries.
//   * bucket_tables_sum: one thread per table entry (b, s, c, j). The caller sorts each hash's codes
//     stably (torch.sort), so bucket c's tokens are the run order[start[c] .. start[c + 1]) in position
//     order; the thread sums that run and writes the entry once (plus `base`'s entry: add_to_tables).
//     Cost O(N channels) per hash however the tokens fall, and each entry is written exactly once.
//   * bucket_tables_walk: adds a few tokens to tables already holding the base (a copy): one thread per
//     (b, s, j) walks the tokens in position order and adds each to its bucket's row. O(channels) per
//     token and hash -- a one-token decoding step touches m rows, not m 2^tau -- but the tokens are a
//     serial chain per thread, so the launcher takes it only for short chunks (_plans.ADD_WALK_MAX_TOKENS).
//   * read_buckets_plain / read_buckets_weighted: one thread per output entry, the hashes in order.
// Masked tokens are skipped (a branch, not a product: their content, inf or NaN, never reaches a sum);
// codes are in [0, 2^tau) (checked by the API), and `& (buckets - 1)` only keeps a bad one inside the table.
#include "common.cuh"

// Entry j of token `row`'s flattened channels: values[row, j], or with outer (F > 0) values[row, j / F] *
// outer[row, j % F].
template <typename T>
__device__ __forceinline__ float token_entry(const T* __restrict__ values, const T* __restrict__ outer, i64 row,
                                             int C, int F, int j) {
  if (F == 0) return to_float(values[row * C + j]);
  const int c = j / F;
  return to_float(values[row * C + c]) * to_float(outer[row * F + (j - c * F)]);
}

// tables[b, s] = base[b, s] (if given) + the bucket sums of hash s. order, start: per (b, s) the stable
// sort of the codes (positions, [B, m, N]) and each bucket's first index in it ([B, m, 2^tau + 1]).
// grid (ceil(2^tau * channels / 256), m, B); block 256; no shared memory. tables may not alias base.
template <typename T>
__global__ void __launch_bounds__(256) bucket_tables_sum(const int* __restrict__ order, const int* __restrict__ start,
                                                         const T* __restrict__ values, const T* __restrict__ outer,
                                                         const unsigned char* __restrict__ mask,
                                                         const float* __restrict__ base, float* __restrict__ tables,
                                                         int m, int N, int C, int F, int tau) {
  const int s = blockIdx.y;
  const int b = blockIdx.z;
  const int buckets = 1 << tau;
  const int channels = F == 0 ? C : C * F;
  const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;  // (bucket, channel) within hash s
  if (e >= (i64)buckets * channels) return;
  const int bucket = (int)(e / channels);
  const int j = (int)(e - (i64)bucket * channels);
  const i64 hash_row = (i64)b * m + s;
  const int* run = order + hash_row * N;
  const int first = start[hash_row * (buckets + 1) + bucket];
  const int last = start[hash_row * (buckets + 1) + bucket + 1];
  float sum = 0.f;
  for (int t = first; t < last; ++t) {  // the bucket's tokens in position order
    const i64 row = (i64)b * N + run[t];
    if (kept(mask, row)) sum += token_entry(values, outer, row, C, F, j);
  }
  const i64 at = hash_row * buckets * channels + e;
  tables[at] = base == nullptr ? sum : base[at] + sum;
}

// tables[b, s, codes[b, s, n]] += x_n for n = 0 .. N - 1 in order, in place (the caller passes a copy of
// the running tables). grid (ceil(channels / 256), m, B); block 256; no shared memory.
template <typename T>
__global__ void __launch_bounds__(256) bucket_tables_walk(const int* __restrict__ codes, const T* __restrict__ values,
                                                          const T* __restrict__ outer,
                                                          const unsigned char* __restrict__ mask,
                                                          float* __restrict__ tables, int m, int N, int C, int F,
                                                          int tau) {
  const int s = blockIdx.y;
  const int b = blockIdx.z;
  const int buckets = 1 << tau;
  const int channels = F == 0 ? C : C * F;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= channels) return;
  const i64 hash_row = (i64)b * m + s;
  float* table = tables + hash_row * buckets * channels;
  for (int n = 0; n < N; ++n) {
    const i64 row = (i64)b * N + n;
    if (!kept(mask, row)) continue;
    const int code = codes[hash_row * N + n] & (buckets - 1);
    table[(i64)code * channels + j] += token_entry(values, outer, row, C, F, j);
  }
}

// out[b, n, c] = (1/m) sum_s tables[b, s, codes[b, s, n], c]; zero rows where mask is False.
// grid (ceil(N * C / 256), B); block 256; no shared memory.
__global__ void __launch_bounds__(256) read_buckets_plain(const int* __restrict__ codes,
                                                          const float* __restrict__ tables,
                                                          const unsigned char* __restrict__ mask,
                                                          float* __restrict__ out, int m, int N, int C, int tau) {
  const int b = blockIdx.y;
  const int buckets = 1 << tau;
  const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;  // (n, c) within row b
  if (e >= (i64)N * C) return;
  const int n = (int)(e / C);
  const int c = (int)(e - (i64)n * C);
  const i64 row = (i64)b * N + n;
  float sum = 0.f;
  if (kept(mask, row)) {
    for (int s = 0; s < m; ++s) {
      const i64 hash_row = (i64)b * m + s;
      const int code = codes[hash_row * N + n] & (buckets - 1);
      sum += tables[(hash_row * buckets + code) * C + c];
    }
    sum /= (float)m;
  }
  out[row * C + c] = sum;
}

// out[b, n, f] = (1/m) sum_s sum_c weights[b, n, c] tables[b, s, codes[b, s, n], c, f]; zero rows where mask
// is False. grid (ceil(N * F / 256), B); block 256; no shared memory.
template <typename T>
__global__ void __launch_bounds__(256) read_buckets_weighted(const int* __restrict__ codes,
                                                             const float* __restrict__ tables,
                                                             const T* __restrict__ weights,
                                                             const unsigned char* __restrict__ mask,
                                                             float* __restrict__ out, int m, int N, int C, int F,
                                                             int tau) {
  const int b = blockIdx.y;
  const int buckets = 1 << tau;
  const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;  // (n, f) within row b
  if (e >= (i64)N * F) return;
  const int n = (int)(e / F);
  const int f = (int)(e - (i64)n * F);
  const i64 row = (i64)b * N + n;
  float sum = 0.f;
  if (kept(mask, row)) {
    for (int s = 0; s < m; ++s) {
      const i64 hash_row = (i64)b * m + s;
      const int code = codes[hash_row * N + n] & (buckets - 1);
      const float* entry = tables + (hash_row * buckets + code) * C * F + f;  // column f of the C x F table
      for (int c = 0; c < C; ++c) sum += to_float(weights[row * C + c]) * entry[(i64)c * F];
    }
    sum /= (float)m;
  }
  out[row * F + f] = sum;
}
