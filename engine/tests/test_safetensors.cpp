// test_safetensors.cpp — header parsing, dtype conversion, multi-file dirs, errors.
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "common.h"
#include "safetensors.h"
#include "test.h"

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
