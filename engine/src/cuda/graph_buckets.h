// cuda/graph_buckets.h — which captured CUDA graph a decode step of n sequences runs as.
// Host-only (no CUDA), so the CPU tests check it.
#pragma once

namespace engine::cuda {

// Largest decode batch run from a captured graph; larger steps run eagerly.
constexpr int kMaxGraphBatch = 256;

// The padded batch size of a decode step of `n` sequences: 1, 2, 4, then the next multiple
// of 8 up to kMaxGraphBatch (vLLM's capture sizes), so a step of 129 runs as 136, not 256.
// 0: no graph (n is 0, above kMaxGraphBatch, or the padded size exceeds `max_tokens`).
inline int decode_graph_bucket(int n, int max_tokens) {
  if (n <= 0 || n > kMaxGraphBatch) return 0;
  const int b = n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : (n + 7) / 8 * 8;
  return b <= max_tokens ? b : 0;
}

}  // namespace engine::cuda
