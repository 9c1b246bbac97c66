// cuda/sampling.cuh — PROTOCOL.md sampling on the GPU, one block per logits row.
//
// temperature == 0: argmax (NaN skipped, ties -> lowest id; a NaN at id 0 wins, as in the
// CPU loop), logprob = -log(sum exp(l - l_max)).
// Otherwise, exactly the CPU rule (sampler.cpp), in f64 where the CPU uses f64:
//   z_i = (l_i - l_max) / T, e_i = exp(z_i); NaN -> -inf; infinite l_max -> the ids equal to
//   it share the mass.
//   Ranking (top-k, top-p): by logit descending, ties -> lower id. Keys are the order-
//   preserving 32-bit image of the f32 logit, so equal keys are exactly equal logits (equal
//   e_i), and the rank of a tie is its index among equal keys in ascending id order.
//   top-k: 4-pass radix select (8-bit digits, shared histograms) of the k-th key Kk; kept:
//     key > Kk, plus the first (k - #{key > Kk}) ids with key == Kk.
//   top-p: the same radix walk over mass histograms of the candidates finds the key Kp of the
//     token at which the cumulative mass (rank order) reaches top_p * candidate mass; with
//     A = mass ranked above Kp, a tie of rank j is kept iff A + j * e(Kp) < target (the CPU's
//     "acc before this token < target").
//   Inverse CDF: u (splitmix64(seed, pos), computed on the host exactly as sampler.cpp)
//     times the kept mass; the first kept id in ASCENDING id order whose running sum
//     exceeds it (last kept id if rounding never does).
// The only difference from the CPU sampler on identical logits is the summation order of
// f64 sums (block reductions instead of a sequential loop): a different token needs u to
// land within ~1e-16 (relative) of a CDF boundary.
#pragma once

#include <climits>

#include "cuda/common.cuh"

