// options.cpp — see options.h.
#include "options.h"

#include <stdexcept>

namespace engine {

const char* const kUsage =
    "usage: llm-engine --model DIR --endpoint ipc:///path.sock|tcp://HOST:PORT\n"
    "                  [--device cpu] [--kv-cache-bytes N] [--num-blocks N] [--threads N]\n"
    "                  [--max-num-batched-tokens N] [--max-model-len N]\n";

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
    else if (a == "--endpoint") o.endpoint = value();
    else if (a == "--kv-cache-bytes") o.kv_cache_bytes = parse_int(a, value(), 1);
    else if (a == "--num-blocks") o.num_blocks = parse_int(a, value(), 1);
    else if (a == "--threads") o.threads = parse_int(a, value(), 1);
    else if (a == "--max-num-batched-tokens") o.max_num_batched_tokens = parse_int(a, value(), 1);
    else if (a == "--max-model-len") o.max_model_len = parse_int(a, value(), 1);
    else throw std::invalid_argument("unknown argument " + a);
  }
  if (o.model_dir.empty()) throw std::invalid_argument("--model is required");
  if (o.endpoint.empty()) throw std::invalid_argument("--endpoint is required");
  return o;
}

}  // namespace engine
