// kv_cache.cpp — see kv_cache.h.
#include "kv_cache.h"

#include <cstdlib>

#include "common.h"

namespace engine {

size_t KvCache::bytes_per_block(int64_t num_layers, int64_t num_kv_heads, int64_t head_dim) {
  return 2 /* K and V */ * (size_t)num_layers * kBlockSize * num_kv_heads * head_dim * sizeof(float);
}

void KvCache::FreeDeleter::operator()(float* p) const { std::free(p); }

KvCache::KvCache(int64_t num_layers, int64_t num_blocks, int64_t num_kv_heads, int64_t head_dim)
    : num_layers_(num_layers), num_blocks_(num_blocks), kv_heads_(num_kv_heads), head_dim_(head_dim) {
  ENGINE_CHECK(num_blocks > 0, "internal", "KV cache needs at least one block (got " << num_blocks
                                               << "); raise --kv-cache-bytes or --num-blocks");
  const size_t n = (size_t)num_layers * num_blocks * kBlockSize * num_kv_heads * head_dim;
  // calloc of a large size maps fresh zero pages without touching them: fast startup.
  k_.reset((float*)std::calloc(n, sizeof(float)));
  v_.reset((float*)std::calloc(n, sizeof(float)));
  ENGINE_CHECK(k_ && v_, "internal", "cannot allocate KV cache of " << total_bytes() << " bytes");
}

}  // namespace engine
