// safetensors.cpp — see safetensors.h.
#include "safetensors.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "common.h"

namespace engine {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
  }
  return "?";
}

size_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;  // +-0
    } else {  // subnormal: renormalise into an f32 normal
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) { mant <<= 1; exp--; }
      mant &= 0x3ff;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float bf16_to_f32(uint16_t b) {
  const uint32_t bits = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  ENGINE_CHECK(fd >= 0, "internal", "cannot open " << path << ": " << std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) { ::close(fd); ENGINE_FAIL("internal", "cannot stat " << path); }
  size_ = (size_t)st.st_size;
  if (size_ < 8) { ::close(fd); ENGINE_FAIL("internal", path << ": too small for safetensors"); }
  map_ = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);  // the mapping keeps the file alive
  if (map_ == MAP_FAILED) { map_ = nullptr; ENGINE_FAIL("internal", "cannot mmap " << path); }

  const uint8_t* base = (const uint8_t*)map_;
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; i--) header_len = (header_len << 8) | base[i];  // little endian
  ENGINE_CHECK(header_len <= size_ - 8, "internal",
               path << ": header length " << header_len << " exceeds file size " << size_);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(base + 8, base + 8 + header_len);
  } catch (const std::exception& e) {
    ENGINE_FAIL("internal", path << ": bad safetensors header JSON: " << e.what());
  }
  ENGINE_CHECK(header.is_object(), "internal", path << ": header is not a JSON object");
  const uint8_t* data = base + 8 + header_len;
  const size_t data_size = size_ - 8 - header_len;

  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const auto& j = it.value();
    TensorInfo t;
    t.name = it.key();
    try {
      const std::string dt = j.at("dtype").get<std::string>();
      if (dt == "F32") t.dtype = DType::F32;
      else if (dt == "F16") t.dtype = DType::F16;
      else if (dt == "BF16") t.dtype = DType::BF16;
      else ENGINE_FAIL("internal", path << ": tensor " << t.name << " has unsupported dtype " << dt
                                        << " (supported: F32, F16, BF16)");
      t.shape = j.at("shape").get<std::vector<int64_t>>();
      const auto offs = j.at("data_offsets").get<std::vector<uint64_t>>();
      ENGINE_CHECK(offs.size() == 2 && offs[0] <= offs[1] && offs[1] <= data_size, "internal",
                   path << ": tensor " << t.name << " has data_offsets outside the file");
      for (int64_t d : t.shape) ENGINE_CHECK(d >= 0, "internal", path << ": negative dim in " << t.name);
      t.data = data + offs[0];
      t.nbytes = offs[1] - offs[0];
      ENGINE_CHECK((uint64_t)t.numel() * dtype_size(t.dtype) == t.nbytes, "internal",
                   path << ": tensor " << t.name << " shape " << shape_str(t.shape)
                        << " does not match its byte size " << t.nbytes);
    } catch (const EngineError&) {
      throw;
    } catch (const std::exception& e) {
      ENGINE_FAIL("internal", path << ": bad header entry for " << t.name << ": " << e.what());
    }
    tensors_.emplace(t.name, std::move(t));
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) munmap(map_, size_);
}

void TensorStore::add(std::shared_ptr<SafetensorsFile> f) {
  for (const auto& kv : f->tensors()) {
    ENGINE_CHECK(!index_.count(kv.first), "internal",
                 "tensor " << kv.first << " appears in more than one file (" << f->path() << ")");
    index_[kv.first] = &kv.second;
  }
  files_.push_back(std::move(f));
}

