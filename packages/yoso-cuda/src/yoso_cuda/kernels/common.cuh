// Shared device helpers for the yoso CUDA kernels.
//
// Compiled with NVRTC and no CUDA toolkit headers (users install no toolkit), so the 16-bit float
// types are plain 16-bit payloads converted with PTX `cvt` instructions; all arithmetic is fp32.
// Layout conventions (checked on the Python side before any launch): every array is contiguous;
// q, k [B, N, D]; v, grad [B, N, Dv]; codes [B, m, N] int32; masks [B, N] bytes (bool), or null.
#pragma once

struct half_t {
  unsigned short bits;
};
struct bf16_t {
  unsigned short bits;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(half_t x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}
__device__ __forceinline__ float to_float(bf16_t x) { return __uint_as_float(((unsigned)x.bits) << 16); }

typedef long long i64;
constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr float PI_F = 3.14159265358979323846f;

// The forms of the lower-bound gradient (docs/math.md#lower-bound), chosen per bucket; the values are
// _plans.FORMS on the Python side.
constexpr int FORM_PAIRS = 0;
constexpr int FORM_TABLES = 1;
constexpr int FORM_AUTO = 2;

// Whether a bucket of nq queries and nk keys (of one hash) takes the table form: forced, or (auto) when
// its tables cost fewer multiply-adds than its pairs: 2 (nq + nk) D Dv against nq nk (Dv + 2 D). The pair
// and the table kernels both ask this with the same arguments, so every bucket is done by exactly one of
// them. In double, where the products cannot overflow; _plans.bucket_form computes the same expression.
__device__ __forceinline__ bool use_tables(int form, int nq, int nk, int D, int Dv) {
  if (form != FORM_AUTO) return form == FORM_TABLES;
  const double pairs = (double)nq * (double)nk * (double)(Dv + 2 * D);
  const double tables = 2.0 * (double)(nq + nk) * (double)D * (double)Dv;
  return tables < pairs;
}

// A row is kept unless a mask is given and says False.
__device__ __forceinline__ bool kept(const unsigned char* mask, i64 index) { return mask == nullptr || mask[index] != 0; }

// x^n for a small non-negative integer n, by squaring (exact for n = 0, 1 and as accurate as powf otherwise).
__device__ __forceinline__ float ipow(float x, int n) {
  float result = 1.f;
  while (n > 0) {
    if (n & 1) result *= x;
    x *= x;
    n >>= 1;
  }
  return result;
}

// Collision probability p(x) = (1 - arccos(x)/pi)^tau of a cosine x (clipped to [-1, 1]).
__device__ __forceinline__ float collision_probability(float x, int tau) {
  x = fminf(1.f, fmaxf(-1.f, x));
  return ipow(1.f - acosf(x) / PI_F, tau);
}

// Clamped importance ratio min(p'/p, max_ratio) = tau / max(sin(theta) (pi - theta), tau / max_ratio).
__device__ __forceinline__ float importance_ratio(float x, int tau, float max_ratio) {
  x = fminf(1.f, fmaxf(-1.f, x));
  const float theta = acosf(x);
  const float denominator = sinf(theta) * (PI_F - theta);
  return (float)tau / fmaxf(denominator, (float)tau / max_ratio);
}

// Copy `rows` rows of a [*, width] array into shared memory as fp32 with leading dimension `ld`.
// Row r comes from global row `index[r]` (or `first + r` when index is null); a row that is out of
// range (r >= count) or masked out is written as zeros -- with a select, not a product, so padding
// that holds inf or NaN never reaches a sum.
template <typename T>
__device__ __forceinline__ void load_rows(float* dst, int ld, const T* __restrict__ src, i64 batch_row0, int width,
                                          const int* __restrict__ index, int first, int count, int rows,
                                          const unsigned char* __restrict__ mask, i64 mask_row0) {
  for (int e = threadIdx.x; e < rows * width; e += blockDim.x) {
    const int r = e / width;
    const int d = e - r * width;
    float value = 0.f;
    if (r < count) {
      const int row = index != nullptr ? index[r] : first + r;
      if (kept(mask, mask_row0 + row)) value = to_float(src[(batch_row0 + row) * width + d]);
    }
    dst[r * ld + d] = value;
  }
}
