// YOSO-E, fused and tiled: O(N) memory, the N x N weights never leave shared memory.
//   forward   Y_i  = sum_j M_ij p(x_ij) v_j
//   backward  dQ_i = sum_j M_ij d(x_ij) (g_i . v_j) k_j            (expectation_dq)
//             dK_j = sum_i M_ij d(x_ij) (g_i . v_j) q_i,
//             dV_j = sum_i M_ij p(x_ij) g_i                         (expectation_dkv)
// with x_ij = q_i . k_j, p the collision probability, d = p * min(p'/p, max_ratio) (exact=1) or
// (tau/2) p (the lower bound), M = query mask x key mask x (causal: j <= i).
// Each output row is owned by one block, which sweeps the other side in tiles: no atomics, fixed
// summation order, bitwise reproducible. q, k, v in T (fp32/fp16/bf16), grad fp32; all math fp32.
//
// Tiles: TQ query rows x TK key rows, 256 threads. A thread owns one output row (tid / TPR) and the
// columns col0, col0 + TPR, ... (col0 = tid % TPR, TPR = 256 / rows): at most 256 / TPR columns, so D
// and Dv up to 256. The launcher picks TQ = TK = 32 when D + Dv <= 256, else 16 (shared memory).
// Rows are padded by one float so that threads walking different rows hit different banks.
#include "common.cuh"

__device__ __forceinline__ float dot_rows(const float* a, const float* b, int width) {
  float acc = 0.f;
  for (int d = 0; d < width; ++d) acc = fmaf(a[d], b[d], acc);
  return acc;
}

// Keep flags and sequence positions of a tile's rows (position -1: beyond the end).
__device__ __forceinline__ void load_flags(int* ok, int rows, int first, int count, const unsigned char* mask,
                                           i64 mask_row0) {
  for (int r = threadIdx.x; r < rows; r += blockDim.x) ok[r] = r < count && kept(mask, mask_row0 + first + r);
}

template <int MAXC>
__device__ __forceinline__ void accumulate_columns(float (&acc)[MAXC], const float* weights, int count,
                                                   const float* rows, int ld, int width, int col0, int tpr) {
  // acc[c] += sum_r weights[r] * rows[r][col0 + c * tpr]
  for (int r = 0; r < count; ++r) {
    const float w = weights[r];
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
      const int col = col0 + c * tpr;
      if (col < width) acc[c] = fmaf(w, rows[r * ld + col], acc[c]);
    }
  }
}

template <int TQ, int TK>
struct Tiles {
  static constexpr int THREADS = 256;
  static constexpr int TPR_Q = THREADS / TQ;   // threads per query row
  static constexpr int TPR_K = THREADS / TK;   // threads per key row
  static constexpr int MAXC_Q = 256 / TPR_Q;   // columns per thread, query-row owners
  static constexpr int MAXC_K = 256 / TPR_K;
};

// grid (ceil(Nq / TQ), B). Shared: Qs[TQ][D+1], Ks[TK][D+1], Vs[TK][Dv+1], P[TQ][TK+1], flags.
template <typename T, int TQ, int TK>
__global__ void __launch_bounds__(256) expectation_forward(const T* __restrict__ q, const T* __restrict__ k,
                                                           const T* __restrict__ v,
                                                           const unsigned char* __restrict__ query_mask,
                                                           const unsigned char* __restrict__ key_mask,
                                                           float* __restrict__ out, int Nq, int Nk, int D, int Dv,
                                                           int tau, int causal) {
  using Tl = Tiles<TQ, TK>;
  extern __shared__ float4 smem4[];
  float* Qs = reinterpret_cast<float*>(smem4);
  float* Ks = Qs + TQ * (D + 1);
  float* Vs = Ks + TK * (D + 1);
  float* P = Vs + TK * (Dv + 1);
  int* q_ok = reinterpret_cast<int*>(P + TQ * (TK + 1));
  int* k_ok = q_ok + TQ;
  const int b = blockIdx.y;
  const int q0 = blockIdx.x * TQ;
  const int nq = min(TQ, Nq - q0);
  const int row = threadIdx.x / Tl::TPR_Q;
  const int col0 = threadIdx.x % Tl::TPR_Q;

  load_rows<T>(Qs, D + 1, q, (i64)b * Nq, D, nullptr, q0, nq, TQ, query_mask, (i64)b * Nq);
  load_flags(q_ok, TQ, q0, nq, query_mask, (i64)b * Nq);
  float acc[Tl::MAXC_Q];
#pragma unroll
  for (int c = 0; c < Tl::MAXC_Q; ++c) acc[c] = 0.f;

  const int key_end = causal ? min(Nk, q0 + nq) : Nk;  // causal: keys j <= the tile's last query
  for (int k0 = 0; k0 < key_end; k0 += TK) {
    const int nk = min(TK, Nk - k0);
    __syncthreads();  // the previous tile is consumed (and Qs, q_ok are complete)
    load_rows<T>(Ks, D + 1, k, (i64)b * Nk, D, nullptr, k0, nk, TK, key_mask, (i64)b * Nk);
    load_rows<T>(Vs, Dv + 1, v, (i64)b * Nk, Dv, nullptr, k0, nk, TK, key_mask, (i64)b * Nk);
    load_flags(k_ok, TK, k0, nk, key_mask, (i64)b * Nk);
    __syncthreads();
    for (int e = threadIdx.x; e < TQ * TK; e += blockDim.x) {
      const int i = e / TK;
      const int j = e % TK;
      const bool ok = q_ok[i] && k_ok[j] && (!causal || k0 + j <= q0 + i);
      P[i * (TK + 1) + j] = ok ? collision_probability(dot_rows(Qs + i * (D + 1), Ks + j * (D + 1), D), tau) : 0.f;
    }
    __syncthreads();
    accumulate_columns<Tl::MAXC_Q>(acc, P + row * (TK + 1), nk, Vs, Dv + 1, Dv, col0, Tl::TPR_Q);
  }
  if (row < nq) {
#pragma unroll
    for (int c = 0; c < Tl::MAXC_Q; ++c) {
      const int col = col0 + c * Tl::TPR_Q;
      if (col < Dv) out[((i64)b * Nq + q0 + row) * Dv + col] = acc[c];
    }
  }
}

