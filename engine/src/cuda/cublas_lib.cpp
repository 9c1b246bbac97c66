// cuda/cublas_lib.cpp — see cublas_lib.h.
#include "cuda/cublas_lib.h"

#include <dlfcn.h>
#include <glob.h>

#include <cstdlib>
#include <vector>

#include "common.h"

namespace engine::cuda {

namespace {

std::vector<std::string> candidates() {
  std::vector<std::string> c;
  if (const char* env = std::getenv("ENGINE_CUBLAS_LIB")) c.push_back(env);
  c.push_back("libcublas.so.13");
  c.push_back("libcublas.so.12");
  c.push_back("libcublas.so");
  const char* patterns[] = {
      "/usr/local/cuda/lib64/libcublas.so.1[23]",
      "/usr/local/cuda/targets/x86_64-linux/lib/libcublas.so.1[23]",
      "/usr/local/cuda-1[23]*/lib64/libcublas.so.1[23]",
      "/opt/torch/.venv/lib/python3*/site-packages/nvidia/cu1[23]/lib/libcublas.so.1[23]",
      "/opt/torch/.venv/lib/python3*/site-packages/nvidia/cublas/lib/libcublas.so.1[23]",
      "/usr/local/lib/python3*/dist-packages/nvidia/cu1[23]/lib/libcublas.so.1[23]",
      "/usr/local/lib/python3*/site-packages/nvidia/cu1[23]/lib/libcublas.so.1[23]",
      "/usr/lib/python3*/site-packages/nvidia/cu1[23]/lib/libcublas.so.1[23]",
  };
  for (const char* p : patterns) {
    glob_t g{};
    if (glob(p, 0, nullptr, &g) == 0)
      for (size_t i = 0; i < g.gl_pathc; i++) c.push_back(g.gl_pathv[i]);
    globfree(&g);
  }
  return c;
}

}  // namespace

Cublas::Cublas(cudaStream_t stream, void* workspace, size_t workspace_bytes) {
  std::string tried;
  for (const std::string& p : candidates()) {
    lib_ = dlopen(p.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib_) { path_ = p; break; }
    tried += " " + p;
  }
  ENGINE_CHECK(lib_, "internal", "cannot load cuBLAS (set ENGINE_CUBLAS_LIB=/path/libcublas.so.13); tried:" << tried);
  auto sym = [&](const char* name) {
    void* f = dlsym(lib_, name);
    ENGINE_CHECK(f, "internal", "cuBLAS " << path_ << " lacks " << name);
    return f;
  };
  using Create = int (*)(void**);
  using SetStream = int (*)(void*, cudaStream_t);
  using SetWorkspace = int (*)(void*, void*, size_t);
  auto create = (Create)sym("cublasCreate_v2");
  auto set_stream = (SetStream)sym("cublasSetStream_v2");
  auto set_ws = (SetWorkspace)sym("cublasSetWorkspace_v2");
  destroy_ = (Destroy)sym("cublasDestroy_v2");
  gemm_ex_ = (GemmEx)sym("cublasGemmEx");
  int s = create(&handle_);
  ENGINE_CHECK(s == 0, "internal", "cublasCreate failed with status " << s);
  s = set_stream(handle_, stream);
  ENGINE_CHECK(s == 0, "internal", "cublasSetStream failed with status " << s);
  s = set_ws(handle_, workspace, workspace_bytes);
  ENGINE_CHECK(s == 0, "internal", "cublasSetWorkspace failed with status " << s);
}

Cublas::~Cublas() {
  if (handle_ && destroy_) destroy_(handle_);
  // The library stays loaded: unloading cuBLAS while the CUDA context lives is not worth it.
}

void Cublas::gemm_nt(int M, int N, int K, const void* A, int lda, const void* B, int ldb, void* C,
                     cudaDataType c_type, int ldc, float alpha, float beta) {
  if (M <= 0 || N <= 0) return;
  // Row-major C[M,N] = A[M,K]·B[N,K]^T is column-major C^T[N,M] = B^T(op T of col-major
  // [K,N]) · A (col-major [K,M]).
  const int s = gemm_ex_(handle_, kOpT, kOpN, N, M, K, &alpha, B, CUDA_R_16BF, ldb, A, CUDA_R_16BF, lda,
                         &beta, C, c_type, ldc, kCublasCompute32F, kCublasGemmDefault);
  ENGINE_CHECK(s == 0, "internal", "cublasGemmEx(M=" << M << ", N=" << N << ", K=" << K << ") failed with status " << s);
}

}  // namespace engine::cuda
