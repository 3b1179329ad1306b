// A deliberately broken kernel: the #line mapping test expects NVRTC to name this file and line 7.
#include "common.cuh"

template <typename T>
__global__ void broken(const T* x, float* out) {
  float value = to_float(x[threadIdx.x]);
  out[threadIdx.x] = value + this_name_is_not_declared;
}
