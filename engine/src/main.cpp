// main.cpp — llm-engine: load a Hugging Face checkpoint, allocate the KV cache, serve
// PROTOCOL.md over a ZeroMQ ROUTER socket.
//
// Exit codes: 0 after SIGINT/SIGTERM; 1 on a bad model directory or startup failure (the
// message goes to stderr); 2 on a bad command line or a device this binary lacks.
#include <fcntl.h>
#include <omp.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include <algorithm>
#include <climits>
#include <csignal>
#include <cstdio>
#include <iostream>
#include <memory>

#include "common.h"
#include "config.h"
#include "cpu/cpu_model.h"
#include "engine.h"
#include "kv_cache.h"
#include "model.h"
#include "options.h"
#include "safetensors.h"
#include "server.h"
#include "sim/sim_backend.h"
#ifdef ENGINE_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace {

// The one piece of process-global state: the write end of the self-pipe the signal handler
// uses to wake the server loop (a handler may run on any thread, e.g. an OpenBLAS worker).
int g_signal_pipe_write = -1;

void on_signal(int signo) {
  const unsigned char b = (unsigned char)signo;
  ssize_t r = write(g_signal_pipe_write, &b, 1);
  (void)r;
}

// Returns the read end of a pipe that becomes readable on SIGINT/SIGTERM.
int install_signal_pipe() {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return -1;
  g_signal_pipe_write = fds[1];
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  return fds[0];
}

// The context length the engine serves: the model's, capped by --max-model-len.
int64_t context_length(const engine::Options& opt, const engine::ModelConfig& cfg) {
  return opt.max_model_len > 0 ? std::min(opt.max_model_len, cfg.max_position_embeddings) : cfg.max_position_embeddings;
}

// --device cpu: the f32 reference backend over the checkpoint's weights.
std::unique_ptr<engine::Engine> make_cpu_engine(const engine::Options& opt) {
  using namespace engine;
  ModelConfig cfg = load_config(opt.model_dir);
  TensorStore store = TensorStore::open_dir(opt.model_dir);
  ModelWeights w = load_weights(cfg, store);
  const std::string dtype = dtype_name(w.dtype);
  const int64_t max_pos = context_length(opt, cfg);
  const size_t per_block = KvCache::bytes_per_block(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim);
  const int64_t num_blocks = opt.num_blocks > 0 ? opt.num_blocks
                                                : (int64_t)((size_t)opt.kv_cache_bytes / per_block);
  auto backend = std::make_unique<cpu::CpuModel>(cfg, std::move(w), num_blocks,
                                                 opt.max_num_batched_tokens, max_pos);
  std::fprintf(stderr,
               "llm-engine: %s (%s) vocab=%lld hidden=%lld layers=%lld heads=%lld kv_heads=%lld "
               "head_dim=%lld intermediate=%lld max_pos=%lld dtype=%s | device=cpu threads=%d "
               "num_blocks=%lld kv_cache_bytes=%zu | endpoint=%s\n",
               cfg.architecture.c_str(), cfg.model_type.c_str(), (long long)cfg.vocab_size,
               (long long)cfg.hidden_size, (long long)cfg.num_layers, (long long)cfg.num_heads,
               (long long)cfg.num_kv_heads, (long long)cfg.head_dim, (long long)cfg.intermediate_size,
               (long long)max_pos, dtype.c_str(), omp_get_max_threads(), (long long)num_blocks,
               backend->kv_cache_bytes(), opt.endpoint.c_str());
  return std::make_unique<Engine>(std::move(cfg), std::move(backend), dtype, "cpu", max_pos);
}

// --device sim: config.json only (no weights are read); KV capacity and step times are those
// of the modelled shape on the modelled GPU (sim/sim_backend.h).
std::unique_ptr<engine::Engine> make_sim_engine(const engine::Options& opt) {
  using namespace engine;
  ModelConfig cfg = load_config(opt.model_dir);
  const int64_t max_pos = context_length(opt, cfg);
  sim::SimParams p;
  p.shape = opt.sim.shape == "config" ? sim::shape_from_config(cfg) : sim::shape_by_name(opt.sim.shape);
  p.bandwidth_gbps = opt.sim.bandwidth_gbps;
  p.tflops = opt.sim.tflops;
  p.bw_efficiency = opt.sim.bw_efficiency;
  p.flops_efficiency = opt.sim.flops_efficiency;
  p.overhead_us = opt.sim.overhead_us;
  p.time_scale = opt.sim.time_scale;
  p.eos_prob = opt.sim.eos_prob;
  // Sampled ids stay below the tokenizer's first added (special) token so that the runtime
  // detokenizes them as ordinary text.
  p.max_token_id = opt.sim.max_token_id > 0 ? opt.sim.max_token_id : sim::first_added_token_id(opt.model_dir);
  if (p.max_token_id < 0) p.max_token_id = 0;  // no tokenizer.json: the whole vocabulary
  p.text_ids = sim::text_token_ids(opt.model_dir, p.max_token_id);
  const double per_block = (double)kBlockSize * p.shape.kv_bytes_per_token();
  // Block ids are int32 on the wire and in tables; a tiny `config` shape could exceed that.
  const int64_t num_blocks = std::min<int64_t>(
      INT32_MAX, opt.num_blocks > 0            ? opt.num_blocks
                 : opt.kv_cache_bytes_given ? (int64_t)((double)opt.kv_cache_bytes / per_block)
                                            : sim::default_num_blocks(p.shape, opt.sim.memory_gb * 1e9));
  ENGINE_CHECK(num_blocks > 0, "internal",
               "sim: no KV block fits (shape " << p.shape.name << ", " << per_block << " bytes per block, "
                                               << p.shape.weight_bytes() << " bytes of weights)");
  auto backend = std::make_unique<sim::SimBackend>(cfg, p, num_blocks, opt.max_num_batched_tokens);
  std::fprintf(stderr,
               "llm-engine: %s (%s) vocab=%lld max_pos=%lld | device=sim shape=%s params=%.4g "
               "kv_bytes_per_token=%.0f bandwidth=%gGB/s*%g tflops=%g*%g overhead=%gus time_scale=%g "
               "eos_prob=%g token_ids<%lld num_blocks=%lld kv_cache_bytes=%zu | endpoint=%s\n",
               cfg.architecture.c_str(), cfg.model_type.c_str(), (long long)cfg.vocab_size, (long long)max_pos,
               p.shape.name.c_str(), p.shape.num_params(), p.shape.kv_bytes_per_token(), p.bandwidth_gbps,
               p.bw_efficiency, p.tflops, p.flops_efficiency, p.overhead_us, p.time_scale, p.eos_prob,
               (long long)backend->token_limit(), (long long)num_blocks, backend->kv_cache_bytes(),
               opt.endpoint.c_str());
  return std::make_unique<Engine>(std::move(cfg), std::move(backend), "bf16", "sim", max_pos);
}

