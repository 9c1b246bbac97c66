// options.cpp — see options.h.
#include "options.h"

#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace engine {

const char* const kUsage =
    "usage: llm-engine --model DIR --endpoint ipc:///path.sock|tcp://HOST:PORT\n"
    "                  [--device cpu] [--kv-cache-bytes N] [--num-blocks N] [--threads N]\n"
    "                  [--max-num-batched-tokens N] [--max-model-len N]\n"
    "  --device cuda:N: [--gpu-memory-utilization F (default 0.9)] [--num-blocks N]\n"
    "  --device sim:   [--sim-shape llama-3.1-8b|qwen3-0.6b|config] [--sim-bandwidth-gbps X]\n"
    "                  [--sim-tflops X] [--sim-bw-efficiency X] [--sim-flops-efficiency X]\n"
    "                  [--sim-overhead-us X] [--sim-time-scale X] [--sim-eos-prob X]\n"
    "                  [--sim-max-token-id N] [--sim-memory-gb X]\n";

static constexpr double kInf = std::numeric_limits<double>::infinity();

static int64_t parse_int(const std::string& flag, const std::string& v, int64_t min) {
  size_t used = 0;
  long long x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != v.size() || x < min)
    throw std::invalid_argument(flag + " needs an integer >= " + std::to_string(min) + ", got \"" + v + "\"");
  return x;
}

// A finite number in [min, max]; min_open excludes min itself.
static double parse_double(const std::string& flag, const std::string& v, double min, double max, bool min_open) {
  size_t used = 0;
  double x = 0;
  try {
    x = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  const bool ok = used != 0 && used == v.size() && std::isfinite(x) && (min_open ? x > min : x >= min) && x <= max;
  if (!ok) {
    std::ostringstream m;
    m << flag << " needs a number " << (min_open ? "> " : ">= ") << min;
    if (!std::isinf(max)) m << " and <= " << max;
    m << ", got \"" << v << "\"";
    throw std::invalid_argument(m.str());
  }
  return x;
}

Options parse_options(const std::vector<std::string>& args) {
  Options o;
  for (size_t i = 0; i < args.size(); i++) {
    const std::string& a = args[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= args.size()) throw std::invalid_argument(a + " needs a value");
      return args[++i];
    };
    if (a == "--model") o.model_dir = value();
    else if (a == "--device") o.device = value();
    else if (a == "--gpu-memory-utilization") o.gpu_memory_utilization = parse_double(a, value(), 0, 1, true);
    else if (a == "--endpoint") o.endpoint = value();
    else if (a == "--kv-cache-bytes") { o.kv_cache_bytes = parse_int(a, value(), 1); o.kv_cache_bytes_given = true; }
    else if (a == "--num-blocks") o.num_blocks = parse_int(a, value(), 1);
    else if (a == "--threads") o.threads = parse_int(a, value(), 1);
    else if (a == "--max-num-batched-tokens") o.max_num_batched_tokens = parse_int(a, value(), 1);
    else if (a == "--max-model-len") o.max_model_len = parse_int(a, value(), 1);
    else if (a == "--sim-shape") {
      o.sim.shape = value();
      if (o.sim.shape != "llama-3.1-8b" && o.sim.shape != "qwen3-0.6b" && o.sim.shape != "config")
        throw std::invalid_argument("--sim-shape must be llama-3.1-8b, qwen3-0.6b or config, got \"" + o.sim.shape + "\"");
    }
    else if (a == "--sim-bandwidth-gbps") o.sim.bandwidth_gbps = parse_double(a, value(), 0, kInf, true);
    else if (a == "--sim-tflops") o.sim.tflops = parse_double(a, value(), 0, kInf, true);
    else if (a == "--sim-bw-efficiency") o.sim.bw_efficiency = parse_double(a, value(), 0, 1, true);
    else if (a == "--sim-flops-efficiency") o.sim.flops_efficiency = parse_double(a, value(), 0, 1, true);
    else if (a == "--sim-overhead-us") o.sim.overhead_us = parse_double(a, value(), 0, kInf, false);
    else if (a == "--sim-time-scale") o.sim.time_scale = parse_double(a, value(), 0, kInf, false);
    else if (a == "--sim-eos-prob") o.sim.eos_prob = parse_double(a, value(), 0, 1, false);
    else if (a == "--sim-max-token-id") o.sim.max_token_id = parse_int(a, value(), 1);
    else if (a == "--sim-memory-gb") o.sim.memory_gb = parse_double(a, value(), 0, kInf, true);
    else throw std::invalid_argument("unknown argument " + a);
  }
  if (o.model_dir.empty()) throw std::invalid_argument("--model is required");
  if (o.endpoint.empty()) throw std::invalid_argument("--endpoint is required");
  if (o.device.rfind("cuda", 0) == 0) {  // cuda or cuda:N
    const std::string n = o.device == "cuda" ? "0" : o.device.rfind("cuda:", 0) == 0 ? o.device.substr(5) : "";
    o.cuda_device = (int)parse_int("--device cuda:N", n, 0);
    o.device = "cuda:" + std::to_string(o.cuda_device);
  }
  return o;
}

}  // namespace engine
