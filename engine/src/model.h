// model.h — backend-independent model pieces: the f32 weights, a batch description, and
// the Backend interface the engine drives (cpu/ implements it; a CUDA backend would too).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "config.h"
#include "safetensors.h"
#include "sampler.h"

namespace engine {

// One decoder layer's weights, f32, row-major, HF [out_features, in_features] layout.
// q/k/v (and gate/up) are concatenated along out_features at load so that each is one GEMM.
struct LayerWeights {
  std::vector<float> input_norm;  // [hidden]
  std::vector<float> wqkv;        // [(H + 2*KV) * D, hidden]: rows q | k | v
  std::vector<float> bqkv;        // [(H + 2*KV) * D], empty unless attention_bias
  std::vector<float> q_norm;      // [D], empty unless qk_norm (Qwen3)
  std::vector<float> k_norm;      // [D], empty unless qk_norm
  std::vector<float> wo;          // [hidden, H * D]
  std::vector<float> post_norm;   // [hidden]
  std::vector<float> w_gate_up;   // [2 * I, hidden]: rows gate | up
  std::vector<float> w_down;      // [hidden, I]
};

struct ModelWeights {
  std::vector<float> embed;       // [vocab, hidden]
  std::vector<float> lm_head;     // [vocab, hidden]; empty when tied (use embed)
  std::vector<float> final_norm;  // [hidden]
  std::vector<LayerWeights> layers;
  DType dtype = DType::F32;       // checkpoint dtype (of embed_tokens), reported by `info`
  const float* lm_head_data() const { return lm_head.empty() ? embed.data() : lm_head.data(); }
};

// Where a weight matrix of ModelWeights lives in a checkpoint: row blocks of named tensors,
// stacked in order (q | k | v for wqkv, gate | up for w_gate_up), each [rows, cols].
struct TensorRows {
  std::string name;
  int64_t rows = 0;
};
struct MatrixParts {
  std::vector<TensorRows> parts;  // empty: absent (lm_head of a tied model)
  int64_t cols = 0;
  int64_t numel() const;
};
struct LayerMatrixParts {
  MatrixParts wqkv, wo, w_gate_up, w_down;
};
struct ModelMatrixParts {
  MatrixParts embed, lm_head;
  std::vector<LayerMatrixParts> layers;
};

// The matrices the config implies (HF names, model.layers.N.*), each tensor shape-checked.
// Throws as load_weights does.
ModelMatrixParts matrix_parts(const ModelConfig& cfg, const TensorStore& store);

// Loads and shape-checks every tensor the config implies (HF names, model.layers.N.*) as f32.
// `with_matrices = false` leaves the matrices (those of matrix_parts) empty, for a backend that
// converts them itself (the CUDA backend copies bf16 checkpoints straight to bf16).
// Throws EngineError("internal", "missing tensor ..." / "tensor ... has shape ...").
ModelWeights load_weights(const ModelConfig& cfg, const TensorStore& store, bool with_matrices = true);

// A random model (uniform weights in [-scale, scale], norms = 1) for tests and smoke runs.
ModelWeights random_weights(const ModelConfig& cfg, uint64_t seed, float scale);

// One sequence's slice of a batch. The slice's tokens sit at absolute positions
// start_pos .. start_pos + num_tokens - 1; all positions < start_pos are already in the KV
// cache blocks of `block_table` (block_table[p / 16] holds position p).
struct BatchSeq {
  const int32_t* tokens = nullptr;
  int64_t num_tokens = 0;
  int64_t start_pos = 0;
  const int32_t* block_table = nullptr;
  int64_t block_table_len = 0;
  bool need_output = false;  // return the final hidden state of this slice's last token
};

class Backend {
 public:
  virtual ~Backend() = default;
  // Most tokens one forward() may carry (the engine splits larger steps).
  virtual int64_t max_batch_tokens() const = 0;
  virtual int64_t num_blocks() const = 0;
  virtual size_t kv_cache_bytes() const = 0;
  // Runs the decoder over all tokens of `seqs` (sum of num_tokens <= max_batch_tokens),
  // writing their K/V into the paged cache. For every seq with need_output, in order,
  // writes the final-RMSNormed hidden state of its last token: hidden_out [n_out, hidden].
  virtual void forward(const std::vector<BatchSeq>& seqs, float* hidden_out) = 0;
  // logits [rows, vocab] = hidden [rows, hidden] · lm_head^T.
  virtual void lm_head(const float* hidden, int64_t rows, float* logits) = 0;

  // Optional fast path for backends that sample where the logits are (the GPU) or have no
  // logits at all (`sim`): forward + LM head + sampling in one call, with nothing but token
  // ids (and log-probabilities) coming back. `samples` has one entry per seq with
  // need_output, in order; tokens_out/logprobs_out have as many entries. Sampling must follow
  // PROTOCOL.md exactly (draw from (seed, pos) only). Returns false when unsupported; the
  // engine then calls forward() and lm_head() and samples on the host. Used only for steps
  // in which no sequence asks for return_logits.
  struct DeviceSample {
    SamplingParams params;
    uint64_t pos = 0;           // position of the token being produced
    bool want_logprob = false;
  };
  virtual bool forward_sample(const std::vector<BatchSeq>& /*seqs*/, const std::vector<DeviceSample>& /*samples*/,
                              int32_t* /*tokens_out*/, float* /*logprobs_out*/) {
    return false;
  }
};

}  // namespace engine
