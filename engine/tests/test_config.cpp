// test_config.cpp — config.json parsing and RoPE inverse frequencies.
#include <cmath>
#include <string>

#include "common.h"
#include "config.h"
#include "test.h"

static std::string parse_error(const std::string& json) {
  try {
    engine::parse_config(json);
  } catch (const engine::EngineError& e) {
    return e.what();
  }
  return "";
}

static const char* kLlama31 = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
  "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
  "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
  "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": false,
  "eos_token_id": [128001, 128008, 128009],
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}})";

TEST(config_llama31) {
  auto c = engine::parse_config(kLlama31);
  CHECK(c.architecture == "LlamaForCausalLM");
  CHECK(c.head_dim == 128);
  CHECK(c.num_kv_heads == 8);
  CHECK(c.eos_token_ids.size() == 3 && c.eos_token_ids[2] == 128009);
  CHECK(!c.attention_bias && !c.qk_norm && !c.tie_word_embeddings);
  CHECK(c.rope_scaling.type == "llama3");
}

TEST(llama3_inv_freq_matches_transformers) {
  auto c = engine::parse_config(kLlama31);
  auto inv = engine::rope_inv_freq(c);
  CHECK(inv.size() == 64);
  // Reference: transformers _compute_llama3_parameters (f32), computed offline.
  const struct { int i; double v; } ref[] = {
      {0, 1.0},                        // high frequency: unchanged
      {20, 0.016560440883040428},      // high frequency: unchanged
      {29, 0.0021665706299245358},     // medium: smoothed
      {31, 0.0008567514596506953},     // medium
      {34, 0.0001785077911335975},     // medium
      {35, 9.556212899042293e-05},     // low frequency: / factor
      {63, 3.068925877869333e-07},     // low frequency: / factor
  };
  for (const auto& r : ref) CHECK_NEAR(inv[r.i] / r.v, 1.0, 2e-6);
}

// transformers >= 5 writes the RoPE settings as one `rope_parameters` object.
TEST(config_rope_parameters_transformers5) {
  auto c = engine::parse_config(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
      "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})");
  CHECK(c.rope_theta == 500000.0);
  CHECK(c.rope_scaling.type == "llama3");
  const auto ref = engine::rope_inv_freq(engine::parse_config(kLlama31));
  const auto inv = engine::rope_inv_freq(c);
  CHECK(inv.size() == ref.size());
  for (size_t i = 0; i < inv.size(); i++) CHECK(inv[i] == ref[i]);
  auto d = engine::parse_config(R"({"architectures":["Qwen3ForCausalLM"],"vocab_size":10,"hidden_size":8,
    "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":64,
    "rope_parameters":{"rope_type":"default","rope_theta":1000000.0}})");
  CHECK(d.rope_theta == 1000000.0);
}

TEST(config_defaults_and_variants) {
  auto q3 = engine::parse_config(R"({"architectures":["Qwen3ForCausalLM"],"model_type":"qwen3",
    "vocab_size":151936,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
    "num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,"max_position_embeddings":4096,
    "tie_word_embeddings":true,"eos_token_id":151645,"rope_scaling":null,"attention_bias":false})");
  CHECK(q3.qk_norm && q3.tie_word_embeddings && q3.head_dim == 32);
  CHECK(q3.rope_theta == 10000.0 && q3.rope_scaling.type == "default");
  CHECK(q3.eos_token_ids.size() == 1 && q3.eos_token_ids[0] == 151645);
  auto inv = engine::rope_inv_freq(q3);
  CHECK_NEAR(inv[1], 1.0 / std::pow(10000.0, 2.0 / 32.0), 1e-7);
  auto q2 = engine::parse_config(R"({"architectures":["Qwen2ForCausalLM"],"vocab_size":10,
    "hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,
    "max_position_embeddings":32})");
  CHECK(q2.attention_bias && !q2.qk_norm && q2.num_kv_heads == 2 && q2.head_dim == 4);
  CHECK(parse_error(R"({"architectures":["GPT2LMHeadModel"]})").find("unsupported architectures") != std::string::npos);
  CHECK(parse_error(R"({"architectures":["LlamaForCausalLM"],"vocab_size":10})").find("hidden_size") != std::string::npos);
  CHECK(parse_error(R"({"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
    "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":32,
    "rope_scaling":{"type":"yarn","factor":4}})").find("unsupported rope_scaling") != std::string::npos);
}
