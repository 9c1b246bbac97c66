// test_safetensors.cpp — header parsing, dtype conversion, multi-file dirs, errors.
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "common.h"
#include "model.h"
#include "safetensors.h"
#include "test.h"
#include "tiny_model.h"

namespace {

struct RawTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

template <class T>
std::vector<uint8_t> as_bytes(const std::vector<T>& v) {
  std::vector<uint8_t> b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

void write_safetensors(const std::string& path, const std::vector<RawTensor>& ts) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  size_t off = 0;
  for (const auto& t : ts) {
    header += ",\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":[";
    for (size_t i = 0; i < t.shape.size(); i++) header += (i ? "," : "") + std::to_string(t.shape[i]);
    header += "],\"data_offsets\":[" + std::to_string(off) + "," + std::to_string(off + t.bytes.size()) + "]}";
    off += t.bytes.size();
  }
  header += "}";
  while (header.size() % 8) header += ' ';
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = header.size();
  for (int i = 0; i < 8; i++) out.put((char)((n >> (8 * i)) & 0xff));
  out << header;
  for (const auto& t : ts) out.write((const char*)t.bytes.data(), (std::streamsize)t.bytes.size());
}

std::string make_tmp_dir() {
  char tmpl[] = "/tmp/engine_test_XXXXXX";
  return std::string(mkdtemp(tmpl));
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const engine::EngineError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(safetensors_dtypes_convert_exactly) {
  const std::string dir = make_tmp_dir();
  const std::vector<float> f32 = {1.5f, -2.25f, 0.0f, 3e-8f, 1e30f, -7.0f};
  const std::vector<uint16_t> f16 = {0x3C00, 0xC000, 0x3800, 0x7BFF, 0x0001, 0x0400};
  const std::vector<float> f16_expect = {1.0f, -2.0f, 0.5f, 65504.0f, 5.9604644775390625e-8f, 6.103515625e-5f};
  const std::vector<uint16_t> bf16 = {0x3F80, 0xC020, 0x4049, 0x0000};
  const std::vector<float> bf16_expect = {1.0f, -2.5f, 3.140625f, 0.0f};
  write_safetensors(dir + "/model.safetensors",
                    {{"a", "F32", {2, 3}, as_bytes(f32)}, {"b", "F16", {6}, as_bytes(f16)},
                     {"c", "BF16", {2, 2}, as_bytes(bf16)}});
  auto st = engine::TensorStore::open_dir(dir);
  CHECK(st.num_tensors() == 3);
  CHECK(st.get("b").dtype == engine::DType::F16);
  CHECK(st.load_f32("a", {2, 3}) == f32);
  CHECK(st.load_f32("b", {6}) == f16_expect);
  CHECK(st.load_f32("c", {2, 2}) == bf16_expect);
  CHECK(error_of([&] { st.load_f32("a", {3, 2}); }).find("has shape [2, 3], expected [3, 2]") != std::string::npos);
  CHECK(error_of([&] { st.get("nope"); }).find("missing tensor nope") != std::string::npos);
}

TEST(safetensors_index_and_glob) {
  const std::string dir = make_tmp_dir();
  write_safetensors(dir + "/model-00001-of-00002.safetensors", {{"x", "F32", {1}, as_bytes(std::vector<float>{4.0f})}});
  write_safetensors(dir + "/model-00002-of-00002.safetensors", {{"y", "F32", {1}, as_bytes(std::vector<float>{5.0f})}});
  {  // glob (no index)
    auto st = engine::TensorStore::open_dir(dir);
    CHECK(st.has("x") && st.has("y"));
  }
  std::ofstream(dir + "/model.safetensors.index.json")
      << R"({"metadata":{},"weight_map":{"x":"model-00001-of-00002.safetensors","y":"model-00002-of-00002.safetensors"}})";
  auto st = engine::TensorStore::open_dir(dir);
  CHECK(st.load_f32("y", {1})[0] == 5.0f);
}

TEST(safetensors_rejects_bad_files) {
  const std::string dir = make_tmp_dir();
  std::ofstream(dir + "/model.safetensors") << "garbage!garbage!";
  CHECK(!error_of([&] { engine::TensorStore::open_dir(dir); }).empty());
  const std::string empty = make_tmp_dir();
  CHECK(error_of([&] { engine::TensorStore::open_dir(empty); }).find("no *.safetensors") != std::string::npos);
  // Shape inconsistent with byte size.
  write_safetensors(dir + "/model.safetensors", {{"a", "F32", {3}, as_bytes(std::vector<float>{1, 2})}});
  CHECK(error_of([&] { engine::TensorStore::open_dir(dir); }).find("does not match") != std::string::npos);
}

TEST(safetensors_load_bf16_copies_bf16_and_rounds_the_rest) {
  const std::string dir = make_tmp_dir();
  const float nan = std::nanf("");
  // 1 + 2^-8 and 1 + 3·2^-8 are ties: to even (1.0 and 1 + 2^-6); 1 + 2^-8 + 2^-20 rounds up.
  const std::vector<float> f32 = {1.5f, 1.00390625f, 1.01171875f, 1.0039072036743164f, -2.0f, nan};
  const std::vector<uint16_t> f32_expect = {0x3FC0, 0x3F80, 0x3F82, 0x3F81, 0xC000};
  const std::vector<uint16_t> f16 = {0x3C00, 0xC000, 0x3800};  // 1, -2, 0.5
  const std::vector<uint16_t> bf16 = {0x3F80, 0xC020, 0x4049, 0x0000, 0x7FC1, 0x0001};  // a NaN and a subnormal too
  write_safetensors(dir + "/model.safetensors", {{"a", "F32", {2, 3}, as_bytes(f32)},
                                                 {"b", "F16", {3}, as_bytes(f16)},
                                                 {"c", "BF16", {3, 2}, as_bytes(bf16)}});
  auto st = engine::TensorStore::open_dir(dir);
  std::vector<uint16_t> out(6);
  st.load_bf16("a", 0, 6, out.data());
  CHECK(std::vector<uint16_t>(out.begin(), out.begin() + 5) == f32_expect);
  CHECK((out[5] & 0x7F80) == 0x7F80 && (out[5] & 0x7F) != 0);  // NaN stays NaN
  st.load_bf16("b", 0, 3, out.data());
  CHECK(std::vector<uint16_t>(out.begin(), out.begin() + 3) == std::vector<uint16_t>({0x3F80, 0xC000, 0x3F00}));
  st.load_bf16("c", 0, 6, out.data());
  CHECK(out == bf16);  // the checkpoint's bits, as they are
  std::vector<uint16_t> mid(3);
  st.load_bf16("c", 2, 3, mid.data());
  CHECK(mid == std::vector<uint16_t>({0x4049, 0x0000, 0x7FC1}));
  CHECK(error_of([&] { st.load_bf16("c", 4, 3, mid.data()); }).find("outside") != std::string::npos);
}

// A checkpoint of the tiny test model (test/tiny_model.h's config) in `dtype` ("F32" or "BF16").
static void write_tiny_checkpoint(const std::string& path, const engine::ModelConfig& c, const std::string& dtype) {
  uint32_t s = 12345;
  auto tensor = [&](const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> v((size_t)n);
    for (float& x : v) x = (float)((s = s * 1664525u + 1013904223u) >> 8) / (float)(1u << 24) - 0.5f;
    if (dtype == "F32") return RawTensor{name, dtype, shape, as_bytes(v)};
    std::vector<uint16_t> b(v.size());
    for (size_t i = 0; i < v.size(); i++) b[i] = engine::f32_to_bf16(v[i]);
    return RawTensor{name, dtype, shape, as_bytes(b)};
  };
  const int64_t hid = c.hidden_size, H = c.num_heads, KV = c.num_kv_heads, D = c.head_dim, I = c.intermediate_size;
  std::vector<RawTensor> ts = {tensor("model.embed_tokens.weight", {c.vocab_size, hid}), tensor("model.norm.weight", {hid})};
  for (int64_t l = 0; l < c.num_layers; l++) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (auto [name, shape] : std::vector<std::pair<std::string, std::vector<int64_t>>>{
             {"input_layernorm.weight", {hid}}, {"post_attention_layernorm.weight", {hid}},
             {"self_attn.q_proj.weight", {H * D, hid}}, {"self_attn.k_proj.weight", {KV * D, hid}},
             {"self_attn.v_proj.weight", {KV * D, hid}}, {"self_attn.o_proj.weight", {hid, H * D}},
             {"self_attn.q_norm.weight", {D}}, {"self_attn.k_norm.weight", {D}},
             {"mlp.gate_proj.weight", {I, hid}}, {"mlp.up_proj.weight", {I, hid}}, {"mlp.down_proj.weight", {hid, I}}})
      ts.push_back(tensor(p + name, shape));
  }
  write_safetensors(path, ts);
}

TEST(model_matrices_read_straight_to_bf16_equal_the_f32_load_rounded) {
  const engine::ModelConfig c = test::tiny_config();
  for (const std::string dtype : {"BF16", "F32"}) {
    const std::string dir = make_tmp_dir();
    write_tiny_checkpoint(dir + "/model.safetensors", c, dtype);
    auto st = engine::TensorStore::open_dir(dir);
    const engine::ModelWeights f32 = engine::load_weights(c, st);
    const engine::ModelMatrixParts parts = engine::matrix_parts(c, st);
    // What the CUDA backend uploads for a matrix: its parts, each read with load_bf16, stacked.
    auto straight = [&](const engine::MatrixParts& m) {
      std::vector<uint16_t> out((size_t)m.numel());
      size_t at = 0;
      for (const engine::TensorRows& p : m.parts) {
        st.load_bf16(p.name, 0, p.rows * m.cols, out.data() + at);
        at += (size_t)(p.rows * m.cols);
      }
      return out;
    };
    auto rounded = [](const std::vector<float>& v) {
      std::vector<uint16_t> out(v.size());
      for (size_t i = 0; i < v.size(); i++) out[i] = engine::f32_to_bf16(v[i]);
      return out;
    };
    CHECK(parts.lm_head.parts.empty());  // tied
    CHECK(!f32.embed.empty() && straight(parts.embed) == rounded(f32.embed));
    for (int64_t l = 0; l < c.num_layers; l++) {
      const engine::LayerWeights& w = f32.layers[l];
      const engine::LayerMatrixParts& p = parts.layers[l];
      CHECK(p.wqkv.parts.size() == 3 && straight(p.wqkv) == rounded(w.wqkv));
      CHECK(straight(p.wo) == rounded(w.wo));
      CHECK(p.w_gate_up.parts.size() == 2 && straight(p.w_gate_up) == rounded(w.w_gate_up));
      CHECK(straight(p.w_down) == rounded(w.w_down));
    }
    // Without the matrices: the vectors only.
    const engine::ModelWeights vectors = engine::load_weights(c, st, false);
    CHECK(vectors.embed.empty() && vectors.layers[0].wqkv.empty() && vectors.layers[1].w_down.empty());
    CHECK(vectors.final_norm == f32.final_norm && vectors.layers[1].q_norm == f32.layers[1].q_norm);
  }
}
