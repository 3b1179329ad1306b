// Hash codes of unit rows x [B, N, D] -> codes [B, m, N] int32 (layouts: yoso/_planes.py).
#include "common.cuh"

// ---- Gaussian SimHash ------------------------------------------------------------------------------
// Bit t of hash s of row n is [planes[p, s, t] . x[b, n] > 0] (strict: a zero projection is bit 0).
// The projection is fused with the sign/pack step: each thread owns one row (its lane) and one hash at
// a time (its warp), accumulating tau dot products over D in fp32, so the [N, m*tau] projections are
// never written to memory.
//
// grid (ceil(N / 32), B); block 32 * warps. Dynamic shared memory:
//   xs [32][D + 1]                      the block's 32 rows (padded: lane r reads row r conflict-free)
//   ps [hashes_per_chunk][D][TAU_PAD]   a chunk of hyperplanes, the tau planes of a hash interleaved so
//                                       that one float4 broadcast feeds four accumulators
// TAU_PAD (4, 8, 12, 16) is tau rounded up to a multiple of 4; planes t >= tau are zero.
template <typename T, int TAU_PAD>
__global__ void __launch_bounds__(256) hash_gaussian(const T* __restrict__ x, const float* __restrict__ planes,
                                                     int* __restrict__ codes, int N, int D, int m, int tau,
                                                     int planes_per_batch, int hashes_per_chunk) {
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);
  float* ps = xs + 32 * (D + 1);  // 32 * (D + 1) is a multiple of 4: ps stays 16-byte aligned
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int b = blockIdx.y;
  const int n0 = blockIdx.x * 32;

  for (int e = threadIdx.x; e < 32 * D; e += blockDim.x) {
    const int r = e / D;
    const int d = e - r * D;
    const int n = n0 + r;
    xs[r * (D + 1) + d] = n < N ? to_float(x[((i64)b * N + n) * D + d]) : 0.f;
  }
  const float* batch_planes = planes + (planes_per_batch ? (i64)b * m * tau * D : (i64)0);

  for (int s0 = 0; s0 < m; s0 += hashes_per_chunk) {
    const int chunk = min(hashes_per_chunk, m - s0);
    __syncthreads();  // the previous chunk's planes are no longer read (and xs is complete)
    // Global reads run along d (coalesced); shared writes interleave the tau planes of each hash.
    for (int e = threadIdx.x; e < chunk * TAU_PAD * D; e += blockDim.x) {
      const int d = e % D;
      const int t = (e / D) % TAU_PAD;
      const int h = e / (D * TAU_PAD);
      ps[((i64)h * D + d) * TAU_PAD + t] = t < tau ? batch_planes[((i64)(s0 + h) * tau + t) * D + d] : 0.f;
    }
    __syncthreads();
    for (int h = warp; h < chunk; h += warps) {
      float acc[TAU_PAD];
#pragma unroll
      for (int t = 0; t < TAU_PAD; ++t) acc[t] = 0.f;
      const float* row = xs + lane * (D + 1);
      const float4* plane4 = reinterpret_cast<const float4*>(ps + (i64)h * D * TAU_PAD);
      for (int d = 0; d < D; ++d) {
        const float xv = row[d];
#pragma unroll
        for (int t4 = 0; t4 < TAU_PAD / 4; ++t4) {
          const float4 p = plane4[d * (TAU_PAD / 4) + t4];  // same address across the warp: a broadcast
          acc[4 * t4 + 0] = fmaf(xv, p.x, acc[4 * t4 + 0]);
          acc[4 * t4 + 1] = fmaf(xv, p.y, acc[4 * t4 + 1]);
          acc[4 * t4 + 2] = fmaf(xv, p.z, acc[4 * t4 + 2]);
          acc[4 * t4 + 3] = fmaf(xv, p.w, acc[4 * t4 + 3]);
        }
      }
      int code = 0;
#pragma unroll
      for (int t = 0; t < TAU_PAD; ++t) code |= (t < tau && acc[t] > 0.f) ? (1 << t) : 0;
      const int n = n0 + lane;
      if (n < N) codes[((i64)b * m + s0 + h) * N + n] = code;  // 32 consecutive n: coalesced
    }
  }
}

