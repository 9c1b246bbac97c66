// cuda/elementwise.cuh — embedding gather, RMSNorm (optionally fused with the residual add
// and a row gather), SwiGLU, RoPE angle table. Kernels first, then launchers.
#pragma once

#include "cuda/common.cuh"

namespace engine::cuda {

// ---- kernels ------------------------------------------------------------------------------

// x[t, :] = f32(embed[tokens[t], :]). One block per token; 8 bf16 (16 bytes) per load.
static __global__ void embedding_kernel(const int32_t* __restrict__ tokens, const bf16* __restrict__ embed,
                                 float* __restrict__ x, int hidden) {
  const int t = blockIdx.x;
  const bf16* src = embed + (size_t)tokens[t] * hidden;
  float* dst = x + (size_t)t * hidden;
  for (int c = threadIdx.x; c < hidden / 8; c += blockDim.x) {
    const Bf16x8 v = reinterpret_cast<const Bf16x8*>(src)[c];
    float f[8];
    bf16x8_to_f32(v, f);
    reinterpret_cast<float4*>(dst)[2 * c] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(dst)[2 * c + 1] = make_float4(f[4], f[5], f[6], f[7]);
  }
}

// Output row r reads residual-stream row src = row_idx ? row_idx[r] : r:
//   v = x[src] (+ delta[src]; written back to x[src] only when row_idx is null)
//   y = v / sqrt(mean(v^2) + eps) * w  ->  out_bf16[r] (and out_f32[r] when given).
// One block per output row; float4 loads (n % 4 == 0, checked by the launcher).
static __global__ void rmsnorm_kernel(float* __restrict__ x, const float* __restrict__ delta,
                               const int32_t* __restrict__ row_idx, const float* __restrict__ w,
                               bf16* __restrict__ out, float* __restrict__ out_f32, int n, float eps) {
  __shared__ float scratch[33];
  const int r = blockIdx.x;
  const int src = row_idx ? row_idx[r] : r;
  float4* xr = reinterpret_cast<float4*>(x + (size_t)src * n);
  const float4* dr = delta ? reinterpret_cast<const float4*>(delta + (size_t)src * n) : nullptr;
  const int n4 = n / 4;
  float ss = 0.f;
  for (int c = threadIdx.x; c < n4; c += blockDim.x) {
    float4 v = xr[c];
    if (dr) {
      const float4 d = dr[c];
      v.x += d.x; v.y += d.y; v.z += d.z; v.w += d.w;
      if (!row_idx) xr[c] = v;
    }
    ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / (float)n + eps);
  for (int c = threadIdx.x; c < n4; c += blockDim.x) {
    float4 v = xr[c];
    if (dr && row_idx) {  // the sum was not written back: redo it
      const float4 d = dr[c];
      v.x += d.x; v.y += d.y; v.z += d.z; v.w += d.w;
    }
    const float4 wv = reinterpret_cast<const float4*>(w)[c];
    const float y0 = v.x * inv * wv.x, y1 = v.y * inv * wv.y, y2 = v.z * inv * wv.z, y3 = v.w * inv * wv.w;
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(out + (size_t)r * n) + 2 * c;
    o[0] = __floats2bfloat162_rn(y0, y1);
    o[1] = __floats2bfloat162_rn(y2, y3);
    if (out_f32) reinterpret_cast<float4*>(out_f32 + (size_t)r * n)[c] = make_float4(y0, y1, y2, y3);
  }
}

// act[t, i] = silu(gu[t, i]) * gu[t, I + i], i < I; gu f32 [T, 2I], act bf16 [T, I].
static __global__ void swiglu_kernel(const float* __restrict__ gu, bf16* __restrict__ act, int T, int I) {
  const int I4 = I / 4;
  const int64_t total = (int64_t)T * I4;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = e / I4, c = e % I4;
    const float4 g = reinterpret_cast<const float4*>(gu + t * 2 * I)[c];
    const float4 u = reinterpret_cast<const float4*>(gu + t * 2 * I + I)[c];
    const float a0 = g.x / (1.f + expf(-g.x)) * u.x, a1 = g.y / (1.f + expf(-g.y)) * u.y;
    const float a2 = g.z / (1.f + expf(-g.z)) * u.z, a3 = g.w / (1.f + expf(-g.w)) * u.w;
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(act + t * I) + 2 * c;
    o[0] = __floats2bfloat162_rn(a0, a1);
    o[1] = __floats2bfloat162_rn(a2, a3);
  }
}

// cos/sin[t, i] of angle (f32)(pos[t] * inv_freq[i]), taken in f64 like the CPU backend.
static __global__ void rope_table_kernel(const int32_t* __restrict__ pos, const float* __restrict__ inv_freq,
                                  float* __restrict__ cos_out, float* __restrict__ sin_out, int T, int half) {
  const int64_t total = (int64_t)T * half;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int t = (int)(e / half), i = (int)(e % half);
    const float ang = (float)pos[t] * inv_freq[i];
    double s, c;
    sincos((double)ang, &s, &c);
    cos_out[e] = (float)c;
    sin_out[e] = (float)s;
  }
}

// out[i] = bf16(in[i]).
static __global__ void f32_to_bf16_kernel(const float* __restrict__ in, bf16* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}

// ---- launchers ----------------------------------------------------------------------------

inline void embedding(const int32_t* tokens, const bf16* embed, float* x, int T, int hidden, cudaStream_t st) {
  ENGINE_CHECK(hidden % 8 == 0, "internal", "embedding: hidden " << hidden << " must be a multiple of 8");
  if (T <= 0) return;
  embedding_kernel<<<T, 128, 0, st>>>(tokens, embed, x, hidden);
  CUDA_CHECK_LAUNCH();
}

inline void rmsnorm(float* x, const float* delta, const int32_t* row_idx, const float* w, bf16* out,
                    float* out_f32, int rows, int n, float eps, cudaStream_t st) {
  ENGINE_CHECK(n % 4 == 0, "internal", "rmsnorm: n " << n << " must be a multiple of 4");
  if (rows <= 0) return;
  const int threads = n >= 4096 ? 512 : n >= 1024 ? 256 : 128;
  rmsnorm_kernel<<<rows, threads, 0, st>>>(x, delta, row_idx, w, out, out_f32, n, eps);
  CUDA_CHECK_LAUNCH();
}

inline void swiglu(const float* gu, bf16* act, int T, int I, cudaStream_t st) {
  ENGINE_CHECK(I % 4 == 0, "internal", "swiglu: intermediate " << I << " must be a multiple of 4");
  if (T <= 0) return;
  const int64_t total = (int64_t)T * I / 4;
  const int blocks = (int)std::min<int64_t>(ceil_div(total, 256), 4096);
  swiglu_kernel<<<blocks, 256, 0, st>>>(gu, act, T, I);
  CUDA_CHECK_LAUNCH();
}

inline void rope_table(const int32_t* pos, const float* inv_freq, float* cos_out, float* sin_out, int T, int half,
                       cudaStream_t st) {
  if (T <= 0) return;
  const int blocks = (int)std::min<int64_t>(ceil_div((int64_t)T * half, 256), 1024);
  rope_table_kernel<<<blocks, 256, 0, st>>>(pos, inv_freq, cos_out, sin_out, T, half);
  CUDA_CHECK_LAUNCH();
}

inline void f32_to_bf16(const float* in, bf16* out, int64_t n, cudaStream_t st) {
  if (n <= 0) return;
  const int blocks = (int)std::min<int64_t>(ceil_div(n, 256), 4096);
  f32_to_bf16_kernel<<<blocks, 256, 0, st>>>(in, out, n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace engine::cuda