static bool file_exists(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

TensorStore TensorStore::open_file(const std::string& path) {
  TensorStore s;
  s.add(std::make_shared<SafetensorsFile>(path));
  return s;
}

TensorStore TensorStore::open_dir(const std::string& dir) {
  std::vector<std::string> files;
  const std::string index_path = dir + "/model.safetensors.index.json";
  if (file_exists(dir + "/model.safetensors")) {
    files.push_back("model.safetensors");
  } else if (file_exists(index_path)) {
    std::ifstream in(index_path);
    nlohmann::json idx;
    try {
      in >> idx;
    } catch (const std::exception& e) {
      ENGINE_FAIL("internal", index_path << ": bad JSON: " << e.what());
    }
    ENGINE_CHECK(idx.contains("weight_map") && idx["weight_map"].is_object(), "internal",
                 index_path << ": no weight_map object");
    std::set<std::string> uniq;
    for (auto& kv : idx["weight_map"].items()) uniq.insert(kv.value().get<std::string>());
    files.assign(uniq.begin(), uniq.end());
  } else {
    DIR* d = opendir(dir.c_str());
    ENGINE_CHECK(d != nullptr, "internal", "cannot open model directory " << dir);
    while (dirent* e = readdir(d)) {
      std::string n = e->d_name;
      const std::string ext = ".safetensors";
      if (n.size() > ext.size() && n.compare(n.size() - ext.size(), ext.size(), ext) == 0)
        files.push_back(n);
    }
    closedir(d);
    std::sort(files.begin(), files.end());
  }
  ENGINE_CHECK(!files.empty(), "internal", "no *.safetensors files in " << dir);
  TensorStore s;
  for (const auto& f : files) s.add(std::make_shared<SafetensorsFile>(dir + "/" + f));
  return s;
}

const TensorInfo& TensorStore::get(const std::string& name) const {
  auto it = index_.find(name);
  ENGINE_CHECK(it != index_.end(), "internal", "missing tensor " << name);
  return *it->second;
}

// dst[i] = f(the i-th Raw of src), for n elements. Converted on every core: an 8B checkpoint
// is 16 GB of bf16 (~25 s on one thread). memcpy: the mmap'ed data may be unaligned.
template <typename Raw, typename Out, typename F>
static void convert(const uint8_t* src, int64_t n, Out* dst, F f) {
#pragma omp parallel for schedule(static) if (n > (1 << 20))
  for (int64_t i = 0; i < n; i++) {
    Raw r;
    std::memcpy(&r, src + sizeof(Raw) * i, sizeof(Raw));
    dst[i] = f(r);
  }
}

void TensorStore::load_f32(const std::string& name, const std::vector<int64_t>& shape,
                           float* dst) const {
  const TensorInfo& t = get(name);
  ENGINE_CHECK(t.shape == shape, "internal",
               "tensor " << name << " has shape " << shape_str(t.shape) << ", expected "
                         << shape_str(shape));
  const int64_t n = t.numel();
  switch (t.dtype) {
    case DType::F32:
      std::memcpy(dst, t.data, (size_t)n * 4);  // memcpy: data may be unaligned
      break;
    case DType::F16:
      convert<uint16_t>(t.data, n, dst, f16_to_f32);
      break;
    case DType::BF16:
      convert<uint16_t>(t.data, n, dst, bf16_to_f32);
      break;
  }
}

std::vector<float> TensorStore::load_f32(const std::string& name,
                                         const std::vector<int64_t>& shape) const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<float> v((size_t)n);
  load_f32(name, shape, v.data());
  return v;
}

void TensorStore::load_bf16(const std::string& name, int64_t first, int64_t n, uint16_t* dst) const {
  const TensorInfo& t = get(name);
  ENGINE_CHECK(first >= 0 && n >= 0 && first + n <= t.numel(), "internal",
               "tensor " << name << ": elements [" << first << ", " << first + n << ") outside its "
                         << t.numel());
  switch (t.dtype) {
    case DType::BF16: {
      // In 1 MiB pieces on every core: the reads fault the mmap'ed file in.
      const int64_t piece = 1 << 19, pieces = (n + piece - 1) / piece;
#pragma omp parallel for schedule(static) if (pieces > 1)
      for (int64_t k = 0; k < pieces; k++) {
        const int64_t i0 = k * piece, m = std::min(piece, n - i0);
        std::memcpy(dst + i0, t.data + 2 * (first + i0), (size_t)m * 2);
      }
      break;
    }
    case DType::F32:
      convert<float>(t.data + 4 * first, n, dst, f32_to_bf16);
      break;
    case DType::F16:
      convert<uint16_t>(t.data + 2 * first, n, dst, [](uint16_t h) { return f32_to_bf16(f16_to_f32(h)); });
      break;
  }
}

}  // namespace engine
