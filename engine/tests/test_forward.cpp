// test_forward.cpp — batching/chunking invariances of the CPU forward pass: a sequence's
// result must not depend on what else is in the batch, on how its prefill is split, on
// which physical blocks hold it, or on the engine's max_num_batched_tokens.
#include <cmath>
#include <nlohmann/json.hpp>
#include <vector>

#include "server.h"
#include "test.h"
#include "tiny_model.h"

using engine::BatchSeq;

namespace {

BatchSeq slice(const std::vector<int32_t>& toks, int64_t from, int64_t n, const std::vector<int32_t>& table,
               bool out = true) {
  BatchSeq b;
  b.tokens = toks.data() + from;
  b.num_tokens = n;
  b.start_pos = from;
  b.block_table = table.data();
  b.block_table_len = (int64_t)table.size();
  b.need_output = out;
  return b;
}

double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = a.size() == b.size() ? 0.0 : INFINITY;
  for (size_t i = 0; i < a.size() && i < b.size(); i++) m = std::max(m, (double)std::fabs(a[i] - b[i]));
  return m;
}

const std::vector<int32_t> kX = {3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 38, 4, 6, 2, 6, 43, 3};  // 20
const std::vector<int32_t> kY = {1, 41, 42, 13, 5, 6, 23};                                          // 7

}  // namespace

TEST(forward_batch_equals_alone) {
  const auto c = test::tiny_config();
  const std::vector<int32_t> tx = {5, 2}, ty = {0};  // non-contiguous, out-of-order blocks
  auto both = test::tiny_backend(c, 8, 64), ax = test::tiny_backend(c, 8, 64), ay = test::tiny_backend(c, 8, 64);
  std::vector<float> hb(2 * 16), hx(16), hy(16);
  both->forward({slice(kX, 0, 20, tx), slice(kY, 0, 7, ty)}, hb.data());
  ax->forward({slice(kX, 0, 20, tx)}, hx.data());
  ay->forward({slice(kY, 0, 7, ty)}, hy.data());
  CHECK(max_diff(std::vector<float>(hb.begin(), hb.begin() + 16), hx) < 1e-5);
  CHECK(max_diff(std::vector<float>(hb.begin() + 16, hb.end()), hy) < 1e-5);
  // Logits too.
  std::vector<float> lb(2 * 50), lx(50);
  both->lm_head(hb.data(), 2, lb.data());
  ax->lm_head(hx.data(), 1, lx.data());
  CHECK(max_diff(std::vector<float>(lb.begin(), lb.begin() + 50), lx) < 1e-5);
}

TEST(forward_chunked_prefill_and_decode) {
  const auto c = test::tiny_config();
  const std::vector<int32_t> t1 = {1, 4}, t2 = {7, 3};  // different physical blocks
  auto one = test::tiny_backend(c, 8, 64), two = test::tiny_backend(c, 8, 64);
  std::vector<float> h1(16), h2(16);
  one->forward({slice(kX, 0, 19, t1)}, h1.data());
  two->forward({slice(kX, 0, 11, t2, false)}, nullptr);
  two->forward({slice(kX, 11, 8, t2)}, h2.data());
  CHECK(max_diff(h1, h2) < 1e-5);
  // One decode token (position 19) on each.
  one->forward({slice(kX, 19, 1, t1)}, h1.data());
  two->forward({slice(kX, 19, 1, t2)}, h2.data());
  CHECK(max_diff(h1, h2) < 1e-5);
  // And equal to a full 20-token prefill.
  auto full = test::tiny_backend(c, 8, 64);
  std::vector<float> hf(16);
  full->forward({slice(kX, 0, 20, t1)}, hf.data());
  CHECK(max_diff(h1, hf) < 1e-5);
  // Different positions really give different states (RoPE/attention are live).
  std::vector<float> h0(16);
  full->forward({slice(kX, 0, 1, t1)}, h0.data());
  CHECK(max_diff(h0, hf) > 1e-3);
}

