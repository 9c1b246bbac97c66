// config.cpp — see config.h.
#include "config.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common.h"

namespace engine {

using nlohmann::json;

static int64_t req_int(const json& j, const char* key) {
  ENGINE_CHECK(j.contains(key) && j[key].is_number_integer(), "internal",
               "config.json: missing or non-integer \"" << key << "\"");
  return j[key].get<int64_t>();
}

// An optional field: absent or null means `def`.
static bool present(const json& j, const char* key) { return j.contains(key) && !j[key].is_null(); }

static double opt_num(const json& j, const char* key, double def) {
  if (!present(j, key)) return def;
  ENGINE_CHECK(j[key].is_number(), "internal", "config.json: \"" << key << "\" is not a number");
  return j[key].get<double>();
}

static void add_eos(const json& v, std::vector<int64_t>& out, const char* file) {
  auto add = [&](const json& x) {
    ENGINE_CHECK(x.is_number_integer(), "internal", file << ": eos_token_id must be int or [int]");
    const int64_t id = x.get<int64_t>();
    for (int64_t e : out) if (e == id) return;
    out.push_back(id);
  };
  if (v.is_null()) return;
  if (v.is_array()) for (const auto& x : v) add(x);
  else add(v);
}

ModelConfig parse_config(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    ENGINE_FAIL("internal", "config.json: bad JSON: " << e.what());
  }
  ENGINE_CHECK(j.is_object(), "internal", "config.json: not a JSON object");
  ModelConfig c;

  ENGINE_CHECK(present(j, "architectures") && j["architectures"].is_array(), "internal",
               "config.json: missing \"architectures\"");
  for (const auto& a : j["architectures"]) {
    if (!a.is_string()) continue;
    const std::string s = a.get<std::string>();
    if (s == "LlamaForCausalLM" || s == "MistralForCausalLM" || s == "Qwen2ForCausalLM" ||
        s == "Qwen3ForCausalLM") {
      c.architecture = s;
      break;
    }
  }
  ENGINE_CHECK(!c.architecture.empty(), "internal",
               "config.json: unsupported architectures " << j["architectures"].dump()
                   << " (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                      "Qwen3ForCausalLM)");
  c.model_type = present(j, "model_type") && j["model_type"].is_string()
                     ? j["model_type"].get<std::string>() : "";

