// safetensors.h — read Hugging Face safetensors checkpoints (one or several files).
//
// Format: 8-byte little-endian header length N, N bytes of JSON
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw
// tensor bytes; offsets are relative to the end of the header. Files are mmap'ed read-only
// and tensors are converted on request, to f32 (the CPU backend computes in f32) or to bf16
// (the CUDA backend's weights), so the checkpoint is never fully resident twice.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace engine {

enum class DType { F32, F16, BF16 };

// "f32" | "f16" | "bf16" (the protocol's spelling).
const char* dtype_name(DType d);
size_t dtype_size(DType d);

// IEEE half / bfloat16 bit patterns -> f32 (exact: every f16/bf16 value is an f32 value).
float f16_to_f32(uint16_t h);
float bf16_to_f32(uint16_t b);
// f32 -> bfloat16 bits, rounded to nearest even; NaN stays NaN (quiet). Inline: it runs per
// element in the loaders' conversion loops.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // points into the mmap'ed file
  size_t nbytes = 0;
  int64_t numel() const;
};

// One mmap'ed .safetensors file. Throws EngineError("internal", ...) on a malformed file.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
};

// All tensors of a checkpoint directory: `model.safetensors`, or the files named by
// `model.safetensors.index.json`'s weight_map, or else every `*.safetensors` in the dir.
class TensorStore {
 public:
  // Opens the files of `dir`. Throws if none are found or one is malformed.
  static TensorStore open_dir(const std::string& dir);
  // Single file (used by tests).
  static TensorStore open_file(const std::string& path);

  bool has(const std::string& name) const { return index_.count(name) != 0; }
  // Throws "missing tensor NAME" if absent.
  const TensorInfo& get(const std::string& name) const;

  // Copies tensor `name` into dst as f32, after checking its shape equals `shape`
  // (error message names the tensor, expected and actual shapes). dst holds numel floats.
  void load_f32(const std::string& name, const std::vector<int64_t>& shape, float* dst) const;
  std::vector<float> load_f32(const std::string& name, const std::vector<int64_t>& shape) const;
  // Copies elements [first, first + n) of tensor `name` (row-major) into dst as bf16 bits: a
  // bf16 tensor's bytes as they are (no f32 round trip), f32 and f16 rounded to nearest even.
  // For a backend that keeps bf16 weights; throws if the range is outside the tensor.
  void load_bf16(const std::string& name, int64_t first, int64_t n, uint16_t* dst) const;

  size_t num_tensors() const { return index_.size(); }

 private:
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*> index_;
  void add(std::shared_ptr<SafetensorsFile> f);
};

std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace engine
