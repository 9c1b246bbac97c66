// cuda/common.cuh — the one CUDA_CHECK / CUBLAS_CHECK, bf16 helpers and block reductions
// shared by every kernel family (one family per .cuh: kernels first, then launchers that
// take a cudaStream_t and check shapes).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "common.h"

// Throws EngineError("internal") on a failed CUDA runtime call: the server turns it into an
// error reply instead of a crash (a sticky device error makes every later call fail too).
#define CUDA_CHECK(expr)                                                                 \
  do {                                                                                   \
    const cudaError_t cuda_check_e_ = (expr);                                            \
    ENGINE_CHECK(cuda_check_e_ == cudaSuccess, "internal",                               \
                 "CUDA error " << cudaGetErrorName(cuda_check_e_) << " ("                 \
                               << cudaGetErrorString(cuda_check_e_) << ") at " << __FILE__ \
                               << ":" << __LINE__ << ": " #expr);                         \
  } while (0)

// cuBLAS status (an int: cuBLAS is loaded at run time, see cublas_lib.h).
#define CUBLAS_CHECK(expr)                                                                 \
  do {                                                                                     \
    const int cublas_check_s_ = (int)(expr);                                               \
    ENGINE_CHECK(cublas_check_s_ == 0, "internal",                                         \
                 "cuBLAS status " << cublas_check_s_ << " at " << __FILE__ << ":" << __LINE__ \
                                  << ": " #expr);                                           \
  } while (0)

// Checks the launch that just happened: configuration errors surface here; faults surface at
// the next synchronizing call, which names no kernel. With ENGINE_CUDA_SYNC=1 every eager
// launch is followed by a device synchronisation and a check, so a fault is reported at the
// launch (file:line) of the kernel that caused it (slow: for debugging and the first device
// run). Launches recorded into a CUDA graph are not synchronised (capture forbids it).
#define CUDA_CHECK_LAUNCH()                                                                 \
  do {                                                                                      \
    CUDA_CHECK(cudaGetLastError());                                                         \
    if (::engine::cuda::sync_after_launch() && !::engine::cuda::capturing_graph())          \
      CUDA_CHECK(cudaDeviceSynchronize());                                                  \
  } while (0)

namespace engine::cuda {

// ENGINE_CUDA_SYNC=1 (read once): synchronise and check after every eager kernel launch.
inline bool sync_after_launch() {
  static const bool on = [] {
    const char* e = std::getenv("ENGINE_CUDA_SYNC");
    return e != nullptr && e[0] == '1';
  }();
  return on;
}

// Whether this thread is recording launches into a CUDA graph (set around the capture).
inline bool& capturing_graph() {
  static thread_local bool capturing = false;
  return capturing;
}

using bf16 = __nv_bfloat16;

constexpr int kWarp = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__device__ __forceinline__ int ceil_div_dev(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum; every thread gets the result. `scratch` holds >= 32 values. Contains
// __syncthreads: call from all threads.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nw = (blockDim.x + kWarp - 1) / kWarp;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < nw ? scratch[lane] : T(0);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
  return r;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nw = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < nw ? scratch[lane] : -INFINITY;
  return warp_max(r);
}

// Exclusive block scan of one value per thread; *total gets the block sum. `scratch` holds
// >= 33 values. Contains __syncthreads.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* scratch, T* total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nw = (blockDim.x + kWarp - 1) / kWarp;
  T incl = v;
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const T n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  __syncthreads();
  if (lane == kWarp - 1) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    T w = lane < nw ? scratch[lane] : T(0);
    T wi = w;
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
      const T n = __shfl_up_sync(0xffffffffu, wi, o);
      if (lane >= o) wi += n;
    }
    if (lane < nw) scratch[lane] = wi - w;  // exclusive prefix of warp totals
    if (lane == kWarp - 1) scratch[32] = wi;
  }
  __syncthreads();
  const T r = scratch[warp] + incl - v;
  *total = scratch[32];
  return r;
}

// bf16 <-> f32, 8 values in one 16-byte vector.
struct alignas(16) Bf16x8 { __nv_bfloat162 h[4]; };

__device__ __forceinline__ void bf16x8_to_f32(const Bf16x8& v, float* out) {
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const float2 f = __bfloat1622float2(v.h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

}  // namespace engine::cuda
