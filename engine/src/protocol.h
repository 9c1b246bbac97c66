// protocol.h — PROTOCOL.md v1 messages: decode msgpack request frames into structs and
// encode reply structs into msgpack frames.
//
// decode_request checks *types and shapes* only (a wrong type is `bad_message`); the
// state-dependent rules of a step (unknown sequence, block range, ...) are checked by the
// Engine, which knows the state. Lenient on representation, strict on meaning:
//   - integers may arrive in any msgpack int width; a float64 holding an exact integer is
//     accepted as one (msgpackr encodes JS numbers beyond 32 bits as float64);
//   - floats (temperature, top_p) may be float32, float64 or any integer;
//   - an optional field that is nil, or msgpackr's `undefined` (fixext1 type 0), is absent;
//   - unknown keys are ignored.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "config.h"
#include "sampler.h"

namespace engine {

constexpr int kProtocolVersion = 1;

// One entry of step.seqs. Integer fields keep their sign/size so that the Engine can report
// the precise rule a value breaks (e.g. a negative token is token_out_of_range).
struct StepSeqRequest {
  uint64_t seq_id = 0;
  std::vector<int64_t> tokens;      // values > INT64_MAX are clamped to INT64_MAX
  int64_t start_pos = 0;            // clamped likewise
  bool has_block_table = false;
  std::vector<int64_t> block_table;
  bool has_new_blocks = false;
  std::vector<int64_t> new_blocks;
  bool has_sampling = false;
  SamplingParams sampling;          // absent fields keep SamplingParams' defaults
  int64_t top_k_raw = 0;            // top_k as sent (may be negative: invalid_sampling)
  bool seed_negative = false;       // seed sent negative: invalid_sampling
  bool sample = true;
  bool logprobs = false;
  bool return_logits = false;
};

struct Request {
  uint64_t req_id = 0;
  std::string type;                 // "info" | "health" | "step" | "release" | "embed"
  std::vector<uint64_t> release;    // step.release
  bool packed_outputs = false;      // step.packed_outputs: sampled tokens as two bins
  std::vector<StepSeqRequest> seqs;  // step.seqs
  std::vector<uint64_t> seq_ids;    // release.seq_ids
  std::vector<int64_t> tokens;      // embed.tokens
};

// Decodes one frame. *req_id is set as soon as it is known (0 before), so the caller can
// address the error reply. Throws EngineError with code bad_message, unsupported_version or
// unknown_type.
Request decode_request(const char* data, size_t len, uint64_t* req_id);

struct InfoReply {
  const ModelConfig* cfg = nullptr;
  std::string dtype;                // "f32" | "f16" | "bf16"
  std::string device;               // "cpu" | "cuda:N" | "sim"
  int64_t max_position_embeddings = 0;  // effective limit (config, capped by --max-model-len)
  uint64_t num_blocks = 0, kv_cache_bytes = 0, num_active_seqs = 0, num_used_blocks = 0;
};

struct HealthReply {
  double uptime_ms = 0;
  uint64_t num_steps = 0;
};

struct StepOutput {
  uint64_t seq_id = 0;
  bool has_token = false;
  int32_t token = 0;
  bool has_logprob = false;
  double logprob = 0;
  bool has_logits = false;
  std::vector<float> logits;        // [vocab], sent as bin of f32 little-endian
};

struct StepReply {
  std::vector<StepOutput> outputs;
  double forward_ms = 0, sample_ms = 0, total_ms = 0;
  uint64_t num_tokens = 0;
};

struct ReleaseReply {
  std::vector<uint64_t> released, unknown;
};

std::string encode_info(uint64_t req_id, const InfoReply& r);
std::string encode_health(uint64_t req_id, const HealthReply& r);
// `packed`: token-only outputs go to the `packed` bins (the request's packed_outputs).
std::string encode_step(uint64_t req_id, const StepReply& r, bool packed = false);
std::string encode_release(uint64_t req_id, const ReleaseReply& r);

// The embedding of a token sequence: its last token's final (RMS-normed) hidden state,
// L2-normalised (last-token pooling, as Qwen3-Embedding).
struct EmbedReply {
  std::vector<float> embedding;  // [hidden_size], unit norm (all zeros if the state is zero)
  double forward_ms = 0;
};

std::string encode_embed(uint64_t req_id, const EmbedReply& r);
std::string encode_error(uint64_t req_id, const std::string& code, const std::string& message);

}  // namespace engine