  c.vocab_size = req_int(j, "vocab_size");
  c.hidden_size = req_int(j, "hidden_size");
  c.intermediate_size = req_int(j, "intermediate_size");
  c.num_layers = req_int(j, "num_hidden_layers");
  c.num_heads = req_int(j, "num_attention_heads");
  c.num_kv_heads = present(j, "num_key_value_heads") ? req_int(j, "num_key_value_heads") : c.num_heads;
  c.max_position_embeddings = req_int(j, "max_position_embeddings");
  ENGINE_CHECK(c.vocab_size > 0 && c.hidden_size > 0 && c.intermediate_size > 0 &&
                   c.num_layers > 0 && c.num_heads > 0 && c.num_kv_heads > 0 &&
                   c.max_position_embeddings > 0,
               "internal", "config.json: sizes must be positive");
  ENGINE_CHECK(c.num_heads % c.num_kv_heads == 0, "internal",
               "config.json: num_attention_heads " << c.num_heads
                   << " is not a multiple of num_key_value_heads " << c.num_kv_heads);
  if (present(j, "head_dim")) {
    c.head_dim = req_int(j, "head_dim");
  } else {
    ENGINE_CHECK(c.hidden_size % c.num_heads == 0, "internal",
                 "config.json: hidden_size not divisible by num_attention_heads and no head_dim");
    c.head_dim = c.hidden_size / c.num_heads;
  }
  ENGINE_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0, "internal",
               "config.json: head_dim must be positive and even, got " << c.head_dim);

  c.rms_norm_eps = opt_num(j, "rms_norm_eps", 1e-6);
  // transformers >= 5 writes `rope_parameters` ({rope_type, rope_theta, factor, ...}) where
  // earlier versions wrote `rope_theta` + `rope_scaling`; read both.
  const bool has_params = present(j, "rope_parameters");
  if (has_params) ENGINE_CHECK(j["rope_parameters"].is_object(), "internal", "config.json: rope_parameters must be an object");
  c.rope_theta = present(j, "rope_theta") ? opt_num(j, "rope_theta", 10000.0)
                 : has_params             ? opt_num(j["rope_parameters"], "rope_theta", 10000.0)
                                          : 10000.0;
  const char* scaling_key = present(j, "rope_scaling") ? "rope_scaling" : has_params ? "rope_parameters" : nullptr;
  if (scaling_key != nullptr) {
    const json& rs = j[scaling_key];
    ENGINE_CHECK(rs.is_object(), "internal", "config.json: " << scaling_key << " must be an object");
    std::string type;
    if (present(rs, "rope_type")) type = rs["rope_type"].get<std::string>();
    else if (present(rs, "type")) type = rs["type"].get<std::string>();
    else type = "default";
    RopeScaling& r = c.rope_scaling;
    r.type = type;
    if (type == "default") {
    } else if (type == "linear") {
      r.factor = opt_num(rs, "factor", 1.0);
    } else if (type == "llama3") {
      r.factor = opt_num(rs, "factor", 8.0);
      r.low_freq_factor = opt_num(rs, "low_freq_factor", 1.0);
      r.high_freq_factor = opt_num(rs, "high_freq_factor", 4.0);
      r.original_max_position_embeddings =
          (int64_t)opt_num(rs, "original_max_position_embeddings", 8192);
      ENGINE_CHECK(r.high_freq_factor != r.low_freq_factor, "internal",
                   "config.json: llama3 rope_scaling needs high_freq_factor != low_freq_factor");
    } else {
      ENGINE_FAIL("internal", "config.json: unsupported rope_scaling type \"" << type
                                  << "\" (supported: default, linear, llama3)");
    }
    ENGINE_CHECK(r.factor > 0, "internal", "config.json: rope_scaling factor must be > 0");
  }

  c.tie_word_embeddings = present(j, "tie_word_embeddings") && j["tie_word_embeddings"].get<bool>();
  // Qwen2 checkpoints always carry q/k/v biases but do not say so in config.json.
  const bool default_bias = c.architecture == "Qwen2ForCausalLM";
  c.attention_bias = present(j, "attention_bias") ? j["attention_bias"].get<bool>() : default_bias;
  c.qk_norm = c.architecture == "Qwen3ForCausalLM";
  if (present(j, "eos_token_id")) add_eos(j["eos_token_id"], c.eos_token_ids, "config.json");
  return c;
}

static std::string read_file(const std::string& path, bool* ok) {
  std::ifstream in(path);
  *ok = bool(in);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

ModelConfig load_config(const std::string& dir) {
  bool ok = false;
  const std::string text = read_file(dir + "/config.json", &ok);
  ENGINE_CHECK(ok, "internal", "cannot read " << dir << "/config.json");
  ModelConfig c = parse_config(text);
  const std::string gen = read_file(dir + "/generation_config.json", &ok);
  if (ok) {
    try {
      json g = json::parse(gen);
      if (g.is_object() && g.contains("eos_token_id"))
        add_eos(g["eos_token_id"], c.eos_token_ids, "generation_config.json");
    } catch (const json::exception&) {
      // generation_config.json is optional metadata; a broken one must not block serving.
    }
  }
  return c;
}

std::vector<float> rope_inv_freq(const ModelConfig& cfg) {
  const int64_t half = cfg.head_dim / 2;
  std::vector<float> inv(half);
  const RopeScaling& r = cfg.rope_scaling;
  for (int64_t i = 0; i < half; i++) {
    // HF: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), evaluated in f32.
    const float expo = (float)(2 * i) / (float)cfg.head_dim;
    double f = 1.0 / std::pow(cfg.rope_theta, (double)expo);
    if (r.type == "linear") {
      f /= r.factor;
    } else if (r.type == "llama3") {
      // transformers.modeling_rope_utils._compute_llama3_parameters, element-wise.
      const double old_len = (double)r.original_max_position_embeddings;
      const double low_freq_wavelen = old_len / r.low_freq_factor;
      const double high_freq_wavelen = old_len / r.high_freq_factor;
      const double wavelen = 2.0 * M_PI / f;
      double scaled = wavelen > low_freq_wavelen ? f / r.factor : f;
      const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
      if (medium) {
        const double smooth = (old_len / wavelen - r.low_freq_factor) /
                              (r.high_freq_factor - r.low_freq_factor);
        scaled = (1.0 - smooth) * scaled / r.factor + smooth * scaled;
      }
      f = scaled;
    }
    inv[i] = (float)f;
  }
  return inv;
}

}  // namespace engine
