// test_sim.cpp — the `sim` device: the roofline step-time model (hand-checked numbers),
// deterministic tokens, the precision of the sleep, and that the Engine's protocol rules hold
// unchanged on top of the sim backend.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <unistd.h>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "options.h"
#include "server.h"
#include "sim/sim_backend.h"
#include "test.h"
#include "tiny_model.h"

using nlohmann::json;
using engine::BatchSeq;
using engine::sim::SimParams;

namespace {

// n_seqs sequences, each with `tokens` new tokens whose last context is `ctx` positions.
std::vector<BatchSeq> batch(int64_t n_seqs, int64_t tokens, int64_t ctx) {
  std::vector<BatchSeq> b((size_t)n_seqs);
  for (auto& s : b) {
    s.num_tokens = tokens;
    s.start_pos = ctx - tokens;
    s.need_output = true;
  }
  return b;
}

std::unique_ptr<engine::Engine> sim_engine(SimParams p, int64_t num_blocks = 8, int64_t max_tokens = 64) {
  auto c = test::tiny_config();  // vocab 50, eos 7, 64 positions
  auto b = std::make_unique<engine::sim::SimBackend>(c, p, num_blocks, max_tokens);
  return std::make_unique<engine::Engine>(c, std::move(b), "bf16", "sim", c.max_position_embeddings);
}

SimParams instant() {
  SimParams p;
  p.time_scale = 0;
  return p;
}

json call(engine::Engine& e, const json& req) {
  const auto bytes = json::to_msgpack(req);
  const std::string r = engine::handle_frame(e, (const char*)bytes.data(), bytes.size());
  return json::from_msgpack(r);
}

json seq(uint64_t id, json tokens, int64_t start, json table, double temperature = 1.0, uint64_t seed = 1) {
  json s = {{"seq_id", id}, {"tokens", tokens}, {"start_pos", start}};
  if (!table.is_null()) s["block_table"] = table;
  s["sampling"] = {{"temperature", temperature}, {"top_p", 1.0}, {"top_k", 0}, {"seed", seed}};
  return s;
}

json step(uint64_t req_id, json seqs) { return {{"v", 1}, {"type", "step"}, {"req_id", req_id}, {"seqs", seqs}}; }

std::string code(const json& r) { return r.value("ok", true) ? "ok" : r["error"]["code"].get<std::string>(); }

}  // namespace

TEST(sim_shapes) {
  const auto l = engine::sim::shape_by_name("llama-3.1-8b");
  CHECK(l.num_params() == 8030261248.0);  // HF Llama-3.1-8B: 8.03e9 parameters
  CHECK(l.kv_bytes_per_token() == 131072.0);
  const auto q = engine::sim::shape_by_name("qwen3-0.6b");
  CHECK_NEAR(q.num_params() - 151936.0 * 1024, 0.44e9, 0.01e9);  // "0.44B non-embedding"
  CHECK(q.kv_bytes_per_token() == 2.0 * 28 * 8 * 128 * 2);
  // 80 GB * 0.9 minus 16.06 GB of weights, in 2 MiB blocks.
  CHECK(engine::sim::default_num_blocks(l, 80e9) == 26674);
  CHECK(engine::sim::default_num_blocks(l, 10e9) == 0);
}

TEST(sim_cost_model) {
  SimParams p;  // H100 SXM, Llama-3.1-8B
  // Batch 1 decode at context 512: (16.0605e9 + 512*131072 + 131072) B / (3.35e12 * 0.8) + 0.25 ms.
  auto c = engine::sim::model_step(p, batch(1, 1, 512));
  CHECK(!c.compute_bound());
  CHECK_NEAR(c.bytes, 16127762432.0, 1.0);
  CHECK_NEAR(c.seconds, 6.268e-3, 0.01 * 6.268e-3);
  // Batch 256 decode at context 1024: 50.45e9 B -> 18.83 ms vs 4.25e12 flop -> 7.16 ms.
  c = engine::sim::model_step(p, batch(256, 1, 1024));
  CHECK(!c.compute_bound());
  CHECK_NEAR(c.memory_s, 18.83e-3, 0.01 * 18.83e-3);
  CHECK_NEAR(c.compute_s, 7.16e-3, 0.01 * 7.16e-3);
  CHECK_NEAR(c.seconds, 19.08e-3, 0.01 * 19.08e-3);
  // Prefill of 2048 tokens: 2*8.03e9*2048 + 4*32*32*128*(2048*2049/2) = 33.99e12 flop -> 57.3 ms.
  c = engine::sim::model_step(p, batch(1, 2048, 2048));
  CHECK(c.compute_bound());
  CHECK_NEAR(c.flops, 2.0 * 8030261248.0 * 2048 + 4.0 * 32 * 32 * 128 * (2048.0 * 2049 / 2), 1e3);
  CHECK_NEAR(c.seconds, 57.53e-3, 0.01 * 57.53e-3);
  // Efficiencies, peaks and overhead enter as the formula says.
  SimParams q = p;
  q.bandwidth_gbps = 3350 * 2;
  q.overhead_us = 0;
  c = engine::sim::model_step(q, batch(1, 1, 512));
  CHECK_NEAR(c.seconds, (6.268e-3 - 0.25e-3) / 2, 0.01 * 3e-3);
}