#ifdef ENGINE_HAVE_CUDA
// --device cuda:N: bf16 weights and KV cache on the GPU (cuda/cuda_backend.h). KV blocks come
// from --gpu-memory-utilization of the device memory unless --num-blocks is given.
std::unique_ptr<engine::Engine> make_cuda_engine(const engine::Options& opt) {
  using namespace engine;
  ModelConfig cfg = load_config(opt.model_dir);
  TensorStore store = TensorStore::open_dir(opt.model_dir);
  const std::string dtype = dtype_name(store.get("model.embed_tokens.weight").dtype);
  const int64_t max_pos = context_length(opt, cfg);
  cuda::CudaOptions co;
  co.device = opt.cuda_device;
  co.gpu_memory_utilization = opt.gpu_memory_utilization;
  co.num_blocks = opt.num_blocks;
  co.max_tokens = opt.max_num_batched_tokens;
  co.max_pos = max_pos;
  auto backend = std::make_unique<cuda::CudaBackend>(cfg, store, co);
  std::fprintf(stderr,
               "llm-engine: %s (%s) vocab=%lld hidden=%lld layers=%lld heads=%lld kv_heads=%lld "
               "head_dim=%lld intermediate=%lld max_pos=%lld dtype=%s | device=%s %s "
               "num_blocks=%lld kv_cache_bytes=%zu | endpoint=%s\n",
               cfg.architecture.c_str(), cfg.model_type.c_str(), (long long)cfg.vocab_size,
               (long long)cfg.hidden_size, (long long)cfg.num_layers, (long long)cfg.num_heads,
               (long long)cfg.num_kv_heads, (long long)cfg.head_dim, (long long)cfg.intermediate_size,
               (long long)max_pos, dtype.c_str(), opt.device.c_str(), backend->device_description().c_str(),
               (long long)backend->num_blocks(), backend->kv_cache_bytes(), opt.endpoint.c_str());
  return std::make_unique<Engine>(std::move(cfg), std::move(backend), dtype, opt.device, max_pos);
}
#endif

}  // namespace

int main(int argc, char** argv) {
#ifdef __linux__
  // The runtime that spawned us owns our KV cache's meaning: if it dies (even by SIGKILL),
  // stop too instead of holding the device as an orphan.
  const pid_t parent = getppid();
  prctl(PR_SET_PDEATHSIG, SIGTERM);
  if (getppid() != parent) return 1;  // the parent died before prctl took effect
#endif
  using namespace engine;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (const auto& a : args)
    if (a == "--help" || a == "-h") { std::fputs(kUsage, stdout); return 0; }
  Options opt;
  try {
    opt = parse_options(args);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llm-engine: %s\n%s", e.what(), kUsage);
    return 2;
  }
#ifndef ENGINE_HAVE_CUDA
  if (opt.device.rfind("cuda", 0) == 0) {
    std::fprintf(stderr, "llm-engine: device %s not built in this binary\n", opt.device.c_str());
    return 2;
  }
#endif
  if (opt.device != "cpu" && opt.device != "sim" && opt.device.rfind("cuda:", 0) != 0) {
    std::fprintf(stderr, "llm-engine: unknown device %s (expected cpu, cuda:N or sim)\n", opt.device.c_str());
    return 2;
  }
  // OpenMP is the CPU backend's only thread pool (OpenBLAS runs single-threaded in it).
  if (opt.threads > 0) omp_set_num_threads((int)opt.threads);
  const int stop_fd = install_signal_pipe();

  std::unique_ptr<Engine> eng;
  try {
#ifdef ENGINE_HAVE_CUDA
    if (opt.device.rfind("cuda:", 0) == 0) eng = make_cuda_engine(opt);
    else
#endif
    eng = opt.device == "sim" ? make_sim_engine(opt) : make_cpu_engine(opt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llm-engine: failed to load model from %s: %s\n", opt.model_dir.c_str(), e.what());
    return 1;
  }

  try {
    serve(*eng, opt.endpoint, stop_fd);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llm-engine: %s\n", e.what());
    return 1;
  }
  return 0;
}
