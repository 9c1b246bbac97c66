// engine.cpp — see engine.h.
#include "engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <unordered_set>

#include <omp.h>

#include "common.h"
#include "kv_cache.h"

namespace engine {

namespace {
// LM-head rows computed per GEMM: bounds the logits scratch to kLogitRows * vocab floats
// (~39 MB for a 152k vocabulary) whatever the number of sequences in a step. Each GEMM reads
// the whole LM-head weight (39 MB in f32 for the tiny model, 622 MB for Qwen3-0.6B), so a
// step with 64 sequences read it four times at 16 rows: the CPU pool's 64-sequence decode step
// went from 29.5 to 15.8 ms with 64 (tiny model, 2 threads).
constexpr int64_t kLogitRows = 64;
// KV blocks reserved for `embed` (512 positions), when the backend has 4x as many.
constexpr int64_t kEmbedBlocks = 32;

double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}
}  // namespace

Engine::Engine(ModelConfig cfg, std::unique_ptr<Backend> backend, std::string dtype,
               std::string device, int64_t max_pos)
    : cfg_(std::move(cfg)),
      backend_(std::move(backend)),
      dtype_(std::move(dtype)),
      device_(std::move(device)),
      max_pos_(max_pos),
      start_(std::chrono::steady_clock::now()) {
  logits_.resize((size_t)(kLogitRows * cfg_.vocab_size));
  samplers_.resize((size_t)omp_get_max_threads());
  num_embed_blocks_ = backend_->num_blocks() >= 4 * kEmbedBlocks ? kEmbedBlocks : 0;
  num_usable_blocks_ = backend_->num_blocks() - num_embed_blocks_;
}

int64_t Engine::max_embed_tokens() const { return std::min(num_embed_blocks_ * kBlockSize, max_pos_); }

EmbedReply Engine::embed(const std::vector<int64_t>& tokens) {
  const int64_t n = (int64_t)tokens.size();
  ENGINE_CHECK(n > 0, "token_out_of_range", "embed: tokens is empty");
  ENGINE_CHECK(n <= max_embed_tokens(), "position_out_of_range",
               "embed: " << n << " tokens exceed the " << max_embed_tokens() << " an embedding may have");
  for (int64_t t : tokens)
    ENGINE_CHECK(t >= 0 && t < cfg_.vocab_size, "token_out_of_range",
                 "embed: token id " << t << " is not in [0, " << cfg_.vocab_size << ")");
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> ids(tokens.begin(), tokens.end());
  std::vector<int32_t> table((size_t)num_embed_blocks_);
  for (int64_t i = 0; i < num_embed_blocks_; i++) table[(size_t)i] = (int32_t)(num_usable_blocks_ + i);
  const int64_t hid = cfg_.hidden_size;
  std::vector<float> hidden((size_t)hid, 0.f);
  const int64_t cap = backend_->max_batch_tokens();
  for (int64_t done = 0; done < n;) {
    const int64_t take = std::min(cap, n - done);
    BatchSeq b;
    b.tokens = ids.data() + done;
    b.num_tokens = take;
    b.start_pos = done;
    b.block_table = table.data();
    b.block_table_len = (int64_t)table.size();
    b.need_output = done + take == n;
    backend_->forward({b}, hidden.data());
    done += take;
  }
  double norm = 0;
  for (float x : hidden) norm += (double)x * x;
  EmbedReply r;
  r.embedding.resize((size_t)hid, 0.f);
  if (norm > 0) {
    const double inv = 1.0 / std::sqrt(norm);
    for (int64_t i = 0; i < hid; i++) r.embedding[(size_t)i] = (float)(hidden[(size_t)i] * inv);
  }
  r.forward_ms = ms_since(t0);
  return r;
}

InfoReply Engine::info() const {
  InfoReply r;
  r.cfg = &cfg_;
  r.dtype = dtype_;
  r.device = device_;
  r.max_position_embeddings = max_pos_;
  r.num_blocks = (uint64_t)num_usable_blocks_;
  r.kv_cache_bytes = backend_->kv_cache_bytes();
  r.num_active_seqs = seqs_.size();
  std::vector<char> used((size_t)backend_->num_blocks(), 0);
  for (const auto& kv : seqs_)
    for (int32_t b : kv.second.block_table) used[b] = 1;
  r.num_used_blocks = (uint64_t)std::count(used.begin(), used.end(), 1);
  return r;
}

HealthReply Engine::health() const { return {ms_since(start_), num_steps_}; }

ReleaseReply Engine::release(const std::vector<uint64_t>& ids) {
  ReleaseReply r;
  for (uint64_t id : ids) {
    if (seqs_.erase(id)) r.released.push_back(id);
    else r.unknown.push_back(id);
  }
  return r;
}

