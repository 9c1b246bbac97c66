// cpu/ops.cpp — see ops.h.
#include "cpu/ops.h"

#include <cblas.h>

#include <omp.h>

#include <algorithm>
#include <cmath>

namespace engine::cpu {

void rmsnorm(const float* x, float* y, const float* w, int64_t rows, int64_t n, int64_t stride,
             float eps) {
#pragma omp parallel for schedule(static) if (rows * n > kParallelMin)
  for (int64_t r = 0; r < rows; r++) rmsnorm_serial(x + r * stride, y + r * stride, w, 1, n, n, eps);
}

void rmsnorm_serial(const float* x, float* y, const float* w, int64_t rows, int64_t n, int64_t stride,
                    float eps) {
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * stride;
    float* yr = y + r * stride;
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)xr[i] * xr[i];
    const float inv = (float)(1.0 / std::sqrt(ss / (double)n + (double)eps));
    for (int64_t i = 0; i < n; i++) yr[i] = xr[i] * inv * w[i];
  }
}

// One single-threaded BLAS call: C[:, n0:n0+n] = A · B[n0:n0+n, :]^T (ldc = N).
static void gemm_slice(const float* A, int64_t lda, const float* B, float* C, int64_t M, int64_t N,
                       int64_t K, int64_t n0, int64_t n) {
  if (n <= 0) return;
  if (M == 1) {  // GEMV: avoids packing the whole weight matrix for a single row
    cblas_sgemv(CblasRowMajor, CblasNoTrans, (blasint)n, (blasint)K, 1.0f, B + n0 * K, (blasint)K, A, 1,
                0.0f, C + n0, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)M, (blasint)n, (blasint)K, 1.0f, A,
                (blasint)lda, B + n0 * K, (blasint)K, 0.0f, C + n0, (blasint)N);
  }
}

void matmul_nt(const float* A, int64_t lda, const float* B, float* C, int64_t M, int64_t N,
               int64_t K) {
  // OpenMP is the backend's only thread pool (OpenBLAS is pinned to 1 thread; two spinning
  // pools on the same cores starve each other). Split the output columns (= weight rows)
  // across threads, 64-aligned, when the product is big enough to pay for the fork.
  const int nt = omp_get_max_threads();
  if (nt == 1 || M * N * K < (1 << 18) || N < 128) {
    gemm_slice(A, lda, B, C, M, N, K, 0, N);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    const int64_t t = omp_get_thread_num(), n_t = omp_get_num_threads();
    const int64_t per = ((N + n_t - 1) / n_t + 63) / 64 * 64;
    const int64_t n0 = std::min(N, t * per), n1 = std::min(N, n0 + per);
    gemm_slice(A, lda, B, C, M, N, K, n0, n1 - n0);
  }
}

void rope_head(float* x, const float* cos_, const float* sin_, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; i++) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos_[i] - b * sin_[i];
    x[i + half] = b * cos_[i] + a * sin_[i];
  }
}

void swiglu_inplace(float* x, int64_t rows, int64_t I) {
#pragma omp parallel for schedule(static) if (rows * I > kParallelMin)
  for (int64_t r = 0; r < rows; r++) {
    float* g = x + r * 2 * I;
    const float* u = g + I;
    for (int64_t i = 0; i < I; i++) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

void add_inplace(float* x, const float* y, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

}  // namespace engine::cpu
