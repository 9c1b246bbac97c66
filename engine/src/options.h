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
  bool kv_cache_bytes_given = false;     // --kv-cache-bytes was on the command line (sim's
                                         // default budget differs: see SimOptions)
  int64_t num_blocks = 0;                // --num-blocks N: overrides the budget when > 0
  int64_t threads = 0;                   // --threads N: OpenMP + OpenBLAS threads; 0 = all cores
  int64_t max_num_batched_tokens = 2048; // --max-num-batched-tokens N: tokens per forward pass
  int64_t max_model_len = 0;             // --max-model-len N: caps max_position_embeddings; 0 = off
  int cuda_device = 0;                   // N of --device cuda:N
  double gpu_memory_utilization = 0.9;   // --gpu-memory-utilization F in (0, 1]: KV sizing (cuda)

  // --device sim only (ignored otherwise); see sim/sim_backend.h and README "sim device".
  struct SimOptions {
    std::string shape = "llama-3.1-8b";  // --sim-shape llama-3.1-8b | qwen3-0.6b | config
    double bandwidth_gbps = 3350;        // --sim-bandwidth-gbps: peak memory bandwidth, GB/s
    double tflops = 989;                 // --sim-tflops: peak dense bf16 TFLOP/s
    double bw_efficiency = 0.8;          // --sim-bw-efficiency (0, 1]
    double flops_efficiency = 0.6;       // --sim-flops-efficiency (0, 1]
    double overhead_us = 250;            // --sim-overhead-us: fixed cost per forward pass
    double time_scale = 1.0;             // --sim-time-scale: multiplies the modelled time; 0 = no sleep
    double eos_prob = 0.0;               // --sim-eos-prob [0, 1]: EOS chance per sampled token
    int64_t max_token_id = 0;            // --sim-max-token-id N: sampled ids < N; 0 = from tokenizer.json
    double memory_gb = 80;               // --sim-memory-gb: device memory for the default KV budget
  } sim;
};

// Parses argv. Throws std::invalid_argument with a usage message on any error.
Options parse_options(const std::vector<std::string>& args);

extern const char* const kUsage;

}  // namespace engine