std::vector<Engine::Planned> Engine::validate_step(const Request& req) const {
  const std::unordered_set<uint64_t> released(req.release.begin(), req.release.end());
  std::unordered_set<uint64_t> seen;
  for (const auto& s : req.seqs)
    ENGINE_CHECK(seen.insert(s.seq_id).second, "duplicate_sequence",
                 "seq_id " << s.seq_id << " appears twice in seqs");

  const int64_t num_blocks = num_usable_blocks_;
  std::vector<Planned> plan;
  plan.reserve(req.seqs.size());
  for (const auto& s : req.seqs) {
    const uint64_t id = s.seq_id;
    auto it = seqs_.find(id);
    // A sequence listed in `release` is dropped first, so here it counts as new.
    const SequenceState* known = (it != seqs_.end() && !released.count(id)) ? &it->second : nullptr;
    ENGINE_CHECK(known || (s.has_block_table && s.has_sampling), "unknown_sequence",
                 "seq_id " << id << " is not live; a new sequence needs block_table and sampling");
    ENGINE_CHECK(!known || s.start_pos == known->num_computed_tokens, "position_mismatch",
                 "seq_id " << id << ": start_pos " << s.start_pos << " but the engine has "
                           << (known ? known->num_computed_tokens : 0) << " computed tokens");
    const int64_t n = (int64_t)s.tokens.size();
    ENGINE_CHECK(s.start_pos >= 0 && s.start_pos <= max_pos_ - n, "position_out_of_range",
                 "seq_id " << id << ": start_pos " << s.start_pos << " + " << n
                           << " tokens exceeds max_position_embeddings " << max_pos_);
    std::vector<int64_t> table;
    if (s.has_block_table) table = s.block_table;
    else table.assign(known->block_table.begin(), known->block_table.end());
    if (s.has_new_blocks) table.insert(table.end(), s.new_blocks.begin(), s.new_blocks.end());
    for (int64_t b : table)
      ENGINE_CHECK(b >= 0 && b < num_blocks, "block_out_of_range",
                   "seq_id " << id << ": block id " << b << " is not in [0, " << num_blocks << ")");
    const int64_t need = (s.start_pos + n + kBlockSize - 1) / kBlockSize;
    ENGINE_CHECK((int64_t)table.size() >= need, "block_table_too_short",
                 "seq_id " << id << ": " << table.size() << " blocks cannot hold "
                           << s.start_pos + n << " positions (need " << need << ")");
    ENGINE_CHECK(n > 0, "token_out_of_range", "seq_id " << id << ": tokens is empty");
    for (int64_t t : s.tokens)
      ENGINE_CHECK(t >= 0 && t < cfg_.vocab_size, "token_out_of_range",
                   "seq_id " << id << ": token " << t << " is not in [0, " << cfg_.vocab_size << ")");
    if (s.has_sampling) {
      const SamplingParams& p = s.sampling;
      ENGINE_CHECK(std::isfinite(p.temperature) && p.temperature >= 0, "invalid_sampling",
                   "seq_id " << id << ": temperature must be >= 0, got " << p.temperature);
      ENGINE_CHECK(p.top_p > 0 && p.top_p <= 1, "invalid_sampling",
                   "seq_id " << id << ": top_p must be in (0, 1], got " << p.top_p);
      ENGINE_CHECK(s.top_k_raw >= 0, "invalid_sampling",
                   "seq_id " << id << ": top_k must be >= 0, got " << s.top_k_raw);
      ENGINE_CHECK(!s.seed_negative, "invalid_sampling", "seq_id " << id << ": seed must be >= 0");
    }

    Planned p;
    p.req = &s;
    p.next.seq_id = id;
    p.next.block_table.assign(table.begin(), table.end());
    p.next.sampling = s.has_sampling ? s.sampling : known->sampling;
    p.next.num_computed_tokens = s.start_pos + n;
    p.tokens.assign(s.tokens.begin(), s.tokens.end());
    p.need_logits = s.sample || s.return_logits;
    plan.push_back(std::move(p));
  }
  return plan;
}

// Drops released sequences, then stores the new states.
void Engine::commit(const Request& req, std::vector<Planned>& plan) {
  for (uint64_t id : req.release) seqs_.erase(id);
  for (Planned& p : plan) seqs_[p.next.seq_id] = std::move(p.next);
  num_steps_++;
}

