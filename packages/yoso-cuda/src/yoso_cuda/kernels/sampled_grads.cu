// Sampled YOSO-m gradients w.r.t. unit q and k, one hash at a time:
//   dQ_i += (1/m) sum_{j : h_s(k_j) = h_s(q_i)} M_ij w_ij (g_i . v_j) k_j
//   dK_j += (1/m) sum_{i : h_s(q_i) = h_s(k_j)} M_ij w_ij (g_i . v_j) q_i
// w = tau/2 (the lower bound, paper eq. 4) or min(p'/p, max_ratio) at x_ij = q_i . k_j (*YOSO).
//
// The caller sorts queries and keys of hash s by (code, position) (a stable sort) and passes, per
// (batch row, bucket), the [start, stop) run of each side. One block takes one bucket of one batch
// row and handles all of its colliding pairs in TILE x TILE tiles -- the pairs are dense inside a
// bucket, and the rows of k, v (q, grad) are read once per tile instead of once per pair.
// Within one hash every query and every key lies in exactly one bucket, so the block is the only
// writer of its rows of dq and dk: a plain read-modify-write, no atomics. Hashes run as successive
// launches on one stream, so the sums over hashes have a fixed order and results are reproducible.
// Causal (j <= i): runs are sorted by position, so key tiles past the query tile's last position stop
// the sweep.
// form (lower bound only; FORM_* in common.cuh): a bucket for which use_tables() says yes is left to
// sampled_grads_tables (sampled_tables.cu), which runs in the same hash step and owns those rows.
//
// grid (2^tau, B); 256 threads. TILE = 32 when D + Dv <= 256, else 16. Shared memory:
// Qs[TILE][D+1], Gs[TILE][Dv+1], Ks[TILE][D+1], Vs[TILE][Dv+1], W[TILE][TILE+1], positions and flags.
#include "common.cuh"