// The pair weight of the gradients w.r.t. q and k: d(x) (g . v), given p = p(x).
template <int EXACT>
__device__ __forceinline__ float gradient_weight(float x, float p, float gv, int tau, float max_ratio) {
  const float ratio = EXACT ? importance_ratio(x, tau, max_ratio) : 0.5f * (float)tau;
  return p * ratio * gv;
}

// grid (ceil(Nq / TQ), B). Shared: Qs[TQ][D+1], Gs[TQ][Dv+1], Ks[TK][D+1], Vs[TK][Dv+1], W[TQ][TK+1].
template <typename T, int EXACT, int TQ, int TK>
__global__ void __launch_bounds__(256) expectation_dq(const T* __restrict__ q, const T* __restrict__ k,
                                                      const T* __restrict__ v, const float* __restrict__ grad,
                                                      const unsigned char* __restrict__ query_mask,
                                                      const unsigned char* __restrict__ key_mask,
                                                      float* __restrict__ dq, int Nq, int Nk, int D, int Dv, int tau,
                                                      int causal, float max_ratio) {
  using Tl = Tiles<TQ, TK>;
  extern __shared__ float4 smem4[];
  float* Qs = reinterpret_cast<float*>(smem4);
  float* Gs = Qs + TQ * (D + 1);
  float* Ks = Gs + TQ * (Dv + 1);
  float* Vs = Ks + TK * (D + 1);
  float* W = Vs + TK * (Dv + 1);
  int* q_ok = reinterpret_cast<int*>(W + TQ * (TK + 1));
  int* k_ok = q_ok + TQ;
  const int b = blockIdx.y;
  const int q0 = blockIdx.x * TQ;
  const int nq = min(TQ, Nq - q0);
  const int row = threadIdx.x / Tl::TPR_Q;
  const int col0 = threadIdx.x % Tl::TPR_Q;

  load_rows<T>(Qs, D + 1, q, (i64)b * Nq, D, nullptr, q0, nq, TQ, query_mask, (i64)b * Nq);
  load_rows<float>(Gs, Dv + 1, grad, (i64)b * Nq, Dv, nullptr, q0, nq, TQ, query_mask, (i64)b * Nq);
  load_flags(q_ok, TQ, q0, nq, query_mask, (i64)b * Nq);
  float acc[Tl::MAXC_Q];
#pragma unroll
  for (int c = 0; c < Tl::MAXC_Q; ++c) acc[c] = 0.f;

  const int key_end = causal ? min(Nk, q0 + nq) : Nk;
  for (int k0 = 0; k0 < key_end; k0 += TK) {
    const int nk = min(TK, Nk - k0);
    __syncthreads();
    load_rows<T>(Ks, D + 1, k, (i64)b * Nk, D, nullptr, k0, nk, TK, key_mask, (i64)b * Nk);
    load_rows<T>(Vs, Dv + 1, v, (i64)b * Nk, Dv, nullptr, k0, nk, TK, key_mask, (i64)b * Nk);
    load_flags(k_ok, TK, k0, nk, key_mask, (i64)b * Nk);
    __syncthreads();
    for (int e = threadIdx.x; e < TQ * TK; e += blockDim.x) {
      const int i = e / TK;
      const int j = e % TK;
      const bool ok = q_ok[i] && k_ok[j] && (!causal || k0 + j <= q0 + i);
      float w = 0.f;
      if (ok) {
        const float x = dot_rows(Qs + i * (D + 1), Ks + j * (D + 1), D);
        const float gv = dot_rows(Gs + i * (Dv + 1), Vs + j * (Dv + 1), Dv);
        w = gradient_weight<EXACT>(x, collision_probability(x, tau), gv, tau, max_ratio);
      }
      W[i * (TK + 1) + j] = w;
    }
    __syncthreads();
    accumulate_columns<Tl::MAXC_Q>(acc, W + row * (TK + 1), nk, Ks, D + 1, D, col0, Tl::TPR_Q);
  }
  if (row < nq) {
#pragma unroll
    for (int c = 0; c < Tl::MAXC_Q; ++c) {
      const int col = col0 + c * Tl::TPR_Q;
      if (col < D) dq[((i64)b * Nq + q0 + row) * D + col] = acc[c];
    }
  }
}

