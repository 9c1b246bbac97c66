// tiny_model.h — a small random Qwen3-style model for tests (built in memory).
#pragma once

#include <memory>

#include "config.h"
#include "cpu/cpu_model.h"
#include "engine.h"
#include "model.h"

namespace test {

// vocab 50, hidden 16, 2 layers, 4 heads / 2 kv heads of dim 8, QK-norm, tied embeddings,
// max 64 positions.
inline engine::ModelConfig tiny_config() {
  engine::ModelConfig c;
  c.architecture = "Qwen3ForCausalLM";
  c.model_type = "qwen3";
  c.vocab_size = 50;
  c.hidden_size = 16;
  c.intermediate_size = 32;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-6;
  c.tie_word_embeddings = true;
  c.qk_norm = true;
  c.eos_token_ids = {7};
  return c;
}

inline std::unique_ptr<engine::cpu::CpuModel> tiny_backend(const engine::ModelConfig& c, int64_t num_blocks,
                                                           int64_t max_tokens) {
  return std::make_unique<engine::cpu::CpuModel>(c, engine::random_weights(c, 1, 0.5f), num_blocks,
                                                 max_tokens, c.max_position_embeddings);
}

inline std::unique_ptr<engine::Engine> tiny_engine(int64_t num_blocks = 8, int64_t max_tokens = 64) {
  auto c = tiny_config();
  auto b = tiny_backend(c, num_blocks, max_tokens);
  return std::make_unique<engine::Engine>(c, std::move(b), "f32", "cpu", c.max_position_embeddings);
}

}  // namespace test