StepReply Engine::step(const Request& req) {
  const auto t_start = std::chrono::steady_clock::now();
  std::vector<Planned> plan = validate_step(req);  // throws; nothing mutated yet

  // Forward, split into chunks of at most max_batch_tokens tokens. A sequence may straddle
  // chunks: its later slice sees the earlier slice's K/V, already in the cache.
  const auto t_fwd = std::chrono::steady_clock::now();
  const int64_t cap = backend_->max_batch_tokens(), hid = cfg_.hidden_size;
  int64_t n_out = 0, num_tokens = 0;
  for (const Planned& p : plan) { n_out += p.need_logits; num_tokens += (int64_t)p.tokens.size(); }
  hidden_.resize((size_t)(n_out * hid));
  // Device sampling (Backend::forward_sample) unless someone wants the logits themselves.
  bool device_path = true;
  for (const Planned& p : plan) device_path = device_path && !p.req->return_logits;
  std::vector<int32_t> dev_tokens;
  std::vector<float> dev_logprobs;
  std::vector<Backend::DeviceSample> dev_samples;
  std::vector<size_t> out_plan;  // plan index of each output row, in order
  if (device_path) {
    dev_tokens.resize((size_t)n_out);
    dev_logprobs.resize((size_t)n_out);
  }
  std::vector<BatchSeq> chunk;
  int64_t in_chunk = 0, out_row = 0, chunk_out_row = 0;
  auto flush = [&]() {
    if (chunk.empty()) return;
    if (device_path) {
      device_path = backend_->forward_sample(chunk, dev_samples, dev_tokens.data() + chunk_out_row,
                                             dev_logprobs.data() + chunk_out_row);
      // A backend that declines does so on its first call, before any chunk ran.
      ENGINE_CHECK(device_path || chunk_out_row == 0, "internal", "backend declined forward_sample mid-step");
      if (!device_path) backend_->forward(chunk, hidden_.data() + chunk_out_row * hid);
    } else {
      backend_->forward(chunk, hidden_.data() + chunk_out_row * hid);
    }
    chunk.clear();
    dev_samples.clear();
    in_chunk = 0;
    chunk_out_row = out_row;
  };
  for (const Planned& p : plan) {
    int64_t done = 0, n = (int64_t)p.tokens.size();
    while (done < n) {
      if (in_chunk == cap) flush();
      const int64_t take = std::min(n - done, cap - in_chunk);
      BatchSeq b;
      b.tokens = p.tokens.data() + done;
      b.num_tokens = take;
      b.start_pos = p.req->start_pos + done;
      b.block_table = p.next.block_table.data();
      b.block_table_len = (int64_t)p.next.block_table.size();
      b.need_output = p.need_logits && done + take == n;
      chunk.push_back(b);
      if (b.need_output) {
        dev_samples.push_back({p.next.sampling, (uint64_t)p.next.num_computed_tokens, p.req->logprobs});
        out_plan.push_back((size_t)(&p - plan.data()));
      }
      in_chunk += take;
      done += take;
      out_row += b.need_output;
    }
  }
  flush();
  double forward_ms = ms_since(t_fwd);

  if (device_path) {
    StepReply reply;
    reply.outputs.resize(plan.size());
    for (size_t i = 0; i < plan.size(); i++) reply.outputs[i].seq_id = plan[i].next.seq_id;
    for (size_t r = 0; r < out_plan.size(); r++) {
      const Planned& p = plan[out_plan[r]];
      StepOutput& o = reply.outputs[out_plan[r]];
      if (!p.req->sample) continue;
      o.has_token = true;
      o.token = dev_tokens[r];
      if (p.req->logprobs) { o.has_logprob = true; o.logprob = dev_logprobs[r]; }
    }
    commit(req, plan);
    reply.forward_ms = forward_ms;
    reply.sample_ms = 0;
    reply.num_tokens = (uint64_t)num_tokens;
    reply.total_ms = ms_since(t_start);
    return reply;
  }

  // LM head in groups of kLogitRows rows, then sample the group's rows in parallel (each
  // row is independent and draws from (seed, position) only, so threads do not change
  // results).
  StepReply reply;
  reply.outputs.resize(plan.size());
  std::vector<size_t> row_plan;  // plan index of each logits row, in order
  for (size_t i = 0; i < plan.size(); i++) {
    reply.outputs[i].seq_id = plan[i].next.seq_id;
    if (plan[i].need_logits) row_plan.push_back(i);
  }
  double sample_ms = 0;
  const int64_t V = cfg_.vocab_size;
  for (int64_t r0 = 0; r0 < n_out; r0 += kLogitRows) {
    const int64_t rows = std::min(kLogitRows, n_out - r0);
    const auto t_head = std::chrono::steady_clock::now();
    backend_->lm_head(hidden_.data() + r0 * hid, rows, logits_.data());
    forward_ms += ms_since(t_head);
    const auto t_sample = std::chrono::steady_clock::now();
#pragma omp parallel for schedule(dynamic, 1) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
      const Planned& p = plan[row_plan[r0 + r]];
      StepOutput& o = reply.outputs[row_plan[r0 + r]];
      const float* row = logits_.data() + r * V;
      if (p.req->sample) {
        Sampler& sampler = samplers_[omp_get_thread_num()];
        const SampleResult s = sampler.sample(row, V, p.next.sampling, (uint64_t)p.next.num_computed_tokens,
                                              p.req->logprobs);
        o.has_token = true;
        o.token = s.token;
        if (p.req->logprobs) { o.has_logprob = true; o.logprob = s.logprob; }
      }
      if (p.req->return_logits) { o.has_logits = true; o.logits.assign(row, row + V); }
    }
    sample_ms += ms_since(t_sample);
  }

  commit(req, plan);

  reply.forward_ms = forward_ms;
  reply.sample_ms = sample_ms;
  reply.num_tokens = (uint64_t)num_tokens;
  reply.total_ms = ms_since(t_start);
  return reply;
}

}  // namespace engine
