// LSH cumulation: out[b, r] = (1/m) sum_s sum_w [h_s(r) = h_s(w)] [order] write_mask_w values[b, w]
// (zero rows where read_mask is False). The same kernel serves the forward (readers = queries,
// writers = keys, values = v) and the roles-swapped backward (readers = keys, values = grad).
//
// Design: no float atomics anywhere, so results are bitwise reproducible (docs/testing.md). A block owns one batch row, a group of
// hashes and a slice of CS value channels, and keeps that group's bucket tables
// T_s[bucket][CS] in shared memory. It sweeps the sequence in chunks of 32 positions (lane = position):
//   * a reader adds T_s[its code] (the state before the chunk) plus, for the ordered cumulations,
//     the chunk's own writers that collide with it (a precomputed 32-bit lane mask, see
//     cumulate_intra_masks);
//   * writers update the tables: __match_any_sync groups the chunk's writers by code and the highest
//     lane of each group adds the group's sum -- one plain read-modify-write per bucket, no conflicts.
// Warps own disjoint hashes (warp w takes hashes w, w + warps, ...), so tables are never shared; the
// per-warp partial sums are reduced in a fixed order. Every sum has a fixed order: results are
// bitwise reproducible run to run.
//
// order: 0 = none (two phases: all writers, then all readers), 1 = causal (writer position <= reader),
// 2 = anticausal (>=, chunks swept from the end).
#include "common.cuh"

constexpr int ORDER_NONE = 0;
constexpr int ORDER_CAUSAL = 1;
constexpr int ORDER_ANTICAUSAL = 2;

// For the ordered cumulations: bit j of masks[b, s, p] is set when writer p' = chunk(p) * 32 + j exists,
// is kept by write_mask, has write code == p's read code in hash s, and is at or before p (causal) /
// at or after p (anticausal). Computed once per (b, s, position), not once per channel slice.
// grid (ceil(ceil(N / 32) / warps), m, B); block 32 * warps; one warp per chunk.
template <int ORDER>
__global__ void __launch_bounds__(256) cumulate_intra_masks(const int* __restrict__ read_codes,
                                                            const int* __restrict__ write_codes,
                                                            const unsigned char* __restrict__ write_mask,
                                                            unsigned* __restrict__ masks, int m, int N) {
  static_assert(ORDER == ORDER_CAUSAL || ORDER == ORDER_ANTICAUSAL, "only the ordered cumulations need masks");
  const int lane = threadIdx.x & 31;
  const int chunk = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int s = blockIdx.y;
  const int b = blockIdx.z;
  if (chunk * 32 >= N) return;  // warp-uniform
  const int p = chunk * 32 + lane;
  const bool valid = p < N;
  const i64 at = ((i64)b * m + s) * N + p;
  const int write_code = (valid && kept(write_mask, (i64)b * N + p)) ? write_codes[at] : -1;  // codes are >= 0
  const int read_code = valid ? read_codes[at] : -2;
  unsigned mask = 0;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int code = __shfl_sync(FULL_MASK, write_code, j);
    const bool ordered = ORDER == ORDER_CAUSAL ? j <= lane : j >= lane;
    mask |= (code == read_code && ordered) ? (1u << j) : 0u;
  }
  if (valid) masks[at] = mask;
}

template <int CS>
__device__ __forceinline__ void add_row(float (&acc)[CS], const float* row) {
#pragma unroll
  for (int c = 0; c < CS; ++c) acc[c] += row[c];
}

