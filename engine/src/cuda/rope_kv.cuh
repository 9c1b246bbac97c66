// cuda/rope_kv.cuh — the step between the QKV GEMM and attention, fused: q/k/v bias,
// Qwen3 per-head QK RMSNorm, RoPE (HF rotate_half, angles from rope_table), then q -> bf16
// [T, H, D] and k/v -> the paged bf16 KV cache.
//
// KV cache layout (per layer, K and V separately): [num_blocks][num_kv_heads][16][D] bf16.
// Position p of a sequence is block block_table[p / 16], slot p % 16; the step's
// slot_mapping[t] = block * 16 + slot (or -1 for a padding token: nothing is written).
#pragma once

#include "cuda/common.cuh"

namespace engine::cuda {

constexpr int kRopeWarps = 4;
constexpr int kMaxHeadDim = 256;

// Grid (token, group of kRopeWarps heads), one warp per head (q heads, then k heads, then v
// heads): a decode step of one token spreads its H + 2·KV heads over that many / 4 blocks
// instead of running the whole layer's RoPE on one SM.
static __global__ void qkv_rope_kv_kernel(const float* __restrict__ qkv, const float* __restrict__ bias,
                                   const float* __restrict__ q_norm, const float* __restrict__ k_norm,
                                   const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                   const int32_t* __restrict__ slot_mapping, bf16* __restrict__ q_out,
                                   bf16* __restrict__ k_cache, bf16* __restrict__ v_cache, int H, int KV, int D,
                                   float eps) {
  __shared__ float buf[kRopeWarps][kMaxHeadDim];
  const int t = blockIdx.x, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int half = D / 2, qkv_dim = (H + 2 * KV) * D;
  const int slot = slot_mapping[t];
  float* b = buf[warp];
  for (int hh = blockIdx.y * kRopeWarps + warp; hh < H + 2 * KV; hh += gridDim.y * kRopeWarps) {
    const float* src = qkv + (size_t)t * qkv_dim + (size_t)hh * D;
    float ss = 0.f;
    for (int d = lane; d < D; d += kWarp) {
      float v = src[d];
      if (bias) v += bias[hh * D + d];
      b[d] = v;
      ss += v * v;
    }
    const bool is_v = hh >= H + KV;
    if (q_norm && !is_v) {
      const float* nw = hh < H ? q_norm : k_norm;
      const float inv = rsqrtf(warp_sum(ss) / (float)D + eps);
      for (int d = lane; d < D; d += kWarp) b[d] = b[d] * inv * nw[d];
    }
    __syncwarp();
    bf16* dst;
    if (hh < H) {
      dst = q_out + ((size_t)t * H + hh) * D;
    } else {
      if (slot < 0) { __syncwarp(); continue; }
      const int kvh = is_v ? hh - H - KV : hh - H;
      const size_t off = (((size_t)(slot / 16) * KV + kvh) * 16 + (slot % 16)) * D;
      dst = (is_v ? v_cache : k_cache) + off;
    }
    if (is_v) {
      for (int d = lane; d < D; d += kWarp) dst[d] = __float2bfloat16_rn(b[d]);
    } else {
      const float* c = cos_t + (size_t)t * half;
      const float* s = sin_t + (size_t)t * half;
      for (int i = lane; i < half; i += kWarp) {
        const float x0 = b[i], x1 = b[i + half];
        dst[i] = __float2bfloat16_rn(x0 * c[i] - x1 * s[i]);
        dst[i + half] = __float2bfloat16_rn(x1 * c[i] + x0 * s[i]);
      }
    }
    __syncwarp();  // b is rewritten by this warp's next head
  }
}

inline void qkv_rope_kv(const float* qkv, const float* bias, const float* q_norm, const float* k_norm,
                        const float* cos_t, const float* sin_t, const int32_t* slot_mapping, bf16* q_out,
                        bf16* k_cache, bf16* v_cache, int T, int H, int KV, int D, float eps, cudaStream_t st) {
  ENGINE_CHECK(D % 2 == 0 && D <= kMaxHeadDim, "internal", "qkv_rope_kv: head_dim " << D << " unsupported");
  ENGINE_CHECK((q_norm == nullptr) == (k_norm == nullptr), "internal", "qkv_rope_kv: q_norm/k_norm mismatch");
  if (T <= 0) return;
  const dim3 grid((unsigned)T, (unsigned)((H + 2 * KV + kRopeWarps - 1) / kRopeWarps));
  qkv_rope_kv_kernel<<<grid, kRopeWarps * kWarp, 0, st>>>(qkv, bias, q_norm, k_norm, cos_t, sin_t, slot_mapping,
                                                          q_out, k_cache, v_cache, H, KV, D, eps);
  CUDA_CHECK_LAUNCH();
}

}  // namespace engine::cuda