template <typename T, int EXACT, int TILE>
__global__ void __launch_bounds__(256) sampled_grads_hash(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ grad,
    const int* __restrict__ q_order, const int* __restrict__ q_start, const int* __restrict__ k_order,
    const int* __restrict__ k_start, const unsigned char* __restrict__ query_mask,
    const unsigned char* __restrict__ key_mask, float* __restrict__ dq, float* __restrict__ dk, int m, int Nq, int Nk,
    int D, int Dv, int tau, int s, int causal, int form, float max_ratio, float inv_m) {
  constexpr int TPR = 256 / TILE;  // threads per row
  constexpr int MAXC = 256 / TPR;  // columns per thread: D, Dv <= 256
  extern __shared__ float4 smem4[];
  float* Qs = reinterpret_cast<float*>(smem4);
  float* Gs = Qs + TILE * (D + 1);
  float* Ks = Gs + TILE * (Dv + 1);
  float* Vs = Ks + TILE * (D + 1);
  float* W = Vs + TILE * (Dv + 1);
  int* q_pos = reinterpret_cast<int*>(W + TILE * (TILE + 1));
  int* k_pos = q_pos + TILE;
  int* q_ok = k_pos + TILE;
  int* k_ok = q_ok + TILE;

  const int buckets = 1 << tau;
  const int bucket = blockIdx.x;
  const int b = blockIdx.y;
  const i64 run = ((i64)b * m + s) * (buckets + 1) + bucket;
  const int qa = q_start[run], qb = q_start[run + 1];
  const int ka = k_start[run], kb = k_start[run + 1];
  if (qa >= qb || ka >= kb) return;  // no colliding pair in this bucket (block-uniform)
  if (use_tables(form, qb - qa, kb - ka, D, Dv)) return;  // the table kernel's bucket
  const int* queries = q_order + ((i64)b * m + s) * Nq;
  const int* keys = k_order + ((i64)b * m + s) * Nk;
  const int row = threadIdx.x / TPR;
  const int col0 = threadIdx.x % TPR;

  for (int qt = qa; qt < qb; qt += TILE) {
    const int nq = min(TILE, qb - qt);
    __syncthreads();  // the previous query tile is consumed
    load_rows<T>(Qs, D + 1, q, (i64)b * Nq, D, queries + qt, 0, nq, TILE, query_mask, (i64)b * Nq);
    load_rows<float>(Gs, Dv + 1, grad, (i64)b * Nq, Dv, queries + qt, 0, nq, TILE, query_mask, (i64)b * Nq);
    for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
      q_pos[r] = r < nq ? queries[qt + r] : -1;
      q_ok[r] = r < nq && kept(query_mask, (i64)b * Nq + queries[qt + r]);
    }
    const int last_query = queries[qt + nq - 1];  // the largest position in the tile (runs are sorted)
    __syncthreads();  // q_pos is read below even when no key tile follows
    float acc[MAXC];
#pragma unroll
    for (int c = 0; c < MAXC; ++c) acc[c] = 0.f;

    for (int kt = ka; kt < kb; kt += TILE) {
      if (causal && keys[kt] > last_query) break;  // block-uniform: every later key is later still
      const int nk = min(TILE, kb - kt);
      __syncthreads();  // the previous key tile is consumed
      load_rows<T>(Ks, D + 1, k, (i64)b * Nk, D, keys + kt, 0, nk, TILE, key_mask, (i64)b * Nk);
      load_rows<T>(Vs, Dv + 1, v, (i64)b * Nk, Dv, keys + kt, 0, nk, TILE, key_mask, (i64)b * Nk);
      for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
        k_pos[r] = r < nk ? keys[kt + r] : -1;
        k_ok[r] = r < nk && kept(key_mask, (i64)b * Nk + keys[kt + r]);
      }
      __syncthreads();
      for (int e = threadIdx.x; e < TILE * TILE; e += blockDim.x) {
        const int i = e / TILE;
        const int j = e % TILE;
        float w = 0.f;
        if (q_ok[i] && k_ok[j] && (!causal || k_pos[j] <= q_pos[i])) {
          float gv = 0.f;
          for (int c = 0; c < Dv; ++c) gv = fmaf(Gs[i * (Dv + 1) + c], Vs[j * (Dv + 1) + c], gv);
          float ratio = 0.5f * (float)tau;
          if (EXACT) {
            float x = 0.f;
            for (int d = 0; d < D; ++d) x = fmaf(Qs[i * (D + 1) + d], Ks[j * (D + 1) + d], x);
            ratio = importance_ratio(x, tau, max_ratio);
          }
          w = ratio * gv * inv_m;
        }
        W[i * (TILE + 1) + j] = w;
      }
      __syncthreads();
      // dq rows of the query tile accumulate over key tiles in registers.
      for (int j = 0; j < nk; ++j) {
        const float w = W[row * (TILE + 1) + j];
#pragma unroll
        for (int c = 0; c < MAXC; ++c) {
          const int col = col0 + c * TPR;
          if (col < D) acc[c] = fmaf(w, Ks[j * (D + 1) + col], acc[c]);
        }
      }
      // dk rows of the key tile: this tile pair's share goes straight to memory (this block owns them).
      if (row < nk) {
        float part[MAXC];
#pragma unroll
        for (int c = 0; c < MAXC; ++c) part[c] = 0.f;
        for (int i = 0; i < nq; ++i) {
          const float w = W[i * (TILE + 1) + row];
#pragma unroll
          for (int c = 0; c < MAXC; ++c) {
            const int col = col0 + c * TPR;
            if (col < D) part[c] = fmaf(w, Qs[i * (D + 1) + col], part[c]);
          }
        }
        float* out = dk + ((i64)b * Nk + k_pos[row]) * D;
#pragma unroll
        for (int c = 0; c < MAXC; ++c) {
          const int col = col0 + c * TPR;
          if (col < D) out[col] += part[c];
        }
      }
    }
    if (row < nq) {
      float* out = dq + ((i64)b * Nq + q_pos[row]) * D;
#pragma unroll
      for (int c = 0; c < MAXC; ++c) {
        const int col = col0 + c * TPR;
        if (col < D) out[col] += acc[c];
      }
    }
  }
}
