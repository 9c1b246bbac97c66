// cpu/cpu_model.cpp — see cpu_model.h. Per layer:
//   xn = RMSNorm(x); qkv = xn·Wqkv^T (+b); [QK-norm]; RoPE(q, k); K/V -> paged cache;
//   attn = causal paged attention; x += attn·Wo^T;
//   xn = RMSNorm(x); gu = xn·[Wgate|Wup]^T; a = silu(g)*u; x += a·Wdown^T.
#include "cpu/cpu_model.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common.h"
#include "cpu/ops.h"

namespace engine::cpu {

CpuModel::CpuModel(const ModelConfig& cfg, ModelWeights weights, int64_t num_blocks,
                   int64_t max_tokens, int64_t max_pos)
    : cfg_(cfg),
      w_(std::move(weights)),
      kv_(cfg.num_layers, num_blocks, cfg.num_kv_heads, cfg.head_dim),
      inv_freq_(rope_inv_freq(cfg)),
      max_tokens_(max_tokens),
      max_pos_(max_pos),
      num_threads_(omp_get_max_threads()) {
  // OpenMP is the only thread pool: BLAS calls run single-threaded inside OMP workers.
  openblas_set_num_threads(1);
  ENGINE_CHECK(max_tokens > 0 && max_pos > 0, "internal", "max tokens/positions must be > 0");
  const int64_t T = max_tokens, hid = cfg.hidden_size, D = cfg.head_dim;
  const int64_t H = cfg.num_heads, KV = cfg.num_kv_heads, I = cfg.intermediate_size;
  const size_t sizes[] = {
      (size_t)(T * hid),               // x: residual stream
      (size_t)(T * hid),               // xn: normed input / GEMM output
      (size_t)(T * (H + 2 * KV) * D),  // qkv
      (size_t)(T * H * D),             // attn
      (size_t)(T * 2 * I),             // gu: gate | up, then activations in place
      (size_t)(T * D / 2),             // cos
      (size_t)(T * D / 2),             // sin
  };
  size_t total = 0;
  for (size_t s : sizes) total += s;
  arena_.assign(total, 0.0f);
  float* p = arena_.data();
  float** slots[] = {&x_, &xn_, &qkv_, &attn_, &gu_, &cos_, &sin_};
  for (size_t i = 0; i < 7; i++) { *slots[i] = p; p += sizes[i]; }
  tok_pos_.resize(T);
  tok_seq_.resize(T);
  attn_scratch_.resize(num_threads_);
}

// Causal paged attention as GEMMs (FlashAttention's blocking without its online softmax:
// the scores of a block of query rows fit in memory at these sizes). Per (sequence, KV head)
// the K and V rows it attends are gathered from their blocks into contiguous [P, D] panels;
// then per query head of the group and per block of up to kRowBlock query rows,
// S = Q·K^T (cblas_sgemm), a causal softmax per row, and O = softmax(S)·V (cblas_sgemm), each
// output row divided by its softmax sum after the product (D multiplies, not one per key).
// OpenBLAS picks its AVX2/AVX-512 kernels at run time, and so does the softmax (below): a
// turn late in a long conversation (a few hundred new tokens against thousands cached) spends
// its time here.
namespace {
constexpr int64_t kRowBlock = 64;

// e^x for x <= 0 (softmax after subtracting the row max), vectorisable: x = n·ln2 + r with
// |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7 on that range,
// as Cephes' expf), times 2^n built in the exponent bits. Below -87 it is 0 (e^-87 ~ 1.6e-38,
// the smallest normal float), where std::exp would return a denormal: no softmax weight that
// small survives the sum anyway. A turn late in a long conversation takes millions of these
// per step; std::exp is a scalar call each.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  // Round to nearest by the 1.5·2^23 shift (exact for |x·log2 e| < 2^22), which vectorises.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += (int32_t)n << 23;
  std::memcpy(&p, &bits, sizeof bits);
  return p;
}

// The causal softmax of a block of score rows, left unnormalised: row r (of `cols`) attends
// its first first_len + r positions, becomes e^(s - max) there and 0 past them; inv_sum[r]
// gets 1 / its sum, which the caller applies to the row's output. Built once per instruction
// set and picked at load time (GCC target_clones, an ifunc): the portable x86-64-v2 build
// took 4-6 ns an element here (both passes), the AVX-512 clone under 1 ns, and a turn late in
// a long conversation spent most of its attention time in this loop.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void softmax_rows(float* scores, int64_t rows, int64_t cols, int64_t first_len, float* inv_sum) {
  for (int64_t r = 0; r < rows; r++) {
    float* row = scores + r * cols;
    const int64_t len = first_len + r;
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < len; j++) mx = std::max(mx, row[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; j++) {
      const float e = exp_nonpositive(row[j] - mx);
      row[j] = e;
      sum += e;
    }
    inv_sum[r] = 1.0f / sum;
    for (int64_t j = len; j < cols; j++) row[j] = 0.0f;
  }
}
}  // namespace

