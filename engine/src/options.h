// options.h — llm-engine command line.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace engine {

struct Options {
  std::string model_dir;                 // --model DIR (required)
  std::string device = "cpu";            // --device cpu | cuda:N | sim
  std::string endpoint;                  // --endpoint ipc:///path.sock | tcp://host:port (required)
  int64_t kv_cache_bytes = 268435456;    // --kv-cache-bytes N: KV memory budget
  int64_t num_blocks = 0;                // --num-blocks N: overrides the budget when > 0
  int64_t threads = 0;                   // --threads N: OpenMP + OpenBLAS threads; 0 = all cores
  int64_t max_num_batched_tokens = 2048; // --max-num-batched-tokens N: tokens per forward pass
  int64_t max_model_len = 0;             // --max-model-len N: caps max_position_embeddings; 0 = off
};

// Parses argv. Throws std::invalid_argument with a usage message on any error.
Options parse_options(const std::vector<std::string>& args);

extern const char* const kUsage;

}  // namespace engine