TEST(sim_tokens_deterministic) {
  const std::vector<int64_t> eos = {7};
  for (uint64_t pos = 0; pos < 200; pos++) {
    const int32_t t = engine::sim::sim_token(42, pos, 50, 0.0, eos);
    CHECK(t == engine::sim::sim_token(42, pos, 50, 0.0, eos));
    CHECK(t >= 0 && t < 50 && t != 7);
    CHECK(engine::sim::sim_token(42, pos, 50, 1.0, eos) == 7);
  }
  int differ = 0, eos_count = 0;
  for (uint64_t pos = 0; pos < 1000; pos++) {
    differ += engine::sim::sim_token(1, pos, 50, 0.0, eos) != engine::sim::sim_token(2, pos, 50, 0.0, eos);
    eos_count += engine::sim::sim_token(1, pos, 50, 0.1, eos) == 7;
  }
  CHECK(differ > 900);
  CHECK(eos_count > 60 && eos_count < 140);

  // Through the Engine: a sequence's tokens do not depend on what else is in the batch, or
  // on the chunking of its prompt; greedy ignores the seed.
  auto a = sim_engine(instant()), b = sim_engine(instant());
  json r1 = call(*a, step(1, {seq(1, {1, 2, 3}, 0, {0, 1}, 0.8, 99)}));
  json r2 = call(*b, step(1, {seq(5, {4, 5, 6, 7, 8}, 0, {2, 3}), seq(1, {9, 9, 9}, 0, {0, 1}, 0.8, 99)}));
  CHECK(code(r1) == "ok" && code(r2) == "ok");
  CHECK(r1["outputs"][0]["token"] == r2["outputs"][1]["token"]);
  for (int64_t pos = 3; pos < 20; pos++) {
    const json t1 = r1["outputs"][0]["token"], t2 = r2["outputs"][1]["token"];
    r1 = call(*a, step(2, {json{{"seq_id", 1}, {"tokens", {t1}}, {"start_pos", pos}}}));
    r2 = call(*b, step(2, {json{{"seq_id", 1}, {"tokens", {t2}}, {"start_pos", pos}},
                           json{{"seq_id", 5}, {"tokens", {1}}, {"start_pos", pos + 2}}}));
    CHECK(code(r1) == "ok" && code(r2) == "ok");
    CHECK(r1["outputs"][0]["token"] == r2["outputs"][0]["token"]);
    CHECK(r1["outputs"][0]["token"] == engine::sim::sim_token(99, (uint64_t)pos + 1, 50, 0.0, eos));
  }
  auto g = sim_engine(instant());
  json s = seq(3, {1}, 0, {0}, 0.0, 12345);
  s["logprobs"] = true;
  json r = call(*g, step(1, {s}));
  CHECK(r["outputs"][0]["token"] == engine::sim::sim_token(0, 1, 50, 0.0, eos));
  CHECK(r["outputs"][0]["logprob"] == -1.0);
}

TEST(sim_text_token_ids) {
  // A byte-level vocabulary: printable ASCII, with or without a leading space (Ġ), is text;
  // a lone space, a newline (Ċ), a piece of a UTF-8 character (Ã) and ids past the limit are not.
  char tmpl[] = "/tmp/engine_sim_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  {
    std::ofstream out(dir + "/tokenizer.json");
    out << json{{"model", {{"vocab", {{"a", 0}, {"\xC4\xA0the", 1}, {"\xC4\xA0", 2}, {"\xC4\x8A", 3}, {"\xC3\x83", 4}, {"x!", 5}, {"zz", 9}}}}}}.dump();
  }
  const auto ids = engine::sim::text_token_ids(dir, 8);
  CHECK((ids == std::vector<int32_t>{0, 1, 5}));
  CHECK(engine::sim::text_token_ids("/nonexistent", 8).empty());
  std::remove((dir + "/tokenizer.json").c_str());
  rmdir(dir.c_str());

  // Sampled ordinary ids are drawn from them; eos stays eos.
  SimParams p = instant();
  p.text_ids = {11, 13, 17};
  p.eos_prob = 0.05;
  engine::ModelConfig cfg;
  cfg.vocab_size = 50;
  cfg.hidden_size = 8;
  cfg.eos_token_ids = {7};
  engine::sim::SimBackend backend(cfg, p, 64, 256);
  int num_eos = 0;
  for (uint64_t pos = 0; pos < 500; pos++) {
    const int32_t t = backend.token(3, pos);
    num_eos += t == 7;
    CHECK(t == 7 || t == 11 || t == 13 || t == 17);
  }
  CHECK(num_eos > 5 && num_eos < 60);
}

