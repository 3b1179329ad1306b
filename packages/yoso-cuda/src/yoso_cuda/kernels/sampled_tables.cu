// Lower-bound sampled gradients in table form, one hash s at a time (docs/math.md#lower-bound):
//   dq_i += (tau/2)(1/m) G_i^T A_s[c],          A_s[c] = sum_{j in c} kappa_j v_j k_j^T   (causal: keys j <= i)
//   dk_j += (tau/2)(1/m) kappa_j B_s[c] v_j,    B_s[c] = sum_{i in c} q_i G_i^T          (causal: queries i >= j)
// for the buckets c of hash s that take the table form (use_tables in common.cuh: forced, or cheaper than
// the pairs); sampled_grads_hash (sampled_grads.cu) does the other buckets in the same hash step. The
// cost is O((nq + nk) D Dv) per bucket whatever its size, against nq nk (Dv + 2 D) for its pairs.
//
// dq and dk are one computation with the roles renamed: readers r, writers w,
//   table   S[e][d] = sum_w X_w[e] Y_w[d]           (e < Dv; d in the block's slice of DS columns of D)
//   output  out_r[d] += scale * sum_e Z_r[e] S[e][d]
//   dq: readers = queries, Z = G;   writers = keys,    X = V, Y = K;   causal order (w <= r)
//   dk: readers = keys,    Z = V;   writers = queries, X = G, Y = Q;   anticausal order (w >= r)
// Masked rows are loaded as zeros (a select), so they add nothing to S or to a pair, and a masked
// reader's row is not written at all (dq, dk start as zeros).
//
// The caller sorts each side of hash s by (code, position), as for the pair kernel, so a bucket's
// readers and writers are each in position order. One block takes a (bucket, role, column slice) of
// one batch row at a time and walks them in tiles of TILE rows:
//   * no order: S is summed over every writer tile, then applied to every reader tile;
//   * causal / anticausal: the reader tiles are walked in the order's direction (anticausal: from the
//     end) with S holding the writers already passed. For a reader tile whose furthest position is
//     `last`, S (writers before the tile's first reader) is applied first; then the writers up to
//     `last` that S lacks are visited in tiles, paired explicitly with the tile's readers (weight
//     Z_r . X_w where the order allows the pair) and added to S. Each writer meets one reader tile
//     only: O(TILE nw (Dv + DS)) pair work on top of the O((nr + nw) Dv DS) table work.
// S[Dv][DS] lives in shared memory and each entry has one owner thread, which adds a writer tile's sum
// to it: a plain read-modify-write, no atomics. Within one hash every row lies in one bucket and a
// (bucket, role, slice) has one block, so the block is the only writer of its rows' columns of dq or
// dk; hashes run as successive launches on one stream. Every sum has a fixed order: bitwise
// reproducible.
//
// grid (<= 2^tau, 2 * slices, B), slices = ceil(D / DS): block x takes buckets x, x + gridDim.x, ...;
// blockIdx.y < slices is dq's slice y, the rest dk's. 256 threads. Shared memory (fp32, then int;
// _plans.table_smem must agree):
//   Zs[TILE][Dv+1], Xs[TILE][Dv+1], Ys[TILE][DS+1], S[Dv][DS], W[TILE][TILE+1]; r_pos, w_pos, r_ok [TILE].
// Thread t owns column col = t % DS of the slice and the rows (of S, of the reader tile)
// t / DS + k * (256 / DS), k = 0, 1, ...
#include "common.cuh"

constexpr int WALK_NONE = 0;
constexpr int WALK_CAUSAL = 1;      // a reader sees the writers at or before its position
constexpr int WALK_ANTICAUSAL = 2;  // ... at or after its position

__device__ __forceinline__ bool visible(int order, int writer, int reader) {
  return order == WALK_CAUSAL ? writer <= reader : order == WALK_ANTICAUSAL ? writer >= reader : true;
}