TEST(engine_splits_large_steps) {
  using nlohmann::json;
  auto small = test::tiny_engine(8, 5), big = test::tiny_engine(8, 64);
  json s1 = {{"seq_id", 1}, {"tokens", kX}, {"start_pos", 0}, {"block_table", {0, 1}},
             {"sampling", {{"temperature", 0.8}, {"top_p", 0.9}, {"seed", 3}}}, {"return_logits", true}};
  json s2 = {{"seq_id", 2}, {"tokens", kY}, {"start_pos", 0}, {"block_table", {2}},
             {"sampling", {{"temperature", 0}}}, {"return_logits", true}};
  json req = {{"v", 1}, {"type", "step"}, {"req_id", 1}, {"seqs", {s1, s2}}};
  const auto bytes = json::to_msgpack(req);
  const std::string frame(bytes.begin(), bytes.end());
  json a = json::from_msgpack(engine::handle_frame(*small, frame.data(), frame.size()));
  json b = json::from_msgpack(engine::handle_frame(*big, frame.data(), frame.size()));
  CHECK(a["ok"] == true && b["ok"] == true);
  for (int i = 0; i < 2; i++) {
    const auto& la = a["outputs"][i]["logits"].get_binary();
    const auto& lb = b["outputs"][i]["logits"].get_binary();
    std::vector<float> fa(la.size() / 4), fb(lb.size() / 4);
    std::memcpy(fa.data(), la.data(), la.size());
    std::memcpy(fb.data(), lb.data(), lb.size());
    CHECK(fa.size() == 50 && max_diff(fa, fb) < 1e-5);
    CHECK(a["outputs"][i]["token"] == b["outputs"][i]["token"]);
  }
}

// embed: the last token's final hidden state, L2-normalised, computed in the reserved KV
// blocks (the last 32 of 128 here: `info` reports 96), chunked like any prefill, and
// touching no sequence. Rejects empty, out-of-vocabulary and too long inputs.
TEST(engine_embed_is_the_normalised_last_hidden_state) {
  using nlohmann::json;
  const auto c = test::tiny_config();
  auto eng = test::tiny_engine(128, 5);  // chunks of 5 tokens: 20 tokens take 4 passes
  auto ref = test::tiny_backend(c, 8, 64);
  std::vector<float> h(16);
  ref->forward({slice(kX, 0, 20, {0, 1})}, h.data());
  double norm = 0;
  for (float x : h) norm += (double)x * x;
  norm = std::sqrt(norm);
  const auto call = [&](const json& req) {
    const auto bytes = json::to_msgpack(req);
    const std::string frame(bytes.begin(), bytes.end());
    return json::from_msgpack(engine::handle_frame(*eng, frame.data(), frame.size()));
  };
  json r = call({{"v", 1}, {"type", "embed"}, {"req_id", 7}, {"tokens", kX}});
  CHECK(r["ok"] == true && r["type"] == "embed" && r["embedding"].size() == 16);
  double got_norm = 0, diff = 0;
  for (size_t i = 0; i < 16; i++) {
    const double e = r["embedding"][i].get<double>();
    got_norm += e * e;
    diff = std::max(diff, std::fabs(e - h[i] / norm));
  }
  CHECK_NEAR(got_norm, 1.0, 1e-5);
  CHECK(diff < 1e-5);
  // The same again (the reserved blocks are reused), and no sequence was made.
  json again = call({{"v", 1}, {"type", "embed"}, {"req_id", 8}, {"tokens", kX}});
  CHECK(again["embedding"] == r["embedding"]);
  json info = call({{"v", 1}, {"type", "info"}, {"req_id", 9}});
  CHECK(info["num_blocks"] == 96 && info["num_active_seqs"] == 0);
  // A step may not use the reserved blocks.
  json step = call({{"v", 1}, {"type", "step"}, {"req_id", 10},
                    {"seqs", {{{"seq_id", 1}, {"tokens", {1, 2}}, {"start_pos", 0}, {"block_table", {96}}, {"sampling", {{"temperature", 0}}}}}}});
  CHECK(step["ok"] == false && step["error"]["code"] == "block_out_of_range");
  CHECK(call({{"v", 1}, {"type", "embed"}, {"req_id", 11}, {"tokens", json::array()}})["error"]["code"] == "token_out_of_range");
  CHECK(call({{"v", 1}, {"type", "embed"}, {"req_id", 12}, {"tokens", {1, 50}}})["error"]["code"] == "token_out_of_range");
  CHECK(call({{"v", 1}, {"type", "embed"}, {"req_id", 13}, {"tokens", std::vector<int>(513, 1)}})["error"]["code"] == "position_out_of_range");
  CHECK(call({{"v", 1}, {"type", "embed"}, {"req_id", 14}})["error"]["code"] == "bad_message");
}