TEST(sim_host_path_agrees_for_greedy) {
  // return_logits forces forward() + lm_head() + the host sampler; greedy must pick the same
  // token as the device path.
  auto dev = sim_engine(instant()), host = sim_engine(instant());
  for (int64_t n = 1; n <= 20; n++) {
    std::vector<int> toks((size_t)n, 3);
    json a = seq(1, toks, 0, {0, 1}, 0.0);
    json b = a;
    b["return_logits"] = true;
    json ra = call(*dev, step(1, {a})), rb = call(*host, step(1, {b}));
    CHECK(code(ra) == "ok" && code(rb) == "ok");
    CHECK(ra["outputs"][0]["token"] == rb["outputs"][0]["token"]);
    const auto& bin = rb["outputs"][0]["logits"].get_binary();
    CHECK(bin.size() == 50 * 4);
    std::vector<float> logits(50);
    std::memcpy(logits.data(), bin.data(), bin.size());
    CHECK(std::max_element(logits.begin(), logits.end()) - logits.begin() == rb["outputs"][0]["token"].get<int64_t>());
    call(*dev, {{"v", 1}, {"type", "release"}, {"req_id", 2}, {"seq_ids", {1}}});
    call(*host, {{"v", 1}, {"type", "release"}, {"req_id", 2}, {"seq_ids", {1}}});
  }
}