// A bucket's run of one side, walked from `first` by `step` (+1 forwards, -1 from the end): element t
// is the position order[first + step * t].
struct Walk {
  const int* order;
  int first;
  int step;
  int count;
  __device__ __forceinline__ int at(int t) const { return order[first + step * t]; }
};

// Walk elements t0 .. t0 + count - 1 into shared memory as fp32, columns [col0, col0 + cols) of
// [*, width] rows, leading dimension ld. Rows beyond count, columns beyond width and masked rows are
// zeros, by a select: masked content (NaN and inf included) never reaches a sum.
template <typename T>
__device__ __forceinline__ void load_walk_rows(float* dst, int ld, const T* __restrict__ src, i64 row0, int width,
                                               int col0, int cols, const Walk& walk, int t0, int count, int rows,
                                               const unsigned char* __restrict__ mask) {
  for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) {
    const int r = e / cols;
    const int c = e - r * cols;
    float value = 0.f;
    if (r < count && col0 + c < width) {
      const int pos = walk.at(t0 + r);
      if (kept(mask, row0 + pos)) value = to_float(src[(row0 + pos) * width + col0 + c]);
    }
    dst[r * ld + c] = value;
  }
}

// One (bucket, role, slice). Not inlined: a kernel instantiation holds two roles, and inlining both
// doubled its machine code and tripled its compile time (NVRTC at first use) for one call per bucket.
// Shared memory is taken from the extern symbol here, not passed in, so that every access to it
// stays a shared-memory instruction whatever the compiler infers about pointer arguments.
template <int TILE, int DS, typename TZ, typename TX, typename TY>
__device__ __noinline__ void table_role(const TZ* __restrict__ Z, const TX* __restrict__ X,
                                           const TY* __restrict__ Y, float* __restrict__ out, i64 r_row0,
                                           i64 w_row0, const Walk readers, const Walk writers,
                                           const unsigned char* __restrict__ r_mask,
                                           const unsigned char* __restrict__ w_mask, int D, int Dv, int d0,
                                           int order, float scale) {
  constexpr int GROUPS = 256 / DS;        // thread t is in row group t / DS
  constexpr int S_ROWS = 256 / GROUPS;    // rows of S per thread: ceil(Dv / GROUPS) <= 256 / GROUPS
  constexpr int R_ROWS = TILE / GROUPS;   // reader rows per thread
  static_assert(256 % DS == 0 && TILE % GROUPS == 0, "a block's 256 threads must tile [TILE][DS] exactly");
  extern __shared__ float4 smem4[];
  float* Zs = reinterpret_cast<float*>(smem4);
  float* Xs = Zs + TILE * (Dv + 1);
  float* Ys = Xs + TILE * (Dv + 1);
  float* S = Ys + TILE * (DS + 1);
  float* W = S + Dv * DS;
  int* r_pos = reinterpret_cast<int*>(W + TILE * (TILE + 1));
  int* w_pos = r_pos + TILE;
  int* r_ok = w_pos + TILE;
  const int col = threadIdx.x % DS;
  const int group = threadIdx.x / DS;

  __syncthreads();  // the block's previous bucket is done with shared memory
  for (int e = threadIdx.x; e < Dv * DS; e += blockDim.x) S[e] = 0.f;

  auto load_readers = [&](int t0, int count) {
    load_walk_rows<TZ>(Zs, Dv + 1, Z, r_row0, Dv, 0, Dv, readers, t0, count, TILE, r_mask);
    for (int i = threadIdx.x; i < TILE; i += blockDim.x) {
      const int pos = i < count ? readers.at(t0 + i) : -1;
      r_pos[i] = pos;
      r_ok[i] = i < count && kept(r_mask, r_row0 + pos);
    }
  };
  auto load_writers = [&](int t0, int count) {
    load_walk_rows<TX>(Xs, Dv + 1, X, w_row0, Dv, 0, Dv, writers, t0, count, TILE, w_mask);
    load_walk_rows<TY>(Ys, DS + 1, Y, w_row0, D, d0, DS, writers, t0, count, TILE, w_mask);
    for (int j = threadIdx.x; j < TILE; j += blockDim.x) w_pos[j] = j < count ? writers.at(t0 + j) : -1;
  };
  // S += the loaded writer tile, entry by entry, by the entry's owner; CHUNK of a thread's rows at a
  // time (a register array for all S_ROWS would take most of the 255 registers).
  auto add_to_table = [&](int count) {
    constexpr int CHUNK = S_ROWS < 8 ? S_ROWS : 8;
    for (int k0 = 0; k0 < S_ROWS && group + k0 * GROUPS < Dv; k0 += CHUNK) {
      float part[CHUNK];
#pragma unroll
      for (int k = 0; k < CHUNK; ++k) part[k] = 0.f;
      for (int j = 0; j < count; ++j) {
        const float y = Ys[j * (DS + 1) + col];
#pragma unroll
        for (int k = 0; k < CHUNK; ++k) {
          const int e = group + (k0 + k) * GROUPS;
          if (e < Dv) part[k] = fmaf(Xs[j * (Dv + 1) + e], y, part[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < CHUNK; ++k) {
        const int e = group + (k0 + k) * GROUPS;
        if (e < Dv) S[e * DS + col] += part[k];
      }
    }
  };
  // acc[k] += sum_e Zs[row k][e] S[e][col]
  auto apply_table = [&](float (&acc)[R_ROWS]) {
    for (int e = 0; e < Dv; ++e) {
      const float value = S[e * DS + col];
#pragma unroll
      for (int k = 0; k < R_ROWS; ++k) acc[k] = fmaf(Zs[(group + k * GROUPS) * (Dv + 1) + e], value, acc[k]);
    }
  };
  // W[i][j] = Z_i . X_j where the order lets reader i see writer j, else 0.
  auto pair_weights = [&](int nr, int nw) {
    for (int x = threadIdx.x; x < TILE * TILE; x += blockDim.x) {
      const int i = x / TILE;
      const int j = x % TILE;
      float w = 0.f;
      if (i < nr && j < nw && visible(order, w_pos[j], r_pos[i])) {
        for (int c = 0; c < Dv; ++c) w = fmaf(Zs[i * (Dv + 1) + c], Xs[j * (Dv + 1) + c], w);
      }
      W[i * (TILE + 1) + j] = w;
    }
  };
  // acc[k] += sum_j W[row k][j] Ys[j][col]
  auto apply_pairs = [&](float (&acc)[R_ROWS], int nw) {
    for (int j = 0; j < nw; ++j) {
      const float y = Ys[j * (DS + 1) + col];
#pragma unroll
      for (int k = 0; k < R_ROWS; ++k) acc[k] = fmaf(W[(group + k * GROUPS) * (TILE + 1) + j], y, acc[k]);
    }
  };
  auto store = [&](const float (&acc)[R_ROWS], int nr) {
    if (d0 + col >= D) return;
#pragma unroll
    for (int k = 0; k < R_ROWS; ++k) {
      const int i = group + k * GROUPS;
      if (i < nr && r_ok[i]) out[(r_row0 + r_pos[i]) * D + d0 + col] += scale * acc[k];
    }
  };

  if (order == WALK_NONE) {
    for (int t0 = 0; t0 < writers.count; t0 += TILE) {
      const int nw = min(TILE, writers.count - t0);
      __syncthreads();  // S zeroed / the previous writer tile consumed
      load_writers(t0, nw);
      __syncthreads();
      add_to_table(nw);
    }
    for (int t0 = 0; t0 < readers.count; t0 += TILE) {
      const int nr = min(TILE, readers.count - t0);
      __syncthreads();  // S complete / the previous reader tile consumed
      load_readers(t0, nr);
      __syncthreads();
      float acc[R_ROWS];
#pragma unroll
      for (int k = 0; k < R_ROWS; ++k) acc[k] = 0.f;
      apply_table(acc);
      store(acc, nr);
    }
    return;
  }
  int passed = 0;  // writers [0, passed) of the walk are in S
  for (int t0 = 0; t0 < readers.count; t0 += TILE) {
    const int nr = min(TILE, readers.count - t0);
    __syncthreads();  // S zeroed or updated / the previous reader tile consumed
    load_readers(t0, nr);
    __syncthreads();
    float acc[R_ROWS];
#pragma unroll
    for (int k = 0; k < R_ROWS; ++k) acc[k] = 0.f;
    apply_table(acc);  // the writers before the tile's first reader
    const int last = readers.at(t0 + nr - 1);  // the tile's furthest position (block-uniform)
    while (passed < writers.count && visible(order, writers.at(passed), last)) {
      int nw = 1;  // the writers up to `last`, at most a tile (runs are sorted: a prefix)
      while (nw < TILE && passed + nw < writers.count && visible(order, writers.at(passed + nw), last)) ++nw;
      __syncthreads();  // every read of S above and of the previous writer tile is done
      load_writers(passed, nw);
      __syncthreads();
      pair_weights(nr, nw);
      __syncthreads();
      apply_pairs(acc, nw);
      add_to_table(nw);  // S is read again only after the next reader tile's loads (two barriers on)
      passed += nw;
    }
    store(acc, nr);
  }
}

template <typename T, int TILE, int DS>
__global__ void __launch_bounds__(256) sampled_grads_tables(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ grad,
    const int* __restrict__ q_order, const int* __restrict__ q_start, const int* __restrict__ k_order,
    const int* __restrict__ k_start, const unsigned char* __restrict__ query_mask,
    const unsigned char* __restrict__ key_mask, float* __restrict__ dq, float* __restrict__ dk, int m, int Nq, int Nk,
    int D, int Dv, int tau, int s, int causal, int form, int slices, float scale) {
  const int buckets = 1 << tau;
  const int b = blockIdx.z;
  const bool dq_role = (int)blockIdx.y < slices;
  const int d0 = (dq_role ? (int)blockIdx.y : (int)blockIdx.y - slices) * DS;
  const int* queries = q_order + ((i64)b * m + s) * Nq;
  const int* keys = k_order + ((i64)b * m + s) * Nk;
  // Block x takes buckets x, x + gridDim.x, ...: in "auto" most buckets are usually the pair kernel's,
  // and a grid of 2^tau blocks per row, nearly all returning at once, would cost more to schedule than
  // the few table buckets take (the launcher caps gridDim.x, _plans.table_grid).
  for (int bucket = blockIdx.x; bucket < buckets; bucket += gridDim.x) {
    const i64 run = ((i64)b * m + s) * (buckets + 1) + bucket;
    const int qa = q_start[run], qb = q_start[run + 1];
    const int ka = k_start[run], kb = k_start[run + 1];
    if (qa >= qb || ka >= kb) continue;                          // no colliding pair (block-uniform)
    if (!use_tables(form, qb - qa, kb - ka, D, Dv)) continue;   // the pair kernel's bucket
    if (dq_role) {
      const Walk readers{queries, qa, 1, qb - qa};
      const Walk writers{keys, ka, 1, kb - ka};
      table_role<TILE, DS, float, T, T>(grad, v, k, dq, (i64)b * Nq, (i64)b * Nk, readers, writers, query_mask,
                                        key_mask, D, Dv, d0, causal ? WALK_CAUSAL : WALK_NONE, scale);
    } else {  // anticausal walks both runs from the end
      const Walk readers = causal ? Walk{keys, kb - 1, -1, kb - ka} : Walk{keys, ka, 1, kb - ka};
      const Walk writers = causal ? Walk{queries, qb - 1, -1, qb - qa} : Walk{queries, qa, 1, qb - qa};
      table_role<TILE, DS, T, float, T>(v, grad, q, dk, (i64)b * Nk, (i64)b * Nq, readers, writers, key_mask,
                                        query_mask, D, Dv, d0, causal ? WALK_ANTICAUSAL : WALK_NONE, scale);
    }
  }
}