namespace engine::cuda {

struct SampleParam {
  double temperature;
  double top_p;
  double u;            // uniform in [0,1) from (seed, pos)
  int32_t top_k;
  int32_t want_logprob;
};

constexpr int kSampleThreads = 512;
constexpr int kSampleItems = 8;  // consecutive ids per thread in the ascending-id walks

namespace detail {

__device__ __forceinline__ float rank_value(float l, float lmax, bool inf_max) {
  if (isnan(l)) return -INFINITY;
  if (inf_max) return l == lmax ? 1.0f : -INFINITY;
  return l == 0.f ? 0.f : l;  // -0 == +0
}
__device__ __forceinline__ uint32_t key_of(float r) {
  const uint32_t b = __float_as_uint(r);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ double z_of(float l, float lmax, bool inf_max, double T) {
  const double lv = isnan(l) ? -INFINITY : (double)l;
  if (inf_max) return lv == (double)lmax ? 0.0 : -INFINITY;
  return (lv - (double)lmax) / T;
}

struct RowState {
  float lmax;
  bool inf_max;
  double T;
  bool has_topk;
  uint32_t Kk;
  int needK;
  bool topp;
  uint32_t Kp;
  double A, eP, target;
};

// Keep flags and masses of ids [base, base + kSampleItems) for the ascending-id walks.
// runK/runP: ties of Kk / candidate ties of Kp seen before this chunk (block-uniform);
// updated to include this chunk. Contains block scans (call from all threads).
__device__ __forceinline__ void chunk_keep(const float* row, int V, int base, const RowState& s, int* runK,
                                           int* runP, int* iscratch, bool* keep, double* mass) {
  uint32_t key[kSampleItems];
  int tieK = 0;
#pragma unroll
  for (int j = 0; j < kSampleItems; j++) {
    const int i = base + j;
    const float l = i < V ? row[i] : NAN;
    key[j] = i < V ? key_of(rank_value(l, s.lmax, s.inf_max)) : 0u;
    mass[j] = i < V ? exp(z_of(l, s.lmax, s.inf_max, s.T)) : 0.0;
    tieK += (i < V && s.has_topk && key[j] == s.Kk);
  }
  int totK;
  int rk = *runK + block_exclusive_scan(tieK, iscratch, &totK);
  bool cand[kSampleItems];
  int tieP = 0;
#pragma unroll
  for (int j = 0; j < kSampleItems; j++) {
    const bool valid = base + j < V;
    bool c = valid;
    if (valid && s.has_topk) {
      if (key[j] < s.Kk) c = false;
      else if (key[j] == s.Kk) c = rk++ < s.needK;
    }
    cand[j] = c;
    tieP += (c && s.topp && key[j] == s.Kp);
  }
  int totP;
  int rp = *runP + block_exclusive_scan(tieP, iscratch, &totP);
#pragma unroll
  for (int j = 0; j < kSampleItems; j++) {
    bool k = cand[j];
    if (k && s.topp) {
      if (key[j] < s.Kp) k = false;
      else if (key[j] == s.Kp) k = s.A + (double)(rp++) * s.eP < s.target;
    }
    keep[j] = k;
    if (!k) mass[j] = 0.0;
  }
  *runK += totK;
  *runP += totP;
}

}  // namespace detail

static __global__ void __launch_bounds__(kSampleThreads) sample_kernel(const float* __restrict__ logits, int V,
                                                               const SampleParam* __restrict__ params,
                                                               int32_t* __restrict__ tokens_out,
                                                               float* __restrict__ logprobs_out) {
  using namespace detail;
  __shared__ double dscratch[33];
  __shared__ float fscratch[33];
  __shared__ int iscratch[33];
  __shared__ int hist_cnt[256];
  __shared__ double hist_mass[256];
  __shared__ int sh_sel, sh_need, sh_found, sh_idx;
  __shared__ double sh_above, sh_e;

  const int r = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
  const float* row = logits + (size_t)r * V;
  const SampleParam prm = params[r];

  if (prm.temperature == 0.0) {
    // Argmax: (value desc, id asc) over non-NaN entries.
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int i = tid; i < V; i += nt) {
      const float l = row[i];
      if (!isnan(l) && (l > bv || (l == bv && i < bi))) { bv = l; bi = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    if (tid == 0) sh_idx = INT_MAX;
    __syncthreads();
    if (tid % kWarp == 0) { fscratch[tid / kWarp] = bv; iscratch[tid / kWarp] = bi; }
    __syncthreads();
    if (tid == 0) {
      float v = -INFINITY;
      int b = INT_MAX;
      for (int w = 0; w < (nt + kWarp - 1) / kWarp; w++)
        if (fscratch[w] > v || (fscratch[w] == v && iscratch[w] < b)) { v = fscratch[w]; b = iscratch[w]; }
      if (b == INT_MAX || isnan(row[0])) b = 0;
      sh_idx = b;
    }
    __syncthreads();
    const int best = sh_idx;
    if (prm.want_logprob) {
      const double mx = row[best];
      double s = 0.0;
      for (int i = tid; i < V; i += nt) s += exp((double)row[i] - mx);
      s = block_sum(s, dscratch);
      if (tid == 0) logprobs_out[r] = (float)(-log(s));
    } else if (tid == 0) {
      logprobs_out[r] = 0.f;
    }
    if (tid == 0) tokens_out[r] = best;
    return;
  }

  RowState s{};
  s.T = prm.temperature;
  // l_max over non-NaN logits.
  float lm = -INFINITY;
  for (int i = tid; i < V; i += nt) {
    const float l = row[i];
    if (!isnan(l)) lm = fmaxf(lm, l);
  }
  s.lmax = block_max(lm, fscratch);
  s.inf_max = isinf(s.lmax);
  double am = 0.0;
  for (int i = tid; i < V; i += nt) am += exp(z_of(row[i], s.lmax, s.inf_max, s.T));
  const double all_mass = block_sum(am, dscratch);

  // ---- top-k: radix select of the k-th largest key ----
  s.has_topk = prm.top_k > 0 && prm.top_k < V;
  double cand_mass = all_mass;
  if (s.has_topk) {
    uint32_t prefix = 0, pmask = 0;
    int need = prm.top_k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += nt) hist_cnt[b] = 0;
      __syncthreads();
      for (int i = tid; i < V; i += nt) {
        const uint32_t k = key_of(rank_value(row[i], s.lmax, s.inf_max));
        if ((k & pmask) == prefix) atomicAdd(&hist_cnt[(k >> shift) & 255u], 1);
      }
      __syncthreads();
      if (tid == 0) {
        int above = 0, sel = 0;
        for (int d = 255; d >= 0; d--) {
          if (above + hist_cnt[d] >= need) { sel = d; break; }
          above += hist_cnt[d];
        }
        sh_sel = sel;
        sh_need = need - above;
      }
      __syncthreads();
      prefix |= (uint32_t)sh_sel << shift;
      pmask |= 255u << shift;
      need = sh_need;
    }
    s.Kk = prefix;
    s.needK = need;
    // Candidate mass: keys above Kk plus needK ties (all ties share one mass e(Kk)).
    double m = 0.0;
    for (int i = tid; i < V; i += nt) {
      const float l = row[i];
      const uint32_t k = key_of(rank_value(l, s.lmax, s.inf_max));
      if (k > s.Kk) m += exp(z_of(l, s.lmax, s.inf_max, s.T));
      else if (k == s.Kk) sh_e = exp(z_of(l, s.lmax, s.inf_max, s.T));  // same value from every writer
    }
    m = block_sum(m, dscratch);  // its barriers also publish sh_e
    cand_mass = m + (double)s.needK * sh_e;
    __syncthreads();
  }
  const double eK = s.has_topk ? sh_e : 0.0;