// ---- Hadamard fast hash --------------------------------------------------------------------------
// u = H d3 H d2 H d1 x on the zero-padded row (H the unnormalised Sylvester-Hadamard matrix of size Dp,
// the next power of two >= D). One warp rotates one row in registers: element i = e * 32 + lane lives
// in lane `lane`, slot e (E = max(1, Dp / 32) slots), so butterflies of stride < 32 are lane shuffles
// and strides >= 32 stay inside a thread. Lanes beyond Dp (Dp < 32) hold zeros throughout: their
// shuffle partners (lane ^ h, h < Dp) are lanes beyond Dp too.
// Hash t of rotation r (s = r * per + t, per = Dp / tau) reads the signs of coordinates
// t*tau .. t*tau + tau - 1; a ballot per slot gives the signs of 32 consecutive coordinates.
//
// grid (ceil(N / 32), R, B); block 32 * warps; the 32 rows' codes are staged in shared memory so that
// each hash's codes leave as one coalesced store of 32 consecutive positions.
template <int E>
__device__ __forceinline__ void walsh_hadamard(float (&u)[E], int lane, int Dp) {
#pragma unroll
  for (int h = 1; h < 32; h <<= 1) {
    if (h >= Dp) break;  // warp-uniform
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float other = __shfl_xor_sync(FULL_MASK, u[e], h);
      u[e] = (lane & h) ? other - u[e] : u[e] + other;
    }
  }
#pragma unroll
  for (int hh = 1; hh < E; hh <<= 1) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if ((e & hh) == 0) {
        const float a = u[e];
        const float c = u[e + hh];
        u[e] = a + c;
        u[e + hh] = a - c;
      }
    }
  }
}

template <typename T, int E>
__global__ void __launch_bounds__(256) hash_hadamard(const T* __restrict__ x, const float* __restrict__ diagonals,
                                                     int* __restrict__ codes, int N, int D, int Dp, int m, int tau,
                                                     int rotations, int planes_per_batch) {
  __shared__ float diag[3 * 32 * E];
  __shared__ unsigned short staged[256 * 32];  // [hash within the rotation][row]; per <= Dp <= 256
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int r = blockIdx.y;
  const int b = blockIdx.z;
  const int n0 = blockIdx.x * 32;
  const int per = Dp / tau;

  const float* source = diagonals + ((planes_per_batch ? (i64)b * rotations : (i64)0) + r) * 3 * Dp;
  for (int e = threadIdx.x; e < 3 * Dp; e += blockDim.x) diag[e] = source[e];
  __syncthreads();

  for (int row = warp; row < 32; row += warps) {
    const int n = n0 + row;
    float u[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int i = e * 32 + lane;
      u[e] = (n < N && i < D) ? to_float(x[((i64)b * N + n) * D + i]) : 0.f;
    }
#pragma unroll
    for (int step = 0; step < 3; ++step) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int i = e * 32 + lane;
        u[e] = i < Dp ? u[e] * diag[step * Dp + i] : 0.f;
      }
      walsh_hadamard<E>(u, lane, Dp);
    }
    unsigned words[E];
#pragma unroll
    for (int e = 0; e < E; ++e) words[e] = __ballot_sync(FULL_MASK, u[e] > 0.f);
    for (int t = lane; t < per; t += 32) {
      const int start = t * tau;
      const int word = start >> 5;
      unsigned lo = 0, hi = 0;
#pragma unroll
      for (int e = 0; e < E; ++e) {  // select instead of a dynamic index: words[] stays in registers
        lo = e == word ? words[e] : lo;
        hi = e == word + 1 ? words[e] : hi;
      }
      const unsigned long long bits = ((unsigned long long)hi << 32) | lo;
      staged[t * 32 + row] = (unsigned short)((bits >> (start & 31)) & ((1u << tau) - 1u));
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < per * 32; e += blockDim.x) {
    const int t = e >> 5;
    const int row = e & 31;
    const int s = r * per + t;
    const int n = n0 + row;
    if (s < m && n < N) codes[((i64)b * m + s) * N + n] = staged[e];
  }
}