// grid (ceil(C / CS), groups, B); block 32 * warps (warps <= hashes per group).
// Dynamic shared memory: tables [hashes_per_group][2^tau][CS], chunk values [32][CS],
// partial sums [warps][32][CS].
// out: [B, Nr, C] when groups == 1, else [groups, B, Nr, C] partial sums (cumulate_sum_groups adds them).
template <typename T, int CS, int ORDER>
__global__ void __launch_bounds__(256) cumulate_scan(const int* __restrict__ read_codes,
                                                     const int* __restrict__ write_codes,
                                                     const T* __restrict__ values,
                                                     const unsigned char* __restrict__ read_mask,
                                                     const unsigned char* __restrict__ write_mask,
                                                     const unsigned* __restrict__ intra_masks,
                                                     float* __restrict__ out, int B, int m, int Nr, int Nw, int C,
                                                     int tau, int hashes_per_group, float scale) {
  extern __shared__ float4 smem4[];
  const int buckets = 1 << tau;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int c0 = blockIdx.x * CS;
  const int group = blockIdx.y;
  const int b = blockIdx.z;
  const int s0 = group * hashes_per_group;
  const int hashes = min(hashes_per_group, m - s0);
  float* tables = reinterpret_cast<float*>(smem4);
  float* chunk_values = tables + (i64)hashes_per_group * buckets * CS;
  float* partial = chunk_values + 32 * CS;
  float* destination = out + (i64)group * B * Nr * C;

  for (int e = threadIdx.x; e < hashes_per_group * buckets * CS; e += blockDim.x) tables[e] = 0.f;

  // Stage the values of writers [p0, p0 + 32) for this channel slice; masked writers become zeros.
  auto stage_values = [&](int p0) {
    for (int e = threadIdx.x; e < 32 * CS; e += blockDim.x) {
      const int r = e / CS;
      const int c = c0 + e % CS;
      const int p = p0 + r;
      float value = 0.f;
      if (p < Nw && c < C && kept(write_mask, (i64)b * Nw + p)) value = to_float(values[((i64)b * Nw + p) * C + c]);
      chunk_values[e] = value;
    }
  };
  // The writers of the chunk at p0 add themselves to this warp's tables (hash s, table `table`).
  auto write_chunk = [&](int p0, int s, float* table) {
    const int p = p0 + lane;
    const bool writer = p < Nw && kept(write_mask, (i64)b * Nw + p);
    // Codes are in [0, 2^tau) (checked by the caller); the mask only keeps a bad code inside the table.
    const int code = writer ? (write_codes[((i64)b * m + s) * Nw + p] & (buckets - 1)) : -1 - lane;
    const unsigned peers = __match_any_sync(FULL_MASK, code);
    if (writer && lane == 31 - __clz(peers)) {  // the last writer of each code adds the whole group
      float sum[CS];
#pragma unroll
      for (int c = 0; c < CS; ++c) sum[c] = 0.f;
      for (unsigned bits = peers; bits != 0; bits &= bits - 1) add_row<CS>(sum, chunk_values + (__ffs(bits) - 1) * CS);
      add_row<CS>(*reinterpret_cast<float(*)[CS]>(table + code * CS), sum);
    }
  };
  // This warp's partial sums for the chunk's readers -> the block's fixed-order sum -> out.
  auto finish_chunk = [&](int p0, float (&acc)[CS]) {
#pragma unroll
    for (int c = 0; c < CS; ++c) partial[(warp * 32 + lane) * CS + c] = acc[c];
    __syncthreads();
    for (int e = threadIdx.x; e < 32 * CS; e += blockDim.x) {
      const int r = e / CS;
      const int c = c0 + e % CS;
      const int p = p0 + r;
      if (p < Nr && c < C) {
        float total = 0.f;
        for (int w = 0; w < warps; ++w) total += partial[w * 32 * CS + e];
        destination[((i64)b * Nr + p) * C + c] = kept(read_mask, (i64)b * Nr + p) ? total * scale : 0.f;
      }
    }
  };

  const int chunks_w = (Nw + 31) / 32;
  if (ORDER == ORDER_NONE) {
    for (int k = 0; k < chunks_w; ++k) {
      __syncthreads();  // tables zeroed / previous chunk's values consumed
      stage_values(k * 32);
      __syncthreads();
      for (int h = warp; h < hashes; h += warps) write_chunk(k * 32, s0 + h, tables + (i64)h * buckets * CS);
    }
    __syncthreads();  // every table complete
    const int chunks_r = (Nr + 31) / 32;
    for (int k = 0; k < chunks_r; ++k) {
      const int p = k * 32 + lane;
      float acc[CS];
#pragma unroll
      for (int c = 0; c < CS; ++c) acc[c] = 0.f;
      if (p < Nr) {
        for (int h = warp; h < hashes; h += warps) {
          const int code = read_codes[((i64)b * m + s0 + h) * Nr + p] & (buckets - 1);
          add_row<CS>(acc, tables + ((i64)h * buckets + code) * CS);
        }
      }
      finish_chunk(k * 32, acc);
      __syncthreads();  // partial sums consumed before the next chunk overwrites them
    }
  } else {
    // Ordered: Nr == Nw == N. Causal sweeps chunks forwards, anticausal backwards.
    for (int step = 0; step < chunks_w; ++step) {
      const int k = ORDER == ORDER_CAUSAL ? step : chunks_w - 1 - step;
      const int p0 = k * 32;
      const int p = p0 + lane;
      __syncthreads();  // tables zeroed / previous chunk fully consumed
      stage_values(p0);
      __syncthreads();
      float acc[CS];
#pragma unroll
      for (int c = 0; c < CS; ++c) acc[c] = 0.f;
      for (int h = warp; h < hashes; h += warps) {
        const int s = s0 + h;
        float* table = tables + (i64)h * buckets * CS;
        if (p < Nr) {
          const i64 at = ((i64)b * m + s) * Nr + p;
          add_row<CS>(acc, table + (read_codes[at] & (buckets - 1)) * CS);  // all earlier (later) chunks
          for (unsigned bits = intra_masks[at]; bits != 0; bits &= bits - 1)
            add_row<CS>(acc, chunk_values + (__ffs(bits) - 1) * CS);  // this chunk's, in order
        }
        __syncwarp();  // all reads of the table precede this chunk's updates
        write_chunk(p0, s, table);
        __syncwarp();
      }
      finish_chunk(p0, acc);
    }
  }
}

// out[b, n, c] = sum over groups of partial[g, b, n, c], in group order (deterministic).
__global__ void cumulate_sum_groups(const float* __restrict__ partial, float* __restrict__ out, i64 size,
                                    int groups) {
  for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < size; e += (i64)gridDim.x * blockDim.x) {
    float total = 0.f;
    for (int g = 0; g < groups; ++g) total += partial[(i64)g * size + e];
    out[e] = total;
  }
}