void CpuModel::attention(int64_t T, const std::vector<BatchSeq>& seqs, int64_t layer) {
  (void)T;
  const int64_t H = cfg_.num_heads, KV = cfg_.num_kv_heads, D = cfg_.head_dim;
  const int64_t group = H / KV, qkv_stride = (H + 2 * KV) * D;
  const float scale = 1.0f / std::sqrt((float)D);
  const int64_t num_seqs = (int64_t)seqs.size();
  std::vector<int64_t> first_row(num_seqs);
  int64_t work = 0;
  for (int64_t i = 0, row = 0; i < num_seqs; i++) {
    first_row[i] = row;
    row += seqs[i].num_tokens;
    work += seqs[i].num_tokens * (seqs[i].start_pos + seqs[i].num_tokens) * H * D * 2;
  }
  // Fork only when the work (multiply-adds of Q·K^T and P·V) pays for it.
#pragma omp parallel for schedule(dynamic, 1) if (work > (1 << 16))
  for (int64_t item = 0; item < num_seqs * KV; item++) {
    const BatchSeq& s = seqs[item / KV];
    const int64_t kvh = item % KV;
    const int64_t n = s.num_tokens, P = s.start_pos + n;
    if (n == 0) continue;
    std::vector<float>& scratch = attn_scratch_[omp_get_thread_num()];
    const size_t need = (size_t)(2 * P * D + kRowBlock * P);
    if (scratch.size() < need) scratch.resize(need);
    float* k = scratch.data();
    float* v = k + P * D;
    float* scores = v + P * D;
    for (int64_t j = 0; j < P; j++) {
      const int64_t block = s.block_table[j / kBlockSize], slot = j % kBlockSize;
      std::memcpy(k + j * D, kv_.k(layer, block, slot) + kvh * D, D * sizeof(float));
      std::memcpy(v + j * D, kv_.v(layer, block, slot) + kvh * D, D * sizeof(float));
    }
    for (int64_t g = 0; g < group; g++) {
      const int64_t h = kvh * group + g;
      for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, n - r0);
        // Row r attends positions 0..start_pos + r0 + r: the block needs the first `cols`.
        const int64_t cols = s.start_pos + r0 + rows;
        const int64_t t0 = first_row[item / KV] + r0;
        const float* q = qkv_ + t0 * qkv_stride + h * D;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)cols, (int)D, scale, q,
                    (int)qkv_stride, k, (int)D, 0.0f, scores, (int)cols);
        float inv_sum[kRowBlock];
        softmax_rows(scores, rows, cols, s.start_pos + r0 + 1, inv_sum);
        float* out = attn_ + t0 * H * D + h * D;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)D, (int)cols, 1.0f, scores,
                    (int)cols, v, (int)D, 0.0f, out, (int)(H * D));
        for (int64_t r = 0; r < rows; r++) {
          float* o = out + r * H * D;
          for (int64_t d = 0; d < D; d++) o[d] *= inv_sum[r];
        }
      }
    }
  }
}

