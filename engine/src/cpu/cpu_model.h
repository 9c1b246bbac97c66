// cpu/cpu_model.h — the CPU backend: f32 weights, a paged f32 KV cache, cblas GEMMs over the
// whole flat batch and per (sequence, KV head) for attention, and OpenMP loops for the rest.
#pragma once

#include <vector>

#include "kv_cache.h"
#include "model.h"

namespace engine::cpu {

class CpuModel : public Backend {
 public:
  // max_tokens: scratch arena capacity (tokens per forward); max_pos: longest sequence.
  CpuModel(const ModelConfig& cfg, ModelWeights weights, int64_t num_blocks, int64_t max_tokens,
           int64_t max_pos);

  int64_t max_batch_tokens() const override { return max_tokens_; }
  int64_t num_blocks() const override { return kv_.num_blocks(); }
  size_t kv_cache_bytes() const override { return kv_.total_bytes(); }
  void forward(const std::vector<BatchSeq>& seqs, float* hidden_out) override;
  void lm_head(const float* hidden, int64_t rows, float* logits) override;

 private:
  void attention(int64_t T, const std::vector<BatchSeq>& seqs, int64_t layer);

  ModelConfig cfg_;
  ModelWeights w_;
  KvCache kv_;
  std::vector<float> inv_freq_;  // [D/2]
  int64_t max_tokens_, max_pos_, num_threads_;

  // Scratch arena, sized once for max_tokens_ (no allocation in the hot path).
  std::vector<float> arena_;
  float *x_, *xn_, *qkv_, *attn_, *gu_, *cos_, *sin_;
  std::vector<int64_t> tok_pos_;  // [max_tokens] absolute position of each flat token
  std::vector<int32_t> tok_seq_;  // [max_tokens] index into seqs of each flat token
  // Per OpenMP thread: gathered K and V panels and a block of scores, grown to the longest
  // sequence seen (never shrunk).
  std::vector<std::vector<float>> attn_scratch_;
};

}  // namespace engine::cpu
