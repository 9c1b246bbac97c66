// test_protocol.cpp — request decoding/validation through handle_frame: every error code,
// and that a rejected request changes nothing.
#include <nlohmann/json.hpp>
#include <string>

#include "server.h"
#include "test.h"
#include "tiny_model.h"

using nlohmann::json;

namespace {

json call_raw(engine::Engine& e, const std::string& frame) {
  const std::string r = engine::handle_frame(e, frame.data(), frame.size());
  return json::from_msgpack(r);
}

json call(engine::Engine& e, const json& req) {
  const auto bytes = json::to_msgpack(req);
  return call_raw(e, std::string(bytes.begin(), bytes.end()));
}

json seq(uint64_t id, json tokens, int64_t start, json table, bool with_sampling = true) {
  json s = {{"seq_id", id}, {"tokens", tokens}, {"start_pos", start}};
  if (!table.is_null()) s["block_table"] = table;
  if (with_sampling) s["sampling"] = {{"temperature", 0}, {"top_p", 1.0}, {"top_k", 0}, {"seed", 1}};
  return s;
}

json step(uint64_t req_id, json seqs) { return {{"v", 1}, {"type", "step"}, {"req_id", req_id}, {"seqs", seqs}}; }

std::string code(const json& r) { return r.value("ok", true) ? "ok" : r["error"]["code"].get<std::string>(); }

}  // namespace

TEST(protocol_envelope_errors) {
  auto e = test::tiny_engine();
  json r = call_raw(*e, "\xc1\xff garbage");
  CHECK(code(r) == "bad_message" && r["req_id"] == 0 && r["v"] == 1);
  CHECK(code(call_raw(*e, "")) == "bad_message");
  CHECK(code(call(*e, json::array({1, 2}))) == "bad_message");
  CHECK(code(call(*e, {{"v", 1}, {"type", "info"}})) == "bad_message");             // no req_id
  CHECK(code(call(*e, {{"v", 1}, {"type", "info"}, {"req_id", "x"}})) == "bad_message");
  r = call(*e, {{"v", 2}, {"type", "info"}, {"req_id", 5}});
  CHECK(code(r) == "unsupported_version" && r["req_id"] == 5);
  CHECK(code(call(*e, {{"v", 1}, {"type", "frobnicate"}, {"req_id", 6}})) == "unknown_type");
  // Trailing bytes after a valid map.
  auto bytes = json::to_msgpack(json{{"v", 1}, {"type", "info"}, {"req_id", 7}});
  bytes.push_back(0x01);
  CHECK(code(call_raw(*e, std::string(bytes.begin(), bytes.end()))) == "bad_message");
  // A tiny frame claiming a 2^32-1 element array must not allocate gigabytes.
  CHECK(code(call_raw(*e, std::string("\xdd\xff\xff\xff\xff", 5))) == "bad_message");
}

TEST(protocol_info_health_release) {
  auto e = test::tiny_engine();
  json r = call(*e, {{"v", 1}, {"type", "info"}, {"req_id", 1}});
  CHECK(code(r) == "ok" && r["type"] == "info");
  CHECK(r["model"]["vocab_size"] == 50 && r["model"]["num_kv_heads"] == 2 && r["model"]["dtype"] == "f32");
  CHECK(r["model"]["eos_token_ids"] == json::array({7}));
  CHECK(r["block_size"] == 16 && r["num_blocks"] == 8 && r["protocol_version"] == 1);
  CHECK(r["kv_cache_bytes"] == 8 * 2 * 2 * 16 * 2 * 8 * 4);
  r = call(*e, {{"v", 1}, {"type", "health"}, {"req_id", 2}});
  CHECK(r["status"] == "ok" && r["num_steps"] == 0);
  r = call(*e, {{"v", 1}, {"type", "release"}, {"req_id", 3}, {"seq_ids", {4, 5}}});
  CHECK(r["released"].empty() && r["unknown"] == json::array({4, 5}));
}

TEST(protocol_step_rules) {
  auto e = test::tiny_engine();
  CHECK(code(call(*e, step(1, {seq(1, {1, 2}, 0, {0}), seq(1, {3}, 0, {1})}))) == "duplicate_sequence");
  CHECK(code(call(*e, step(1, {seq(1, {1, 2}, 0, nullptr)}))) == "unknown_sequence");
  CHECK(code(call(*e, step(1, {seq(1, {1, 2}, 0, {0}, false)}))) == "unknown_sequence");
  CHECK(code(call(*e, step(1, {seq(1, {1, 2}, 63, {0, 1, 2, 3})}))) == "position_out_of_range");
  CHECK(code(call(*e, step(1, {seq(1, {1, 2}, 0, {8})}))) == "block_out_of_range");
  CHECK(code(call(*e, step(1, {seq(1, {1, 2}, 0, {-1})}))) == "block_out_of_range");
  CHECK(code(call(*e, step(1, {seq(1, {1, 2}, 15, {0})}))) == "block_table_too_short");
  CHECK(code(call(*e, step(1, {seq(1, {1, 50}, 0, {0})}))) == "token_out_of_range");
  CHECK(code(call(*e, step(1, {seq(1, json::array(), 0, {0})}))) == "token_out_of_range");
  for (json bad : {json{{"temperature", -1}}, json{{"top_p", 0}}, json{{"top_p", 1.5}}, json{{"top_k", -1}}}) {
    json s = seq(1, {1}, 0, {0});
    s["sampling"] = bad;
    CHECK(code(call(*e, step(1, {s}))) == "invalid_sampling");
  }
  json s = seq(1, {1}, 0, {0});
  s["tokens"] = "abc";
  CHECK(code(call(*e, step(1, {s}))) == "bad_message");
  // A failed step changes nothing: the good first sequence is not created.
  CHECK(code(call(*e, step(1, {seq(1, {1, 2}, 0, {0}), seq(2, {1, 99}, 0, {1})}))) == "token_out_of_range");
  json info = call(*e, {{"v", 1}, {"type", "info"}, {"req_id", 2}});
  CHECK(info["num_active_seqs"] == 0 && info["num_used_blocks"] == 0);
  CHECK(call(*e, {{"v", 1}, {"type", "health"}, {"req_id", 2}})["num_steps"] == 0);
}

