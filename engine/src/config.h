// config.h — the model hyper-parameters the engine needs, read from HF config.json.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace engine {

// RoPE frequency scaling (config.json "rope_scaling").
struct RopeScaling {
  std::string type = "default";  // "default" | "linear" | "llama3"
  double factor = 1.0;
  double low_freq_factor = 1.0;    // llama3 only
  double high_freq_factor = 4.0;   // llama3 only
  int64_t original_max_position_embeddings = 8192;  // llama3 only
};

struct ModelConfig {
  std::string architecture;  // e.g. "Qwen3ForCausalLM"
  std::string model_type;    // e.g. "qwen3"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v projections carry a bias (Qwen2)
  bool qk_norm = false;         // per-head RMSNorm of q and k before RoPE (Qwen3)
  std::vector<int64_t> eos_token_ids;
};

// Parses config.json text. Accepted architectures: LlamaForCausalLM, MistralForCausalLM,
// Qwen2ForCausalLM, Qwen3ForCausalLM. Throws EngineError("internal", ...) with a clear
// message on a missing/invalid field or an unsupported architecture / rope_scaling type.
ModelConfig parse_config(const std::string& json_text);

// Reads DIR/config.json and, when present, adds DIR/generation_config.json's eos_token_id(s)
// (real chat checkpoints list their end-of-turn ids there).
ModelConfig load_config(const std::string& dir);

// RoPE inverse frequencies, head_dim/2 values, in radians per position:
// inv_freq[i] = 1 / theta^(2i/head_dim), then scaled as HF transformers does for
// rope_scaling ("linear": / factor; "llama3": `_compute_llama3_parameters`).
std::vector<float> rope_inv_freq(const ModelConfig& cfg);

}  // namespace engine
