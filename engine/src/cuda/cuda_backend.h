// cuda/cuda_backend.h — the CUDA Backend: bf16 weights and KV cache, fp32 accumulation,
// cuBLAS GEMMs, own kernels (cuda/*.cuh), device-side sampling, CUDA graphs for decode.
// This header is plain C++ (no CUDA types) so that main.cpp builds with the host compiler.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "config.h"
#include "model.h"

namespace engine::cuda {

struct CudaOptions {
  int device = 0;                        // cuda:N
  double gpu_memory_utilization = 0.9;   // fraction of total device memory the process may use
  int64_t num_blocks = 0;                // > 0: overrides the KV sizing from free memory
  int64_t max_tokens = 2048;             // tokens per forward (workspace size)
  int64_t max_pos = 0;                   // longest sequence (0 = cfg.max_position_embeddings)
  bool cuda_graphs = true;               // decode steps replay captured graphs
};

class CudaBackend : public Backend {
 public:
  // Uploads `weights` as bf16 (norms, biases, RoPE table as f32) and frees the host copies;
  // sizes the KV cache from free memory. Throws EngineError("internal") on any failure.
  CudaBackend(const ModelConfig& cfg, ModelWeights weights, const CudaOptions& opt);
  // The same from a checkpoint: norms and biases via load_weights, the matrices read from the
  // store straight to bf16 (TensorStore::load_bf16: a bf16 checkpoint is copied as it is, in
  // 64 MiB pinned chunks, never converted to f32 on the host).
  CudaBackend(const ModelConfig& cfg, const TensorStore& store, const CudaOptions& opt);
  ~CudaBackend() override;

  int64_t max_batch_tokens() const override;
  int64_t num_blocks() const override;
  size_t kv_cache_bytes() const override;
  void forward(const std::vector<BatchSeq>& seqs, float* hidden_out) override;
  void lm_head(const float* hidden, int64_t rows, float* logits) override;
  bool forward_sample(const std::vector<BatchSeq>& seqs, const std::vector<DeviceSample>& samples,
                      int32_t* tokens_out, float* logprobs_out) override;

  // "NVIDIA H100 80GB HBM3, 132 SMs, 79.2 GiB" (for the startup line).
  std::string device_description() const;
  // bytes of K+V one 16-token block needs across all layers (bf16).
  static size_t bytes_per_block(const ModelConfig& cfg);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace engine::cuda
