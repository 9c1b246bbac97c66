// engine.h — the request semantics of PROTOCOL.md on top of a Backend: live sequence
// state, whole-step validation before any mutation, batching, sampling, release.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "model.h"
#include "protocol.h"
#include "sampler.h"
#include "sequence.h"

namespace engine {

class Engine {
 public:
  // max_pos: effective max_position_embeddings (config value, capped by --max-model-len).
  Engine(ModelConfig cfg, std::unique_ptr<Backend> backend, std::string dtype, std::string device,
         int64_t max_pos);

  InfoReply info() const;
  HealthReply health() const;
  // Validates the whole step (throws EngineError with the PROTOCOL.md code, changing
  // nothing), then runs it. Steps larger than the backend's max_batch_tokens are split into
  // several forward passes transparently.
  StepReply step(const Request& req);
  ReleaseReply release(const std::vector<uint64_t>& seq_ids);
  // The embedding of `tokens` (PROTOCOL.md, embed): a forward pass over them in the KV blocks
  // reserved for it (no sequence's), changing no sequence. Throws token_out_of_range (empty,
  // or an id >= vocab_size) or position_out_of_range (longer than max_embed_tokens()).
  EmbedReply embed(const std::vector<int64_t>& tokens);
  // Longest sequence `embed` takes: the reserved blocks' positions, within max_pos.
  int64_t max_embed_tokens() const;

  const ModelConfig& config() const { return cfg_; }
  int64_t max_pos() const { return max_pos_; }

 private:
  // A validated step entry: the sequence's state as it will be after the step.
  struct Planned {
    const StepSeqRequest* req;
    SequenceState next;
    std::vector<int32_t> tokens;
    bool need_logits;
  };
  std::vector<Planned> validate_step(const Request& req) const;
  void commit(const Request& req, std::vector<Planned>& plan);

  ModelConfig cfg_;
  std::unique_ptr<Backend> backend_;
  std::string dtype_, device_;
  int64_t max_pos_;
  // KV blocks the engine keeps for `embed` (the last ones of the backend's); the client's
  // sequences use ids [0, num_usable_blocks_), as `info` reports.
  int64_t num_embed_blocks_ = 0;
  int64_t num_usable_blocks_ = 0;
  std::unordered_map<uint64_t, SequenceState> seqs_;
  std::vector<Sampler> samplers_;  // one per OpenMP thread (scratch buffers)
  uint64_t num_steps_ = 0;
  std::chrono::steady_clock::time_point start_;
  std::vector<float> hidden_;   // [n_out, hidden] final hidden states of a step
  std::vector<float> logits_;   // [kLogitRows, vocab] scratch for the LM head
};

}  // namespace engine