TEST(sim_sleep_precision) {
  SimParams p;
  p.bandwidth_gbps = 1e12;  // memory and compute terms ~0: the step is the 2 ms overhead
  p.tflops = 1e12;
  p.overhead_us = 2000;
  engine::sim::SimBackend be(test::tiny_config(), p, 8, 64);
  const auto b = batch(4, 1, 40);
  CHECK_NEAR(engine::sim::model_step(p, b).seconds, 2e-3, 1e-6);
  std::vector<engine::Backend::DeviceSample> samples(4);
  std::vector<int32_t> tokens(4);
  std::vector<float> logprobs(4);
  std::vector<double> ms;
  for (int i = 0; i < 7; i++) {
    const auto t0 = std::chrono::steady_clock::now();
    CHECK(be.forward_sample(b, samples, tokens.data(), logprobs.data()));
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  std::printf("  sim 2 ms step measured: min %.4f median %.4f max %.4f ms\n", ms.front(), ms[3], ms.back());
  CHECK(ms.front() >= 1.95);   // never early: the deadline is spun to
  CHECK(ms.front() <= 2.3);    // the best run: preempted runs on a busy machine must not fail the suite
  // time_scale multiplies; 0 never sleeps.
  p.time_scale = 0;
  engine::sim::SimBackend fast(test::tiny_config(), p, 8, 64);
  const auto t0 = std::chrono::steady_clock::now();
  fast.forward_sample(b, samples, tokens.data(), logprobs.data());
  const double fast_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  CHECK(fast_ms < 1.0);
}

TEST(sim_protocol_rules) {
  auto e = sim_engine(instant());
  json info = call(*e, {{"v", 1}, {"type", "info"}, {"req_id", 1}});
  CHECK(info["device"] == "sim" && info["model"]["dtype"] == "bf16" && info["num_blocks"] == 8);
  CHECK(info["kv_cache_bytes"] == 8 * 16 * 131072);  // modelled Llama-3.1-8B blocks
  CHECK(info["model"]["vocab_size"] == 50 && info["model"]["eos_token_ids"] == json::array({7}));
  CHECK(code(call(*e, step(1, {seq(1, {1, 2}, 0, {0}), seq(1, {3}, 0, {1})}))) == "duplicate_sequence");
  CHECK(code(call(*e, step(1, {seq(1, {1, 2}, 0, nullptr)}))) == "unknown_sequence");
  CHECK(code(call(*e, step(1, {seq(1, {1, 2}, 63, {0, 1, 2, 3})}))) == "position_out_of_range");
  CHECK(code(call(*e, step(1, {seq(1, {1, 2}, 0, {8})}))) == "block_out_of_range");
  CHECK(code(call(*e, step(1, {seq(1, {1, 2}, 15, {0})}))) == "block_table_too_short");
  CHECK(code(call(*e, step(1, {seq(1, {1, 50}, 0, {0})}))) == "token_out_of_range");
  CHECK(code(call(*e, step(1, {seq(1, {1}, 0, {0}, -1.0)}))) == "invalid_sampling");
  // A failed step changes nothing.
  CHECK(code(call(*e, step(1, {seq(1, {1, 2}, 0, {0}), seq(2, {1, 99}, 0, {1})}))) == "token_out_of_range");
  info = call(*e, {{"v", 1}, {"type", "info"}, {"req_id", 2}});
  CHECK(info["num_active_seqs"] == 0 && info["num_used_blocks"] == 0);
  // Sequence state is kept exactly as on the CPU backend.
  json r = call(*e, step(2, {seq(1, {1, 2, 3}, 0, {0})}));
  CHECK(code(r) == "ok" && r["num_tokens"] == 3 && r["outputs"][0].contains("token"));
  CHECK(code(call(*e, step(3, {json{{"seq_id", 1}, {"tokens", {4}}, {"start_pos", 4}}}))) == "position_mismatch");
  json nos = seq(2, {1, 2}, 0, {1});
  nos["sample"] = false;
  r = call(*e, step(3, {json{{"seq_id", 1}, {"tokens", {4}}, {"start_pos", 3}}, nos}));
  CHECK(code(r) == "ok" && r["outputs"][0].contains("token") && !r["outputs"][1].contains("token"));
  info = call(*e, {{"v", 1}, {"type", "info"}, {"req_id", 2}});
  CHECK(info["num_active_seqs"] == 2 && info["num_used_blocks"] == 2);
  // Steps over max_batch_tokens are split into several passes transparently.
  auto small = sim_engine(instant(), 8, 4);
  r = call(*small, step(1, {seq(1, {1, 2, 3, 4, 5, 6}, 0, {0}), seq(2, {1, 2, 3}, 0, {1})}));
  CHECK(code(r) == "ok" && r["num_tokens"] == 9);
  const std::vector<int64_t> eos = {7};
  CHECK(r["outputs"][0]["token"] == engine::sim::sim_token(1, 6, 50, 0.0, eos));
  CHECK(r["outputs"][1]["token"] == engine::sim::sim_token(1, 3, 50, 0.0, eos));
}

TEST(sim_options) {
  using engine::parse_options;
  const std::vector<std::string> base = {"--model", "m", "--endpoint", "ipc:///x"};
  auto with = [&](std::vector<std::string> extra) {
    auto a = base;
    a.insert(a.end(), extra.begin(), extra.end());
    return parse_options(a);
  };
  auto o = with({"--device", "sim"});
  CHECK(o.sim.shape == "llama-3.1-8b" && o.sim.bandwidth_gbps == 3350 && o.sim.tflops == 989);
  CHECK(o.sim.bw_efficiency == 0.8 && o.sim.flops_efficiency == 0.6 && o.sim.overhead_us == 250);
  CHECK(o.sim.time_scale == 1 && o.sim.eos_prob == 0 && !o.kv_cache_bytes_given);
  o = with({"--sim-shape", "qwen3-0.6b", "--sim-bandwidth-gbps", "4800", "--sim-tflops", "989.5",
            "--sim-bw-efficiency", "1", "--sim-flops-efficiency", "0.5", "--sim-overhead-us", "0",
            "--sim-time-scale", "0", "--sim-eos-prob", "0.01", "--sim-max-token-id", "1000",
            "--sim-memory-gb", "141", "--kv-cache-bytes", "1000000"});
  CHECK(o.sim.shape == "qwen3-0.6b" && o.sim.bandwidth_gbps == 4800 && o.sim.tflops == 989.5);
  CHECK(o.sim.bw_efficiency == 1 && o.sim.flops_efficiency == 0.5 && o.sim.overhead_us == 0);
  CHECK(o.sim.time_scale == 0 && o.sim.eos_prob == 0.01 && o.sim.max_token_id == 1000);
  CHECK(o.sim.memory_gb == 141 && o.kv_cache_bytes_given && o.kv_cache_bytes == 1000000);
  for (std::vector<std::string> bad : std::vector<std::vector<std::string>>{
           {"--sim-shape", "gpt-5"}, {"--sim-bandwidth-gbps", "0"}, {"--sim-bw-efficiency", "1.5"},
           {"--sim-eos-prob", "-0.1"}, {"--sim-time-scale", "x"}, {"--sim-tflops", "nan"},
           {"--sim-max-token-id", "0"}, {"--sim-overhead-us"}}) {
    bool threw = false;
    try {
      with(bad);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    CHECK(threw);
  }
}
