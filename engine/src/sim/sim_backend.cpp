// sim_backend.cpp — see sim_backend.h.
#include "sim/sim_backend.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <nlohmann/json.hpp>

#include "common.h"
#include "kv_cache.h"
#include "sampler.h"

namespace engine {
namespace sim {

double SimShape::num_params() const {
  const double h = (double)hidden, q = (double)(heads * head_dim), kv = (double)(kv_heads * head_dim);
  const double per_layer = h * q            // q_proj
                           + 2.0 * h * kv   // k_proj, v_proj
                           + q * h          // o_proj
                           + 3.0 * h * (double)intermediate  // gate, up, down
                           + 2.0 * h        // input / post-attention RMSNorm
                           + (qk_norm ? 2.0 * (double)head_dim : 0.0);
  const double embed = (double)vocab * h;
  return embed + (tied ? 0.0 : embed) + (double)layers * per_layer + h /* final norm */;
}

SimShape shape_by_name(const std::string& name) {
  SimShape s;
  s.name = name;
  if (name == "llama-3.1-8b") {
    // meta-llama/Llama-3.1-8B config.json
    s.hidden = 4096; s.layers = 32; s.heads = 32; s.kv_heads = 8; s.head_dim = 128;
    s.intermediate = 14336; s.vocab = 128256; s.tied = false; s.qk_norm = false;
  } else if (name == "qwen3-0.6b") {
    // Qwen/Qwen3-0.6B config.json
    s.hidden = 1024; s.layers = 28; s.heads = 16; s.kv_heads = 8; s.head_dim = 128;
    s.intermediate = 3072; s.vocab = 151936; s.tied = true; s.qk_norm = true;
  } else {
    throw std::invalid_argument("--sim-shape must be llama-3.1-8b, qwen3-0.6b or config, got \"" + name + "\"");
  }
  return s;
}

SimShape shape_from_config(const ModelConfig& c) {
  SimShape s;
  s.name = "config";
  s.hidden = c.hidden_size; s.layers = c.num_layers; s.heads = c.num_heads; s.kv_heads = c.num_kv_heads;
  s.head_dim = c.head_dim; s.intermediate = c.intermediate_size; s.vocab = c.vocab_size;
  s.tied = c.tie_word_embeddings; s.qk_norm = c.qk_norm;
  return s;
}

StepCost model_step(const SimParams& p, const std::vector<BatchSeq>& seqs) {
  const SimShape& s = p.shape;
  const double kv_tok = s.kv_bytes_per_token();
  double tokens = 0, ctx = 0, keys = 0;
  for (const BatchSeq& b : seqs) {
    const double n = (double)b.num_tokens, st = (double)b.start_pos;
    tokens += n;
    ctx += st + n;
    keys += n * st + n * (n + 1) / 2;
  }
  StepCost c;
  const double params = s.num_params();
  c.bytes = 2.0 * params + ctx * kv_tok + tokens * kv_tok;
  c.flops = 2.0 * params * tokens + 4.0 * (double)(s.layers * s.heads * s.head_dim) * keys;
  c.memory_s = c.bytes / (p.bandwidth_gbps * 1e9 * p.bw_efficiency);
  c.compute_s = c.flops / (p.tflops * 1e12 * p.flops_efficiency);
  c.seconds = std::max(c.memory_s, c.compute_s) + p.overhead_us * 1e-6;
  return c;
}

int64_t default_num_blocks(const SimShape& shape, double memory_bytes, double utilisation) {
  const double free_bytes = memory_bytes * utilisation - shape.weight_bytes();
  if (free_bytes <= 0) return 0;
  return (int64_t)(free_bytes / ((double)kBlockSize * shape.kv_bytes_per_token()));
}

// `dir`/tokenizer.json parsed, or a discarded value when it is missing or not JSON.
static nlohmann::json read_tokenizer_json(const std::string& dir) {
  std::ifstream f(dir + "/tokenizer.json", std::ios::binary);
  if (!f) return nlohmann::json(nlohmann::json::value_t::discarded);
  std::stringstream ss;
  ss << f.rdbuf();
  return nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
}

int64_t first_added_token_id(const std::string& dir) {
  const auto j = read_tokenizer_json(dir);
  if (!j.is_object() || !j.contains("added_tokens") || !j["added_tokens"].is_array()) return -1;
  int64_t lo = -1;
  for (const auto& t : j["added_tokens"]) {
    if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer()) continue;
    const int64_t id = t["id"].get<int64_t>();
    if (id >= 0 && (lo < 0 || id < lo)) lo = id;
  }
  return lo;
}

std::vector<int32_t> text_token_ids(const std::string& dir, int64_t limit) {
  std::vector<int32_t> ids;
  const auto j = read_tokenizer_json(dir);
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object() || !j["model"].contains("vocab") ||
      !j["model"]["vocab"].is_object())
    return ids;
  for (const auto& [text, id] : j["model"]["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || (limit > 0 && id.get<int64_t>() >= limit)) continue;
    // "Ġ" (U+0120, UTF-8 C4 A0) is the byte-level alphabet's space; other ASCII 0x21-0x7E stand for themselves.
    size_t i = text.rfind("\xC4\xA0", 0) == 0 ? 2 : 0;
    if (i == text.size()) continue;
    bool printable = true;
    for (; i < text.size() && printable; i++) printable = text[i] >= 0x21 && text[i] <= 0x7E;
    if (printable) ids.push_back((int32_t)id.get<int64_t>());
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

int32_t sim_token(uint64_t seed, uint64_t pos, int64_t limit, double eos_prob,
                  const std::vector<int64_t>& eos_ids) {
  const uint64_t h = splitmix64(seed ^ (0x9E3779B97F4A7C15ull * (pos + 1)));
  const double u = (double)(h >> 11) * 0x1.0p-53;  // = sampling_uniform(seed, pos)
  if (!eos_ids.empty() && u < eos_prob) return (int32_t)eos_ids[0];
  int64_t t = (int64_t)(splitmix64(h) % (uint64_t)limit);
  // Step past eos ids inside the ordinary range (at most eos_ids.size() + 1 tries each way).
  for (size_t tries = 0; tries <= eos_ids.size(); tries++) {
    if (std::find(eos_ids.begin(), eos_ids.end(), t) == eos_ids.end()) break;
    t = (t + 1) % limit;
  }
  return (int32_t)t;
}

void sleep_until_precise(std::chrono::steady_clock::time_point start, double seconds) {
  using clock = std::chrono::steady_clock;
  if (!(seconds > 0)) return;
  const auto deadline = start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(seconds));
  const auto coarse = deadline - std::chrono::microseconds(100);
  if (clock::now() < coarse) std::this_thread::sleep_until(coarse);
  while (clock::now() < deadline) {
  }
}

SimBackend::SimBackend(const ModelConfig& cfg, SimParams params, int64_t num_blocks, int64_t max_batch_tokens)
    : vocab_(cfg.vocab_size),
      hidden_(cfg.hidden_size),
      eos_ids_(cfg.eos_token_ids),
      p_(std::move(params)),
      num_blocks_(num_blocks),
      max_batch_tokens_(max_batch_tokens) {
  ENGINE_CHECK(vocab_ > 0 && hidden_ > 0, "internal", "sim: config needs vocab_size and hidden_size > 0");
  ENGINE_CHECK(num_blocks_ > 0, "internal", "sim: num_blocks must be > 0 (the shape's weights fill the memory?)");
  ENGINE_CHECK(max_batch_tokens_ > 0, "internal", "sim: max_batch_tokens must be > 0");
  limit_ = p_.max_token_id > 0 ? std::min(vocab_, p_.max_token_id) : vocab_;
  // An eos id outside the vocabulary could not be returned as a token.
  eos_ids_.erase(std::remove_if(eos_ids_.begin(), eos_ids_.end(), [&](int64_t e) { return e < 0 || e >= vocab_; }),
                 eos_ids_.end());
}

int32_t SimBackend::token(uint64_t seed, uint64_t pos) const {
  const int32_t t = sim_token(seed, pos, limit_, p_.eos_prob, eos_ids_);
  if (p_.text_ids.empty() || std::find(eos_ids_.begin(), eos_ids_.end(), t) != eos_ids_.end()) return t;
  return p_.text_ids[(size_t)t % p_.text_ids.size()];
}

size_t SimBackend::kv_cache_bytes() const {
  return (size_t)num_blocks_ * (size_t)kBlockSize * (size_t)p_.shape.kv_bytes_per_token();
}

void SimBackend::wait(std::chrono::steady_clock::time_point start, const std::vector<BatchSeq>& seqs) const {
  if (p_.time_scale <= 0) return;
  sleep_until_precise(start, model_step(p_, seqs).seconds * p_.time_scale);
}

bool SimBackend::forward_sample(const std::vector<BatchSeq>& seqs, const std::vector<DeviceSample>& samples,
                                int32_t* tokens_out, float* logprobs_out) {
  const auto start = std::chrono::steady_clock::now();
  for (size_t r = 0; r < samples.size(); r++) {
    const DeviceSample& s = samples[r];
    const uint64_t seed = s.params.temperature == 0.0 ? 0 : s.params.seed;
    tokens_out[r] = token(seed, s.pos);
    logprobs_out[r] = -1.0f;
  }
  wait(start, seqs);
  return true;
}

void SimBackend::forward(const std::vector<BatchSeq>& seqs, float* hidden_out) {
  const auto start = std::chrono::steady_clock::now();
  int64_t row = 0;
  for (const BatchSeq& b : seqs) {
    if (!b.need_output) continue;
    float* h = hidden_out + row * hidden_;
    std::fill(h, h + hidden_, 0.0f);
    h[0] = (float)token(0, (uint64_t)(b.start_pos + b.num_tokens));
    row++;
  }
  wait(start, seqs);
}

void SimBackend::lm_head(const float* hidden, int64_t rows, float* logits) {
  for (int64_t r = 0; r < rows; r++) {
    float* l = logits + r * vocab_;
    std::fill(l, l + vocab_, 0.0f);
    const int64_t t = (int64_t)hidden[r * hidden_];
    if (t >= 0 && t < vocab_) l[t] = 30.0f;
  }
}

}  // namespace sim
}  // namespace engine
