// cpu/ops.h — the small f32 kernels of the CPU backend (row-wise, OpenMP over rows).
#pragma once

#include <cstdint>

namespace engine::cpu {

// Element counts below which a loop stays on the calling thread: forking an OpenMP team
// costs microseconds, and on a busy machine waking idle threads costs far more.
constexpr int64_t kParallelMin = 1 << 14;

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, for rows r < rows; x, y: [rows, n] with row
// stride `stride` (floats); w: [n]. In place (x == y) is allowed. Sum of squares in f64.
void rmsnorm(const float* x, float* y, const float* w, int64_t rows, int64_t n, int64_t stride,
             float eps);
// Same, on the calling thread only (for use inside a parallel loop).
void rmsnorm_serial(const float* x, float* y, const float* w, int64_t rows, int64_t n, int64_t stride,
                    float eps);

// C[M, N] = A[M, K] · B[N, K]^T  (B in HF [out, in] layout), via cblas_sgemm (sgemv when
// M == 1), split over OpenMP threads along N. lda = row stride of A in floats (>= K).
// Requires OpenBLAS to run single-threaded (CpuModel's constructor arranges it).
void matmul_nt(const float* A, int64_t lda, const float* B, float* C, int64_t M, int64_t N,
               int64_t K);

// In-place HF "rotate_half" RoPE on one head vector x[D]: for i < D/2, with
// c = cos_[i], s = sin_[i]: (x[i], x[i+D/2]) <- (x[i]*c - x[i+D/2]*s, x[i+D/2]*c + x[i]*s).
void rope_head(float* x, const float* cos_, const float* sin_, int64_t D);

// x[r, 0:I] <- silu(x[r, 0:I]) * x[r, I:2I] for rows r < rows (row stride 2I): SwiGLU,
// leaving the activations in the first half of each row (the down GEMM reads lda = 2I).
void swiglu_inplace(float* x, int64_t rows, int64_t I);

// x[i] += y[i], i < n.
void add_inplace(float* x, const float* y, int64_t n);

}  // namespace engine::cpu