void CpuModel::forward(const std::vector<BatchSeq>& seqs, float* hidden_out) {
  const int64_t hid = cfg_.hidden_size, D = cfg_.head_dim, half = D / 2;
  const int64_t H = cfg_.num_heads, KV = cfg_.num_kv_heads, I = cfg_.intermediate_size;
  const int64_t qkv_dim = (H + 2 * KV) * D;
  const float eps = (float)cfg_.rms_norm_eps;

  // Flatten: token -> (sequence, absolute position); gather embeddings.
  int64_t T = 0;
  for (size_t i = 0; i < seqs.size(); i++) {
    const BatchSeq& s = seqs[i];
    ENGINE_CHECK(T + s.num_tokens <= max_tokens_, "internal", "batch exceeds scratch capacity");
    ENGINE_CHECK(s.start_pos + s.num_tokens <= max_pos_, "internal", "position beyond max_pos");
    ENGINE_CHECK(s.block_table_len * kBlockSize >= s.start_pos + s.num_tokens, "internal",
                 "block table too short");
    for (int64_t j = 0; j < s.num_tokens; j++, T++) {
      tok_pos_[T] = s.start_pos + j;
      tok_seq_[T] = (int32_t)i;
      std::memcpy(x_ + T * hid, w_.embed.data() + (int64_t)s.tokens[j] * hid, hid * sizeof(float));
    }
  }
  if (T == 0) return;

  // RoPE angles once per token, shared by all layers and heads. HF computes pos * inv_freq
  // in f32; we do the same product and take cos/sin in f64.
#pragma omp parallel for schedule(static) if (T * half > kParallelMin / 8)
  for (int64_t t = 0; t < T; t++) {
    for (int64_t i = 0; i < half; i++) {
      const float ang = (float)tok_pos_[t] * inv_freq_[i];
      cos_[t * half + i] = (float)std::cos((double)ang);
      sin_[t * half + i] = (float)std::sin((double)ang);
    }
  }

  for (int64_t l = 0; l < cfg_.num_layers; l++) {
    const LayerWeights& L = w_.layers[l];
    rmsnorm(x_, xn_, L.input_norm.data(), T, hid, hid, eps);
    matmul_nt(xn_, hid, L.wqkv.data(), qkv_, T, qkv_dim, hid);

    // Bias, QK-norm (before RoPE, per head over D), RoPE; then K/V into the paged cache.
#pragma omp parallel for schedule(static) if (T * qkv_dim > kParallelMin)
    for (int64_t t = 0; t < T; t++) {
      float* row = qkv_ + t * qkv_dim;
      if (!L.bqkv.empty())
        for (int64_t i = 0; i < qkv_dim; i++) row[i] += L.bqkv[i];
      if (!L.q_norm.empty()) {
        rmsnorm_serial(row, row, L.q_norm.data(), H, D, D, eps);
        rmsnorm_serial(row + H * D, row + H * D, L.k_norm.data(), KV, D, D, eps);
      }
      for (int64_t h = 0; h < H + KV; h++) rope_head(row + h * D, cos_ + t * half, sin_ + t * half, D);
      const BatchSeq& s = seqs[tok_seq_[t]];
      const int64_t pos = tok_pos_[t];
      const int64_t block = s.block_table[pos / kBlockSize], slot = pos % kBlockSize;
      std::memcpy(kv_.k(l, block, slot), row + H * D, KV * D * sizeof(float));
      std::memcpy(kv_.v(l, block, slot), row + (H + KV) * D, KV * D * sizeof(float));
    }

    attention(T, seqs, l);
    matmul_nt(attn_, H * D, L.wo.data(), xn_, T, hid, H * D);
    add_inplace(x_, xn_, T * hid);

    rmsnorm(x_, xn_, L.post_norm.data(), T, hid, hid, eps);
    matmul_nt(xn_, hid, L.w_gate_up.data(), gu_, T, 2 * I, hid);
    swiglu_inplace(gu_, T, I);
    matmul_nt(gu_, 2 * I, L.w_down.data(), xn_, T, hid, I);
    add_inplace(x_, xn_, T * hid);
  }

  // Final norm only for the rows that will produce logits.
  int64_t t_end = 0, n_out = 0;
  for (const BatchSeq& s : seqs) {
    t_end += s.num_tokens;
    if (!s.need_output) continue;
    rmsnorm_serial(x_ + (t_end - 1) * hid, hidden_out + n_out * hid, w_.final_norm.data(), 1, hid, hid, eps);
    n_out++;
  }
}

void CpuModel::lm_head(const float* hidden, int64_t rows, float* logits) {
  if (rows > 0) matmul_nt(hidden, cfg_.hidden_size, w_.lm_head_data(), logits, rows, cfg_.vocab_size,
                          cfg_.hidden_size);
}

}  // namespace engine::cpu