  // ---- top-p: radix walk over mass histograms of the candidates ----
  s.topp = prm.top_p < 1.0;
  s.target = prm.top_p * cand_mass;
  if (s.topp) {
    uint32_t prefix = 0, pmask = 0;
    double above = 0.0;
    bool found = true;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += nt) { hist_cnt[b] = 0; hist_mass[b] = 0.0; }
      __syncthreads();
      for (int i = tid; i < V; i += nt) {
        const float l = row[i];
        const uint32_t k = key_of(rank_value(l, s.lmax, s.inf_max));
        if ((k & pmask) != prefix) continue;
        if (s.has_topk && k <= s.Kk) continue;  // ties of Kk are added below, the rest are cut
        const uint32_t d = (k >> shift) & 255u;
        atomicAdd(&hist_cnt[d], 1);
        atomicAdd(&hist_mass[d], exp(z_of(l, s.lmax, s.inf_max, s.T)));
      }
      if (tid == 0 && s.has_topk && s.needK > 0 && (s.Kk & pmask) == prefix) {
        const uint32_t d = (s.Kk >> shift) & 255u;
        atomicAdd(&hist_cnt[d], s.needK);
        atomicAdd(&hist_mass[d], (double)s.needK * eK);
      }
      __syncthreads();
      if (tid == 0) {
        int sel = -1, lowest = -1;
        double a = above;
        for (int d = 255; d >= 0; d--) {
          if (hist_cnt[d] == 0) continue;
          if (a + hist_mass[d] >= s.target) { sel = d; break; }
          a += hist_mass[d];
          lowest = d;
        }
        int f = 1;
        if (sel < 0) {
          if (shift == 24 || lowest < 0) f = 0;  // mass never reaches top_p: keep all
          else { sel = lowest; a -= hist_mass[lowest]; }
        }
        sh_found = f;
        sh_sel = sel < 0 ? 0 : sel;
        sh_above = a;
      }
      __syncthreads();
      if (!sh_found) { found = false; break; }
      prefix |= (uint32_t)sh_sel << shift;
      pmask |= 255u << shift;
      above = sh_above;
      __syncthreads();
    }
    if (found) {
      s.Kp = prefix;
      s.A = above;
      for (int i = tid; i < V; i += nt) {
        const float l = row[i];
        if (key_of(rank_value(l, s.lmax, s.inf_max)) == s.Kp) sh_e = exp(z_of(l, s.lmax, s.inf_max, s.T));
      }
      __syncthreads();
      s.eP = sh_e;
    } else {
      s.topp = false;
    }
    __syncthreads();
  }

  // ---- kept mass, then the inverse-CDF walk in ascending id order ----
  const int chunk = nt * kSampleItems;
  double total = 0.0;
  {
    int runK = 0, runP = 0;
    for (int c0 = 0; c0 < V; c0 += chunk) {
      bool keep[kSampleItems];
      double mass[kSampleItems];
      chunk_keep(row, V, c0 + tid * kSampleItems, s, &runK, &runP, iscratch, keep, mass);
      double t = 0.0;
#pragma unroll
      for (int j = 0; j < kSampleItems; j++) t += mass[j];
      total += block_sum(t, dscratch);
    }
  }
  const double goal = prm.u * total;
  int chosen = -1, last_kept = -1;
  {
    int runK = 0, runP = 0;
    double cum = 0.0;
    if (tid == 0) sh_idx = INT_MAX;
    for (int c0 = 0; c0 < V; c0 += chunk) {
      bool keep[kSampleItems];
      double mass[kSampleItems];
      const int base = c0 + tid * kSampleItems;
      chunk_keep(row, V, base, s, &runK, &runP, iscratch, keep, mass);
      double t = 0.0;
#pragma unroll
      for (int j = 0; j < kSampleItems; j++) t += mass[j];
      double chunk_total;
      double before = cum + block_exclusive_scan(t, dscratch, &chunk_total);
      int mine = INT_MAX, lk = -1;
#pragma unroll
      for (int j = 0; j < kSampleItems; j++) {
        if (!keep[j]) continue;
        lk = base + j;
        before += mass[j];
        if (mine == INT_MAX && before > goal) mine = base + j;
      }
      if (mine != INT_MAX) atomicMin(&sh_idx, mine);
      // last kept id so far (for the rounding fallback): max over threads
      const int lk_all = (int)block_max((float)lk, fscratch);  // ids < 2^24 are exact in f32
      if (lk_all > last_kept) last_kept = lk_all;
      __syncthreads();
      if (sh_idx != INT_MAX) { chosen = sh_idx; break; }
      cum += chunk_total;
    }
  }
  if (chosen < 0) chosen = last_kept < 0 ? 0 : last_kept;
  if (tid == 0) {
    tokens_out[r] = chosen;
    logprobs_out[r] = (float)(z_of(row[chosen], s.lmax, s.inf_max, s.T) - log(all_mass));
  }
}

// tokens/logprobs[r] for rows r < rows of logits [rows, V].
inline void sample_rows(const float* logits, int rows, int V, const SampleParam* params, int32_t* tokens_out,
                        float* logprobs_out, cudaStream_t st) {
  ENGINE_CHECK(V > 0 && V < (1 << 24), "internal", "sampling: vocab " << V << " unsupported (< 2^24)");
  if (rows <= 0) return;
  sample_kernel<<<rows, kSampleThreads, 0, st>>>(logits, V, params, tokens_out, logprobs_out);
  CUDA_CHECK_LAUNCH();
}

}  // namespace engine::cuda
