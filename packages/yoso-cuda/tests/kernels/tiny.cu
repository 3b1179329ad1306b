// A small valid program for the cache tests (compiles in well under a second).
#include "common.cuh"

template <typename T>
__global__ void scale(const T* x, float* out, float factor, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = factor * to_float(x[i]);
}