TEST(protocol_step_lifecycle) {
  auto e = test::tiny_engine();
  json a = seq(10, {1, 2, 3}, 0, {0});
  a["logprobs"] = true;
  json b = seq(11, {4, 5}, 0, {1});
  b["return_logits"] = true;
  b["sample"] = false;
  json r = call(*e, step(1, {a, b}));
  CHECK(code(r) == "ok" && r["num_tokens"] == 5 && r["outputs"].size() == 2);
  CHECK(r["outputs"][0]["seq_id"] == 10 && r["outputs"][0].contains("token") && r["outputs"][0].contains("logprob"));
  CHECK(r["outputs"][0]["logprob"].get<double>() <= 0.0);
  CHECK(!r["outputs"][1].contains("token") && r["outputs"][1]["logits"].get_binary().size() == 50 * 4);
  CHECK(r["timings"].contains("forward_ms") && r["timings"].contains("sample_ms") && r["timings"].contains("total_ms"));
  json info = call(*e, {{"v", 1}, {"type", "info"}, {"req_id", 2}});
  CHECK(info["num_active_seqs"] == 2 && info["num_used_blocks"] == 2);
  // Decode: known sequences send only the new token; wrong start_pos is a mismatch.
  CHECK(code(call(*e, step(3, {json{{"seq_id", 10}, {"tokens", {7}}, {"start_pos", 4}}}))) == "position_mismatch");
  r = call(*e, step(3, {json{{"seq_id", 10}, {"tokens", {7}}, {"start_pos", 3}}}));
  CHECK(code(r) == "ok" && r["outputs"][0].contains("token") && !r["outputs"][0].contains("logprob"));
  // Crossing a block boundary needs new_blocks.
  json grow = {{"seq_id", 11}, {"tokens", json::array()}, {"start_pos", 2}};
  for (int i = 0; i < 15; i++) grow["tokens"].push_back(i);
  CHECK(code(call(*e, step(4, {grow}))) == "block_table_too_short");
  grow["new_blocks"] = {2};
  CHECK(code(call(*e, step(4, {grow}))) == "ok");
  info = call(*e, {{"v", 1}, {"type", "info"}, {"req_id", 2}});
  CHECK(info["num_used_blocks"] == 3);
  // release inside a step, and the released id may come back as a new sequence.
  json st = step(5, {seq(10, {1}, 0, {3})});
  st["release"] = {10, 11};
  CHECK(code(call(*e, st)) == "ok");
  info = call(*e, {{"v", 1}, {"type", "info"}, {"req_id", 2}});
  CHECK(info["num_active_seqs"] == 1 && info["num_used_blocks"] == 1);
  r = call(*e, {{"v", 1}, {"type", "release"}, {"req_id", 6}, {"seq_ids", {10, 10}}});
  CHECK(r["released"] == json::array({10}) && r["unknown"] == json::array({10}));
  info = call(*e, {{"v", 1}, {"type", "info"}, {"req_id", 2}});
  CHECK(info["num_active_seqs"] == 0 && info["num_used_blocks"] == 0);
}

TEST(protocol_lenient_numbers) {
  auto e = test::tiny_engine();
  // req_id and seed as float64 holding integers (msgpackr does this beyond 32 bits),
  // temperature as an integer, undefined-ext (msgpackr `undefined`) treated as absent.
  json s = seq(1, {1}, 0, {0});
  s["sampling"] = {{"temperature", 1}, {"top_p", 0.9}, {"seed", 4294967296.0 * 8}};
  json req = step(0, {s});
  req["req_id"] = 8589934592.0;
  json r = call(*e, req);
  CHECK(code(r) == "ok" && r["req_id"] == 8589934592ull);
  req["req_id"] = 1.5;
  CHECK(code(call(*e, req)) == "bad_message");
  // {v:1, type:"info", req_id:9, x: undefined} hand-encoded.
  const std::string frame = std::string("\x84\xa1v\x01\xa4type\xa4info\xa6req_id\x09\xa1x\xd4\x00\x00", 27);
  CHECK(code(call_raw(*e, frame)) == "ok");
}
