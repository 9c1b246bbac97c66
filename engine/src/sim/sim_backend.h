// sim_backend.h — `--device sim`: a Backend that does no arithmetic. Each forward pass
// sleeps the step time a roofline model predicts for a real GPU, then returns deterministic
// pseudo-random token ids. The Engine on top of it is the same as for the CPU backend, so
// validation, sequence state and replies follow PROTOCOL.md exactly; only the numbers the
// model would compute are made up. Used to load-test the runtime at GPU speed without a GPU.
//
// Timing model, per forward pass (one Engine chunk) with T tokens from S sequences, sequence
// i carrying n_i tokens at positions s_i .. s_i + n_i - 1 (context c_i = s_i + n_i):
//
//   bytes = 2·P                          weights, bf16, each read once per pass (incl. the
//                                        embedding and LM head: a slight over-estimate)
//         + Σ_i c_i · kv_tok             KV cache read by attention (each seq's context once)
//         + T · kv_tok                   KV cache written for the new tokens
//   flops = 2·P·T                        every token through every weight (a multiply-add is
//                                        2 flops; also counts the embedding/LM head per token)
//         + 4·L·H·D · Σ_i A_i            attention: QK^T and PV, 2 flops each per (query, key,
//                                        head, dim), A_i = Σ_{p=s_i}^{s_i+n_i-1} (p+1) =
//                                        n_i·s_i + n_i(n_i+1)/2 keys seen (causal)
//   t = max(bytes / (BW · eff_bw), flops / (F · eff_f)) + overhead,   then × time_scale
//
// where P = parameter count of the modelled shape, kv_tok = 2 (K,V) · L · KV · D · 2 bytes,
// L = layers, H = query heads, KV = kv heads, D = head_dim.
//
// Defaults (flags change them; see engine/README.md "sim device"):
//   BW = 3350 GB/s, F = 989 TFLOP/s: H100 SXM5 peak HBM3 bandwidth and dense BF16 tensor
//     throughput (NVIDIA H100 Tensor Core GPU datasheet);
//   eff_bw = 0.8, eff_f = 0.6, overhead = 250 µs: ASSUMPTIONS (typical achieved fractions of
//     peak for decode GEMV/attention and large GEMMs; per-step launch + host cost with CUDA
//     graphs), not measurements;
//   shape = Llama-3.1-8B (hidden 4096, 32 layers, 32 heads, 8 kv heads, head_dim 128,
//     intermediate 14336, vocab 128256, untied): P = 8,030,261,248, kv_tok = 131072 bytes.
//
// Tokens: with h = splitmix64(seed ^ (0x9E3779B97F4A7C15 · (pos + 1))) (the PROTOCOL.md
// draw; seed = 0 for greedy), the token is EOS (the first eos id) when
// (h >> 11)·2^-53 < eos_prob, else splitmix64(h) mod max_token_id, stepped past any eos id.
// It depends on (seed, pos) only: same seed, same tokens, whatever the batch. logprob = -1.
//
// Host path (forward + lm_head, used only for steps with return_logits): forward() sleeps the
// same modelled time and writes a hidden row of zeros except hidden[0] = the greedy (seed 0)
// token id as a float; lm_head() turns it into a logits row of zeros with 30 at that id, so
// the host sampler's greedy pick equals the device path's (other temperatures pick that same
// id with probability ~1 - V·e^-30/T, whatever the seed).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "config.h"
#include "model.h"

namespace engine {
namespace sim {

// The transformer shape whose cost is modelled (independent of --model's config.json, which
// only provides vocab / eos ids / max positions to the protocol).
struct SimShape {
  std::string name;
  int64_t hidden = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0, vocab = 0;
  bool tied = false;    // tied embeddings: no separate LM head weights
  bool qk_norm = false; // per-head q/k RMSNorm weights (Qwen3)

