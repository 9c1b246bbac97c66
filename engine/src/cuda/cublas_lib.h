// cuda/cublas_lib.h — cuBLAS, loaded at run time with dlopen.
//
// Why not link CUDA::cublas: the CUDA 13 toolkit on the development/CI machines ships nvcc and
// cudart but no cuBLAS, while the GPU machines carry it (system CUDA or the `nvidia-cublas`
// wheel next to PyTorch). Declaring the handful of entry points we use (ABI-stable C symbols
// with their documented enum values) keeps the build working everywhere; the library is found
// at backend construction: $ENGINE_CUBLAS_LIB, then the loader's path (libcublas.so.13 /
// libcublas.so), then a few well-known install prefixes (see cublas_lib.cpp).
#pragma once

#include <cuda_runtime.h>
#include <library_types.h>

#include <string>

namespace engine::cuda {

// Values from cublas_api.h (CUDA 12/13).
enum CublasOp : int { kOpN = 0, kOpT = 1 };
constexpr int kCublasCompute32F = 68;     // CUBLAS_COMPUTE_32F
constexpr int kCublasGemmDefault = -1;    // CUBLAS_GEMM_DEFAULT

class Cublas {
 public:
  // Loads the library and creates a handle bound to `stream` with `workspace` (needed so that
  // GEMMs can be captured in CUDA graphs without allocating). Throws EngineError("internal").
  Cublas(cudaStream_t stream, void* workspace, size_t workspace_bytes);
  ~Cublas();
  Cublas(const Cublas&) = delete;
  Cublas& operator=(const Cublas&) = delete;

  // Row-major C[M, N] = alpha · A[M, K] · B[N, K]^T + beta · C, A and B bf16 (lda/ldb in
  // elements), C in `c_type` (CUDA_R_32F or CUDA_R_16BF), fp32 accumulation.
  void gemm_nt(int M, int N, int K, const void* A, int lda, const void* B, int ldb, void* C,
               cudaDataType c_type, int ldc, float alpha = 1.0f, float beta = 0.0f);

  const std::string& path() const { return path_; }

 private:
  void* lib_ = nullptr;
  void* handle_ = nullptr;
  std::string path_;
  using GemmEx = int (*)(void*, int, int, int, int, int, const void*, const void*, cudaDataType, int,
                         const void*, cudaDataType, int, const void*, void*, cudaDataType, int, int, int);
  using Destroy = int (*)(void*);
  GemmEx gemm_ex_ = nullptr;
  Destroy destroy_ = nullptr;
};

}  // namespace engine::cuda