// grid (ceil(Nk / TK), B). Shared: Ks[TK][D+1], Vs[TK][Dv+1], Qs[TQ][D+1], Gs[TQ][Dv+1],
// Wt[TK][TQ+1] and Pt[TK][TQ+1] (transposed: a key-row owner reads its row contiguously).
template <typename T, int EXACT, int TQ, int TK>
__global__ void __launch_bounds__(256) expectation_dkv(const T* __restrict__ q, const T* __restrict__ k,
                                                       const T* __restrict__ v, const float* __restrict__ grad,
                                                       const unsigned char* __restrict__ query_mask,
                                                       const unsigned char* __restrict__ key_mask,
                                                       float* __restrict__ dk, float* __restrict__ dv, int Nq, int Nk,
                                                       int D, int Dv, int tau, int causal, float max_ratio) {
  using Tl = Tiles<TQ, TK>;
  extern __shared__ float4 smem4[];
  float* Ks = reinterpret_cast<float*>(smem4);
  float* Vs = Ks + TK * (D + 1);
  float* Qs = Vs + TK * (Dv + 1);
  float* Gs = Qs + TQ * (D + 1);
  float* Wt = Gs + TQ * (Dv + 1);
  float* Pt = Wt + TK * (TQ + 1);
  int* k_ok = reinterpret_cast<int*>(Pt + TK * (TQ + 1));
  int* q_ok = k_ok + TK;
  const int b = blockIdx.y;
  const int k0 = blockIdx.x * TK;
  const int nk = min(TK, Nk - k0);
  const int row = threadIdx.x / Tl::TPR_K;
  const int col0 = threadIdx.x % Tl::TPR_K;

  load_rows<T>(Ks, D + 1, k, (i64)b * Nk, D, nullptr, k0, nk, TK, key_mask, (i64)b * Nk);
  load_rows<T>(Vs, Dv + 1, v, (i64)b * Nk, Dv, nullptr, k0, nk, TK, key_mask, (i64)b * Nk);
  load_flags(k_ok, TK, k0, nk, key_mask, (i64)b * Nk);
  float acc_k[Tl::MAXC_K];
  float acc_v[Tl::MAXC_K];
#pragma unroll
  for (int c = 0; c < Tl::MAXC_K; ++c) acc_k[c] = acc_v[c] = 0.f;

  const int query_begin = causal ? (k0 / TQ) * TQ : 0;  // causal: queries i >= the tile's first key
  for (int q0 = query_begin; q0 < Nq; q0 += TQ) {
    const int nq = min(TQ, Nq - q0);
    __syncthreads();
    load_rows<T>(Qs, D + 1, q, (i64)b * Nq, D, nullptr, q0, nq, TQ, query_mask, (i64)b * Nq);
    load_rows<float>(Gs, Dv + 1, grad, (i64)b * Nq, Dv, nullptr, q0, nq, TQ, query_mask, (i64)b * Nq);
    load_flags(q_ok, TQ, q0, nq, query_mask, (i64)b * Nq);
    __syncthreads();
    for (int e = threadIdx.x; e < TQ * TK; e += blockDim.x) {
      const int j = e / TQ;
      const int i = e % TQ;
      const bool ok = q_ok[i] && k_ok[j] && (!causal || k0 + j <= q0 + i);
      float w = 0.f, p = 0.f;
      if (ok) {
        const float x = dot_rows(Qs + i * (D + 1), Ks + j * (D + 1), D);
        const float gv = dot_rows(Gs + i * (Dv + 1), Vs + j * (Dv + 1), Dv);
        p = collision_probability(x, tau);
        w = gradient_weight<EXACT>(x, p, gv, tau, max_ratio);
      }
      Wt[j * (TQ + 1) + i] = w;
      Pt[j * (TQ + 1) + i] = p;
    }
    __syncthreads();
    accumulate_columns<Tl::MAXC_K>(acc_k, Wt + row * (TQ + 1), nq, Qs, D + 1, D, col0, Tl::TPR_K);
    accumulate_columns<Tl::MAXC_K>(acc_v, Pt + row * (TQ + 1), nq, Gs, Dv + 1, Dv, col0, Tl::TPR_K);
  }
  if (row < nk) {
#pragma unroll
    for (int c = 0; c < Tl::MAXC_K; ++c) {
      const int col = col0 + c * Tl::TPR_K;
      if (col < D) dk[((i64)b * Nk + k0 + row) * D + col] = acc_k[c];
      if (col < Dv) dv[((i64)b * Nk + k0 + row) * Dv + col] = acc_v[c];
    }
  }
}
