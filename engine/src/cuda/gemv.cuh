// cuda/gemv.cuh — the small-batch matrix product of decode steps:
//   C[T, N] = alpha · A[T, K] · W[N, K]^T + beta · C      (A, W bf16; C f32; T <= kGemvMaxRows)
// A decode step of a few sequences reads every weight once and does 2·T flops per weight
// byte pair, so it is bound by HBM bandwidth alone. cuBLAS reached 58 % of the H200's on the
// Llama-3.1-8B shape at batch 1 (bench/results/engine-h200-2026-12-04.json); this kernel is
// the plain bandwidth-bound GEMV layout: one warp per output column, 16-byte loads along K,
// a warp reduction at the end. Off by default until a device run has passed cuda_tests with
// it (ENGINE_CUDA_GEMV=1 turns it on, see gemv_enabled).
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace engine::cuda {

constexpr int kGemvMaxRows = 8;
constexpr int kGemvWarps = 8;  // output columns per block, one warp each

// ---- kernels ------------------------------------------------------------------------------

// The 8 bf16 at p (16-byte aligned) as f32, from one 128-bit read-only load (a Bf16x8
// struct copy compiles to four 32-bit ones), widened by common.cuh's bf16x8_to_f32.
__device__ __forceinline__ void load_bf16x8_f32(const bf16* __restrict__ p, float* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  Bf16x8 b;
  static_assert(sizeof(b) == sizeof(v), "Bf16x8 is one 16-byte vector");
  memcpy(&b, &v, sizeof v);
  bf16x8_to_f32(b, out);
}

// Warp w of block b computes column n = b·kGemvWarps + w for every row t < T. Lane l reads the
// 16-byte chunks l, l+32, … of W's row n (and the same chunks of each A row, which stay in L1/L2:
// A is T·K·2 bytes, W is N·K·2), accumulates in f32, and lane 0 writes after the reduction.
template <int T>
static __global__ void gemv_nt_kernel(const bf16* __restrict__ A, int lda, const bf16* __restrict__ W, int ldw,
                                      float* __restrict__ C, int ldc, int N, int K, float alpha, float beta) {
  const int lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * kGemvWarps + threadIdx.x / kWarp;
  if (n >= N) return;  // a whole warp leaves together: the shuffles below see full warps
  const bf16* w = W + (size_t)n * ldw;
  float acc[T];
#pragma unroll
  for (int t = 0; t < T; t++) acc[t] = 0.f;
  const int k8 = K / 8;
#pragma unroll 4
  for (int c = lane; c < k8; c += kWarp) {
    float wf[8];
    load_bf16x8_f32(w + 8 * c, wf);
#pragma unroll
    for (int t = 0; t < T; t++) {
      float af[8];
      load_bf16x8_f32(A + (size_t)t * lda + 8 * c, af);
#pragma unroll
      for (int j = 0; j < 8; j++) acc[t] = fmaf(af[j], wf[j], acc[t]);
    }
  }
#pragma unroll
  for (int t = 0; t < T; t++) {
    const float s = warp_sum(acc[t]);
    if (lane == 0) {
      float* c = C + (size_t)t * ldc + n;
      *c = beta == 0.f ? alpha * s : alpha * s + beta * *c;  // beta 0 never reads C
    }
  }
}

// ---- launchers ----------------------------------------------------------------------------

// ENGINE_CUDA_GEMV=1 (read once): products of at most kGemvMaxRows rows use gemv_nt.
inline bool gemv_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("ENGINE_CUDA_GEMV");
    return e != nullptr && e[0] == '1';
  }();
  return on;
}

// Whether gemv_nt takes this product: 1..kGemvMaxRows rows, K and both leading dimensions
// multiples of 8 (16-byte chunks), A and W 16-byte aligned.
inline bool gemv_fits(int T, int K, const void* A, int lda, const void* W, int ldw) {
  return T >= 1 && T <= kGemvMaxRows && K > 0 && K % 8 == 0 && lda % 8 == 0 && ldw % 8 == 0 &&
         reinterpret_cast<uintptr_t>(A) % 16 == 0 && reinterpret_cast<uintptr_t>(W) % 16 == 0;
}

// C[T, N] = alpha · A[T, K] · W[N, K]^T + beta · C (row-major, leading dimensions in elements).
// Throws EngineError("internal") when !gemv_fits.
inline void gemv_nt(int T, int N, int K, const bf16* A, int lda, const bf16* W, int ldw, float* C, int ldc,
                    float alpha, float beta, cudaStream_t stream) {
  ENGINE_CHECK(gemv_fits(T, K, A, lda, W, ldw), "internal",
               "gemv_nt: unsupported shape T=" << T << " K=" << K << " lda=" << lda << " ldw=" << ldw);
  if (N <= 0) return;
  const dim3 grid((unsigned)ceil_div(N, kGemvWarps)), block(kGemvWarps * kWarp);
  switch (T) {
#define ENGINE_GEMV_CASE(R)                                                                      \
  case R:                                                                                        \
    gemv_nt_kernel<R><<<grid, block, 0, stream>>>(A, lda, W, ldw, C, ldc, N, K, alpha, beta); \
    break;
    ENGINE_GEMV_CASE(1) ENGINE_GEMV_CASE(2) ENGINE_GEMV_CASE(3) ENGINE_GEMV_CASE(4)
    ENGINE_GEMV_CASE(5) ENGINE_GEMV_CASE(6) ENGINE_GEMV_CASE(7) ENGINE_GEMV_CASE(8)
#undef ENGINE_GEMV_CASE
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace engine::cuda
