// kv_cache.h — the paged KV cache memory (CPU, f32).
//
// The scheduler decides which block ids a sequence owns; this class only owns the memory.
// Layout, per layer and separately for K and V:
//   [num_blocks][block_size][num_kv_heads][head_dim]  (f32, row-major)
// so that one token's K (or V) for all kv heads is contiguous (one write per token per layer)
// and a block is a contiguous 16-token slab (what a GPU backend will copy/read as a unit).
// Position p of a sequence lives in block table[p / block_size], slot p % block_size.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace engine {

constexpr int64_t kBlockSize = 16;

class KvCache {
 public:
  // bytes of K+V memory one block needs across all layers.
  static size_t bytes_per_block(int64_t num_layers, int64_t num_kv_heads, int64_t head_dim);

  // Allocates num_blocks blocks (lazily zeroed pages: startup does not touch the memory).
  KvCache(int64_t num_layers, int64_t num_blocks, int64_t num_kv_heads, int64_t head_dim);

  int64_t num_blocks() const { return num_blocks_; }
  size_t total_bytes() const { return bytes_per_block(num_layers_, kv_heads_, head_dim_) * num_blocks_; }

  // Pointer to K (resp. V) of (layer, block, slot): num_kv_heads * head_dim floats.
  float* k(int64_t layer, int64_t block, int64_t slot) { return k_.get() + offset(layer, block, slot); }
  float* v(int64_t layer, int64_t block, int64_t slot) { return v_.get() + offset(layer, block, slot); }

 private:
  struct FreeDeleter { void operator()(float* p) const; };
  size_t offset(int64_t layer, int64_t block, int64_t slot) const {
    return (((size_t)layer * num_blocks_ + block) * kBlockSize + slot) * kv_heads_ * head_dim_;
  }
  int64_t num_layers_, num_blocks_, kv_heads_, head_dim_;
  std::unique_ptr<float, FreeDeleter> k_, v_;
};

}  // namespace engine
