// cuda/attention.cuh — causal attention over the paged bf16 KV cache, for decode and for
// (chunked) prefill alike, flash-decoding style.
//
// Work decomposition: a "work item" is a tile of up to kQR = 16 query rows of ONE sequence
// and ONE kv head: nt consecutive tokens x nh q heads of that kv head's group (GQA: the K/V
// tile loaded into shared memory serves every q head of the group). Decode: nt = 1 and
// nh = group (heads beyond 16 make more items); prefill: nh = min(group, 16), nt = 16 / nh.
// Grid = (items, kv_heads, splits). Split s of an item covers keys
// [s*part, min((s+1)*part, ctx)), part = ceil(ctx / splits) rounded up to the key tile,
// ctx = position of the item's last token + 1. Each row masks keys beyond its own position
// (causal; the prefix before start_pos is read from the cache like any other key).
// splits == 1: the kernel writes the normalised output; otherwise it writes (m, l, acc)
// partials and attn_combine merges them (log-sum-exp in base 2).
// SIMT fp32 math on bf16 K/V/Q (tensor-core prefill is future work, see README).
#pragma once

#include "cuda/common.cuh"

namespace engine::cuda {

struct AttnItem {
  int32_t t0;   // flat index of the first token
  int32_t nt;   // tokens in the tile
  int32_t h0;   // first q head within the kv head's group
  int32_t nh;   // q heads in the tile
  int32_t seq;  // sequence index (block table)
  int32_t pad[3];
};

struct AttnParams {
  const bf16* q;               // [T, H, D]
  const bf16* k_cache;         // this layer: [num_blocks, KV, 16, D]
  const bf16* v_cache;
  const int32_t* positions;    // [T]
  const AttnItem* items;       // [n_items]
  const int32_t* bt_offsets;   // [n_seqs]: offset of each sequence's table in block_tables
  const int32_t* block_tables;
  bf16* out;                   // [T, H, D]
  float* part_acc;             // [T * H * splits, D]   (splits > 1)
  float* part_ml;              // [T * H * splits, 2]
  int H, KV, group, splits;
  float scale_log2;            // log2(e) / sqrt(D)
};

constexpr int kAttnThreads = 128;
constexpr int kAttnQR = 16;

template <int D>
struct AttnShape {
  static constexpr int KT = D <= 128 ? 32 : 16;            // keys per tile
  static constexpr int KPAD = D + 8;                        // smem K row (bank spread)
  static constexpr int ACC = kAttnQR * D / kAttnThreads;    // outputs per thread
  static constexpr int SROWS = kAttnQR * KT / kAttnThreads; // score rows per thread
  static constexpr int RSTEP = kAttnThreads / KT;
  static_assert(ACC >= 1 && (kAttnQR * D) % kAttnThreads == 0, "head_dim");
  static_assert(D % 8 == 0, "head_dim must be a multiple of 8");
};

// Keys [kbeg, kend) of split `split` of an item: ceil(ctx / splits) rounded up to the key
// tile, ctx = the position of the item's last token + 1. Shared by both kernel versions.
template <int KT>
__device__ __forceinline__ void split_key_range(const AttnParams& p, const AttnItem& it, int split, int& kbeg,
                                                int& kend) {
  const int ctx = p.positions[it.t0 + it.nt - 1] + 1;
  int part = (int)ceil_div_dev(ctx, p.splits);
  part = (part + KT - 1) / KT * KT;
  kbeg = split * part;
  kend = min(ctx, kbeg + part);
}

// Loads keys [k0, k0 + KT) of kv head g into k_s / v_s in 16-byte pieces, zeros past kend.
// Every thread of the block takes part. Shared by both kernel versions.
template <int D, int KT, int KPAD>
__device__ __forceinline__ void load_kv_tile(const AttnParams& p, const int32_t* bt, int g, int k0, int kend,
                                             int tid, bf16 (*k_s)[KPAD], bf16 (*v_s)[D]) {
  for (int e = tid; e < KT * (D / 8); e += kAttnThreads) {
    const int kk = e / (D / 8), c = e % (D / 8);
    const int pos = k0 + kk;
    Bf16x8 kv{}, vv{};
    if (pos < kend) {
      const int blk = bt[pos >> 4];
      const size_t off = (((size_t)blk * p.KV + g) * 16 + (pos & 15)) * D + c * 8;
      kv = *reinterpret_cast<const Bf16x8*>(p.k_cache + off);
      vv = *reinterpret_cast<const Bf16x8*>(p.v_cache + off);
    } else {
      const __nv_bfloat162 z = __floats2bfloat162_rn(0.f, 0.f);
      kv.h[0] = kv.h[1] = kv.h[2] = kv.h[3] = z;
      vv = kv;
    }
    *reinterpret_cast<Bf16x8*>(&k_s[kk][c * 8]) = kv;
    *reinterpret_cast<Bf16x8*>(&v_s[kk][c * 8]) = vv;
  }
}

template <int D>
__global__ void __launch_bounds__(kAttnThreads) paged_attention_kernel(const AttnParams p) {
  using S = AttnShape<D>;
  constexpr int KT = S::KT;
  __shared__ __align__(16) float q_s[kAttnQR][D];
  __shared__ __align__(16) bf16 k_s[KT][S::KPAD];
  __shared__ __align__(16) bf16 v_s[KT][D];
  __shared__ float p_s[kAttnQR][KT + 1];
  __shared__ float m_s[kAttnQR], l_s[kAttnQR], alpha_s[kAttnQR];
  __shared__ int pos_s[kAttnQR];

  const AttnItem it = p.items[blockIdx.x];
  const int g = blockIdx.y, split = blockIdx.z, tid = threadIdx.x;
  const int nrows = it.nt * it.nh;

  for (int e = tid; e < kAttnQR * D; e += kAttnThreads) {
    const int r = e / D, d = e % D;
    float v = 0.f;
    if (r < nrows) {
      const int tok = it.t0 + r / it.nh, hq = g * p.group + it.h0 + r % it.nh;
      v = __bfloat162float(p.q[((size_t)tok * p.H + hq) * D + d]) * p.scale_log2;
    }
    q_s[r][d] = v;
  }
  if (tid < kAttnQR) {
    pos_s[tid] = tid < nrows ? p.positions[it.t0 + tid / it.nh] : -1;
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  int kbeg, kend;
  split_key_range<KT>(p, it, split, kbeg, kend);
  const int32_t* bt = p.block_tables + p.bt_offsets[it.seq];

  float acc[S::ACC];
#pragma unroll
  for (int i = 0; i < S::ACC; i++) acc[i] = 0.f;

  for (int k0 = kbeg; k0 < kend; k0 += KT) {
    __syncthreads();  // previous tile fully consumed (and q_s/pos_s/m_s ready on entry)
    load_kv_tile<D, KT, S::KPAD>(p, bt, g, k0, kend, tid, k_s, v_s);
    __syncthreads();

    // Scores: thread -> key (tid % KT), rows rg, rg + RSTEP, ...
    {
      const int key = tid % KT, rg = tid / KT;
      float dot[S::SROWS];
#pragma unroll
      for (int i = 0; i < S::SROWS; i++) dot[i] = 0.f;
#pragma unroll 4
      for (int c = 0; c < D / 8; c++) {
        float kf[8];
        bf16x8_to_f32(*reinterpret_cast<const Bf16x8*>(&k_s[key][c * 8]), kf);
#pragma unroll
        for (int i = 0; i < S::SROWS; i++) {
          const float4 qa = *reinterpret_cast<const float4*>(&q_s[rg + i * S::RSTEP][c * 8]);
          const float4 qb = *reinterpret_cast<const float4*>(&q_s[rg + i * S::RSTEP][c * 8 + 4]);
          dot[i] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] + qb.y * kf[5] +
                    qb.z * kf[6] + qb.w * kf[7];
        }
      }
      const int pos = k0 + key;
#pragma unroll
      for (int i = 0; i < S::SROWS; i++) {
        const int r = rg + i * S::RSTEP;
        p_s[r][key] = (pos < kend && pos <= pos_s[r]) ? dot[i] : -INFINITY;
      }
    }
    __syncthreads();

    // Online softmax: warp w owns rows w, w + 4, ...
    {
      const int warp = tid / kWarp, lane = tid % kWarp;
      for (int r = warp; r < kAttnQR; r += kAttnThreads / kWarp) {
        const float sc = lane < KT ? p_s[r][lane] : -INFINITY;
        const float m_old = m_s[r];
        const float m_new = fmaxf(m_old, warp_max(sc));
        float pr = 0.f, alpha = 1.f;
        if (m_new != -INFINITY) {
          pr = exp2f(sc - m_new);            // exp2(-inf) = 0
          alpha = exp2f(m_old - m_new);
        }
        const float sum = warp_sum(pr);
        if (lane < KT) p_s[r][lane] = pr;
        if (lane == 0) {
          l_s[r] = l_s[r] * alpha + sum;
          m_s[r] = m_new;
          alpha_s[r] = alpha;
        }
      }
    }
    __syncthreads();

    // acc = acc * alpha + P · V
#pragma unroll
    for (int i = 0; i < S::ACC; i++) {
      const int e = tid + i * kAttnThreads, r = e / D, d = e % D;
      float a = acc[i] * alpha_s[r];
#pragma unroll 8
      for (int kk = 0; kk < KT; kk++) a += p_s[r][kk] * __bfloat162float(v_s[kk][d]);
      acc[i] = a;
    }
  }
  __syncthreads();

#pragma unroll
  for (int i = 0; i < S::ACC; i++) {
    const int e = tid + i * kAttnThreads, r = e / D, d = e % D;
    if (r >= nrows) continue;
    const int tok = it.t0 + r / it.nh, hq = g * p.group + it.h0 + r % it.nh;
    const size_t row = (size_t)tok * p.H + hq;
    if (p.splits == 1) {
      const float l = l_s[r];
      p.out[row * D + d] = __float2bfloat16_rn(l > 0.f ? acc[i] / l : 0.f);
    } else {
      const size_t prow = row * p.splits + split;
      p.part_acc[prow * D + d] = acc[i];
      if (d == 0) {
        p.part_ml[prow * 2] = m_s[r];
        p.part_ml[prow * 2 + 1] = l_s[r];
      }
    }
  }
}

// ---- version 2 ----------------------------------------------------------------------------
// The same work items, splits and outputs as version 1, with two changes (found by reading
// version 1's PTX: two shared-memory loads per FMA in P·V, and 16 rows of work per item when a
// decode item has only `group` real rows):
// - every phase is bounded by the item's real rows (nrows = nt * nh), so a decode item of
//   group 4 does a quarter of version 1's score and P·V work;
// - P is stored transposed (pT_s[key][row]) and P·V runs keys outermost: each thread loads its
//   V element once per key and the probabilities of its rows as broadcast loads (float4 when
//   its rows are consecutive, head_dim >= 128), then does NR * DPT FMAs from registers.
// The default since the first device run (H200, 2026-12-04: cuda_tests passed with both;
// decode B=64 ctx=4096 0.53 ms against version 1's 1.85 ms, B=1 ctx=32768 0.18 against 0.35).
// ENGINE_CUDA_ATTENTION=1 selects version 1.

template <int D>
struct AttnShape2 {
  static constexpr int KT = AttnShape<D>::KT;
  static constexpr int KPAD = AttnShape<D>::KPAD;
  static constexpr int SROWS = AttnShape<D>::SROWS;
  static constexpr int RSTEP = AttnShape<D>::RSTEP;
  static constexpr int DW = D < kAttnThreads ? D : kAttnThreads;  // threads across one row's dims
  static constexpr int DPT = D / DW;                              // dims per thread
  static constexpr int RS = kAttnThreads / DW;                    // row stride between a thread's rows
  static constexpr int NR = kAttnQR / RS;                         // rows per thread
  static constexpr int PPAD = kAttnQR + 4;                        // pT_s row: 16-byte aligned, banks spread
  static_assert(DPT * DW == D && NR * RS == kAttnQR, "head_dim");
};

template <int D>
__global__ void __launch_bounds__(kAttnThreads) paged_attention_v2_kernel(const AttnParams p) {
  using S = AttnShape2<D>;
  constexpr int KT = S::KT;
  __shared__ __align__(16) float q_s[kAttnQR][D];
  __shared__ __align__(16) bf16 k_s[KT][S::KPAD];
  __shared__ __align__(16) bf16 v_s[KT][D];
  __shared__ __align__(16) float pT_s[KT][S::PPAD];
  __shared__ float m_s[kAttnQR], l_s[kAttnQR], alpha_s[kAttnQR];
  __shared__ int pos_s[kAttnQR];

  const AttnItem it = p.items[blockIdx.x];
  const int g = blockIdx.y, split = blockIdx.z, tid = threadIdx.x;
  const int nrows = it.nt * it.nh;

  for (int e = tid; e < nrows * D; e += kAttnThreads) {
    const int r = e / D, d = e % D;
    const int tok = it.t0 + r / it.nh, hq = g * p.group + it.h0 + r % it.nh;
    q_s[r][d] = __bfloat162float(p.q[((size_t)tok * p.H + hq) * D + d]) * p.scale_log2;
  }
  if (tid < kAttnQR) {
    pos_s[tid] = tid < nrows ? p.positions[it.t0 + tid / it.nh] : -1;
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
    alpha_s[tid] = 1.f;
  }
  int kbeg, kend;
  split_key_range<KT>(p, it, split, kbeg, kend);
  const int32_t* bt = p.block_tables + p.bt_offsets[it.seq];
  const int d0 = tid % S::DW, r0 = tid / S::DW;

  float acc[S::NR][S::DPT];
#pragma unroll
  for (int i = 0; i < S::NR; i++)
#pragma unroll
    for (int j = 0; j < S::DPT; j++) acc[i][j] = 0.f;

  for (int k0 = kbeg; k0 < kend; k0 += KT) {
    __syncthreads();  // previous tile fully consumed (and q_s/pos_s/m_s ready on entry)
    load_kv_tile<D, KT, S::KPAD>(p, bt, g, k0, kend, tid, k_s, v_s);
    __syncthreads();

    // Scores of the real rows: thread -> key (tid % KT), rows rg, rg + RSTEP, ...
    {
      const int key = tid % KT, rg = tid / KT;
      float dot[S::SROWS];
#pragma unroll
      for (int i = 0; i < S::SROWS; i++) dot[i] = 0.f;
#pragma unroll 4
      for (int c = 0; c < D / 8; c++) {
        float kf[8];
        bf16x8_to_f32(*reinterpret_cast<const Bf16x8*>(&k_s[key][c * 8]), kf);
#pragma unroll
        for (int i = 0; i < S::SROWS; i++) {
          const int r = rg + i * S::RSTEP;
          if (r >= nrows) break;
          const float4 qa = *reinterpret_cast<const float4*>(&q_s[r][c * 8]);
          const float4 qb = *reinterpret_cast<const float4*>(&q_s[r][c * 8 + 4]);
          dot[i] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] + qb.y * kf[5] +
                    qb.z * kf[6] + qb.w * kf[7];
        }
      }
      const int pos = k0 + key;
#pragma unroll
      for (int i = 0; i < S::SROWS; i++) {
        const int r = rg + i * S::RSTEP;
        if (r >= nrows) break;
        pT_s[key][r] = (pos < kend && pos <= pos_s[r]) ? dot[i] : -INFINITY;
      }
    }
    __syncthreads();

    // Online softmax of the real rows: warp w owns rows w, w + 4, ...
    {
      const int warp = tid / kWarp, lane = tid % kWarp;
      for (int r = warp; r < nrows; r += kAttnThreads / kWarp) {
        const float sc = lane < KT ? pT_s[lane][r] : -INFINITY;
        const float m_old = m_s[r];
        const float m_new = fmaxf(m_old, warp_max(sc));
        float pr = 0.f, alpha = 1.f;
        if (m_new != -INFINITY) {
          pr = exp2f(sc - m_new);  // exp2(-inf) = 0
          alpha = exp2f(m_old - m_new);
        }
        const float sum = warp_sum(pr);
        if (lane < KT) pT_s[lane][r] = pr;
        if (lane == 0) {
          l_s[r] = l_s[r] * alpha + sum;
          m_s[r] = m_new;
          alpha_s[r] = alpha;
        }
      }
    }
    __syncthreads();

    // acc = acc * alpha + P · V, keys outermost.
#pragma unroll
    for (int i = 0; i < S::NR; i++) {
      const int r = r0 + i * S::RS;
      if (r >= nrows) break;
#pragma unroll
      for (int j = 0; j < S::DPT; j++) acc[i][j] *= alpha_s[r];
    }
#pragma unroll 4
    for (int kk = 0; kk < KT; kk++) {
      float v[S::DPT];
#pragma unroll
      for (int j = 0; j < S::DPT; j++) v[j] = __bfloat162float(v_s[kk][d0 + j * S::DW]);
      if constexpr (S::RS == 1) {
        // This thread's rows are 0..15: four broadcast float4 loads of P per key. Rows past
        // nrows in the last group of four hold stale values; their accumulators are never written out.
#pragma unroll
        for (int i4 = 0; i4 < S::NR; i4 += 4) {
          if (i4 >= nrows) break;
          const float4 pr = *reinterpret_cast<const float4*>(&pT_s[kk][i4]);
#pragma unroll
          for (int j = 0; j < S::DPT; j++) {
            acc[i4][j] += pr.x * v[j];
            acc[i4 + 1][j] += pr.y * v[j];
            acc[i4 + 2][j] += pr.z * v[j];
            acc[i4 + 3][j] += pr.w * v[j];
          }
        }
      } else {
#pragma unroll
        for (int i = 0; i < S::NR; i++) {
          const int r = r0 + i * S::RS;
          if (r >= nrows) break;
          const float pr = pT_s[kk][r];
#pragma unroll
          for (int j = 0; j < S::DPT; j++) acc[i][j] += pr * v[j];
        }
      }
    }
  }
  __syncthreads();

#pragma unroll
  for (int i = 0; i < S::NR; i++) {
    const int r = r0 + i * S::RS;
    if (r >= nrows) continue;
    const int tok = it.t0 + r / it.nh, hq = g * p.group + it.h0 + r % it.nh;
    const size_t row = (size_t)tok * p.H + hq;
#pragma unroll
    for (int j = 0; j < S::DPT; j++) {
      const int d = d0 + j * S::DW;
      if (p.splits == 1) {
        const float l = l_s[r];
        p.out[row * D + d] = __float2bfloat16_rn(l > 0.f ? acc[i][j] / l : 0.f);
      } else {
        const size_t prow = row * p.splits + split;
        p.part_acc[prow * D + d] = acc[i][j];
        if (d == 0) {
          p.part_ml[prow * 2] = m_s[r];
          p.part_ml[prow * 2 + 1] = l_s[r];
        }
      }
    }
  }
}