  double num_params() const;
  double weight_bytes() const { return 2.0 * num_params(); }  // bf16
  double kv_bytes_per_token() const { return 2.0 * (double)layers * (double)kv_heads * (double)head_dim * 2.0; }
};

// "llama-3.1-8b" | "qwen3-0.6b"; throws std::invalid_argument otherwise.
SimShape shape_by_name(const std::string& name);
// The shape of a config.json (`--sim-shape config`), modelled in bf16.
SimShape shape_from_config(const ModelConfig& cfg);

struct SimParams {
  SimShape shape = shape_by_name("llama-3.1-8b");
  double bandwidth_gbps = 3350;   // GB/s (1e9 bytes/s)
  double tflops = 989;            // dense bf16 TFLOP/s
  double bw_efficiency = 0.8;
  double flops_efficiency = 0.6;
  double overhead_us = 250;
  double time_scale = 1.0;        // multiplies the modelled time; 0 = never sleep
  double eos_prob = 0.0;          // per sampled token
  int64_t max_token_id = 0;       // sampled ids are < this (and < vocab); 0 = vocab
  // When not empty, an ordinary sampled id is one of these (text_token_ids): its text is whole
  // characters, so a reply decodes exactly and re-encodes to the same ids, as a real model's
  // mostly does (random byte-level ids split UTF-8 characters, which a prompt cannot repeat).
  std::vector<int32_t> text_ids;
};

struct StepCost {
  double bytes = 0, flops = 0;
  double memory_s = 0, compute_s = 0;  // bytes / effective BW, flops / effective FLOP/s
  double seconds = 0;                  // max(memory_s, compute_s) + overhead (unscaled)
  bool compute_bound() const { return compute_s > memory_s; }
};

// The model above for one forward pass over `seqs`.
StepCost model_step(const SimParams& p, const std::vector<BatchSeq>& seqs);

// KV blocks (16 tokens) of the shape that fit in `memory_bytes` · utilisation after the bf16
// weights: floor((memory_bytes · util − 2·P) / (16 · kv_tok)); 0 when nothing fits.
int64_t default_num_blocks(const SimShape& shape, double memory_bytes, double utilisation = 0.9);

// The lowest id among tokenizer.json's "added_tokens" in DIR (special / control tokens sit
// there: 151643 for Qwen, 128000 for Llama 3), or -1 when the file or the list is absent.
int64_t first_added_token_id(const std::string& dir);

// Ids below `limit` of a byte-level BPE tokenizer.json (GPT-2's byte-to-unicode alphabet)
// whose text is printable ASCII, optionally after one leading space (`Ġ`); sorted. Empty
// when there is no such file or vocabulary.
std::vector<int32_t> text_token_ids(const std::string& dir, int64_t limit);

// The token for (seed, pos): see the header comment. `limit` = exclusive bound on ordinary ids.
int32_t sim_token(uint64_t seed, uint64_t pos, int64_t limit, double eos_prob,
                  const std::vector<int64_t>& eos_ids);

// Sleeps until `start + seconds`: sleep_until for all but the last ~100 µs, then spins.
void sleep_until_precise(std::chrono::steady_clock::time_point start, double seconds);

class SimBackend : public Backend {
 public:
  // cfg: the --model config (vocab, eos ids, hidden size of the host path's hidden rows).
  SimBackend(const ModelConfig& cfg, SimParams params, int64_t num_blocks, int64_t max_batch_tokens);

  int64_t max_batch_tokens() const override { return max_batch_tokens_; }
  int64_t num_blocks() const override { return num_blocks_; }
  size_t kv_cache_bytes() const override;  // modelled (bf16 blocks of the shape), none allocated
  void forward(const std::vector<BatchSeq>& seqs, float* hidden_out) override;
  void lm_head(const float* hidden, int64_t rows, float* logits) override;
  bool forward_sample(const std::vector<BatchSeq>& seqs, const std::vector<DeviceSample>& samples,
                      int32_t* tokens_out, float* logprobs_out) override;

  const SimParams& params() const { return p_; }
  int64_t token_limit() const { return limit_; }
  // The token sampled at `pos` under `seed` (0: greedy): sim_token, mapped onto the text ids.
  int32_t token(uint64_t seed, uint64_t pos) const;

 private:
  void wait(std::chrono::steady_clock::time_point start, const std::vector<BatchSeq>& seqs) const;
  int64_t vocab_, hidden_;
  std::vector<int64_t> eos_ids_;
  SimParams p_;
  int64_t num_blocks_, max_batch_tokens_, limit_;
};

}  // namespace sim
}  // namespace engine