// ENGINE_CUDA_ATTENTION=1 selects version 1 (read once); 2 otherwise.
inline int attention_version() {
  static const int v = [] {
    const char* e = std::getenv("ENGINE_CUDA_ATTENTION");
    return e != nullptr && e[0] == '1' ? 1 : 2;
  }();
  return v;
}

// out[row] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the splits of row
// (row = token * H + head). One block per row, one thread per dimension.
static __global__ void attn_combine_kernel(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                    bf16* __restrict__ out, int splits, int D) {
  const size_t row = blockIdx.x;
  const float* ml = part_ml + row * splits * 2;
  float M = -INFINITY;
  for (int s = 0; s < splits; s++) M = fmaxf(M, ml[2 * s]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    if (M != -INFINITY) {
      for (int s = 0; s < splits; s++) {
        const float m = ml[2 * s];
        if (m == -INFINITY) continue;
        const float w = exp2f(m - M);
        num += w * part_acc[(row * splits + s) * D + d];
        den += w * ml[2 * s + 1];
      }
    }
    out[row * D + d] = __float2bfloat16_rn(den > 0.f ? num / den : 0.f);
  }
}

// ---- launcher -----------------------------------------------------------------------------

// Rows of partials the launcher may use: T * H * splits must stay within part_rows.
// `version`: 1 or 2 (the kernel of that version; default ENGINE_CUDA_ATTENTION, else 2).
inline void paged_attention(const AttnParams& prm, int n_items, int T, int D, int64_t part_rows, cudaStream_t st,
                            int version = attention_version()) {
  ENGINE_CHECK(prm.H == prm.KV * prm.group, "internal", "attention: H != KV * group");
  ENGINE_CHECK(prm.splits >= 1, "internal", "attention: splits must be >= 1");
  ENGINE_CHECK(prm.splits == 1 || (int64_t)T * prm.H * prm.splits <= part_rows, "internal",
               "attention: partial buffer too small");
  if (n_items <= 0) return;
  const dim3 grid(n_items, prm.KV, prm.splits);
  const bool v2 = version == 2;
  switch (D) {
    case 32: v2 ? paged_attention_v2_kernel<32><<<grid, kAttnThreads, 0, st>>>(prm)
                : paged_attention_kernel<32><<<grid, kAttnThreads, 0, st>>>(prm); break;
    case 64: v2 ? paged_attention_v2_kernel<64><<<grid, kAttnThreads, 0, st>>>(prm)
                : paged_attention_kernel<64><<<grid, kAttnThreads, 0, st>>>(prm); break;
    case 128: v2 ? paged_attention_v2_kernel<128><<<grid, kAttnThreads, 0, st>>>(prm)
                 : paged_attention_kernel<128><<<grid, kAttnThreads, 0, st>>>(prm); break;
    case 256: v2 ? paged_attention_v2_kernel<256><<<grid, kAttnThreads, 0, st>>>(prm)
                 : paged_attention_kernel<256><<<grid, kAttnThreads, 0, st>>>(prm); break;
    default: ENGINE_FAIL("internal", "attention: head_dim " << D << " unsupported (32, 64, 128, 256)");
  }
  CUDA_CHECK_LAUNCH();
  if (prm.splits > 1) {
    attn_combine_kernel<<<T * prm.H, D, 0, st>>>(prm.part_acc, prm.part_ml, prm.out, prm.splits, D);
    CUDA_CHECK_LAUNCH();
  }
}

inline bool attention_head_dim_supported(int64_t D) { return D == 32 || D == 64 || D == 128 || D == 256; }

}  // namespace engine::cuda
