// cuda/cuda_backend.cu — see cuda_backend.h. Per forward:
//   one pinned-host -> device copy of the step inputs (tokens, positions, KV slots, output
//   rows, attention work items, sampling params, block tables);
//   x = embed[tokens] (f32 residual stream); cos/sin table;
//   per layer: xn = RMSNorm(x) (bf16); qkv = xn·Wqkv^T (f32); bias/QK-norm/RoPE, q -> bf16,
//   k/v -> paged cache; attn = paged attention (bf16); x += attn·Wo^T (cuBLAS beta = 1);
//   xn = RMSNorm(x); gu = xn·Wgu^T (f32); act = SwiGLU (bf16); x += act·Wdown^T;
//   hidden = final RMSNorm of the output rows only; then either hidden -> host (forward), or
//   logits = hidden·lm_head^T and sampling on the device (forward_sample).
// Decode steps (every sequence 1 token, all sampled, <= 256 sequences) replay a CUDA graph
// captured per padded batch size bucket.
#include "cuda/cuda_backend.h"

#include <cmath>
#include <cstring>
#include <map>

#include "cuda/attention.cuh"
#include "cuda/common.cuh"
#include "cuda/cublas_lib.h"
#include "cuda/elementwise.cuh"
#include "cuda/gemv.cuh"
#include "cuda/graph_buckets.h"
#include "cuda/rope_kv.cuh"
#include "cuda/sampling.cuh"
#include "kv_cache.h"

namespace engine::cuda {

namespace {

constexpr int kLogitRows = 256;                 // LM head + sampling rows per group
constexpr size_t kCublasWorkspace = 32u << 20;
// Device memory kept free when the KV cache is sized (see Impl's constructor).
constexpr size_t kKvReserveBytes = 512u << 20;
// The most KV blocks a cache gets (2^26 blocks of 16 tokens: over a billion tokens).
constexpr int64_t kMaxKvBlocks = (int64_t)1 << 26;

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

struct Layout {
  size_t tokens = 0, positions = 0, slots = 0, out_idx = 0, bt_off = 0, items = 0, params = 0, bt = 0;
};

Layout make_layout(int T, int n_seqs, int n_items, int n_out) {
  Layout L;
  size_t o = 0;
  auto take = [&](size_t bytes) {
    const size_t r = o;
    o = align_up(o + bytes, 64);
    return r;
  };
  L.tokens = take((size_t)T * 4);
  L.positions = take((size_t)T * 4);
  L.slots = take((size_t)T * 4);
  L.out_idx = take((size_t)n_out * 4);
  L.bt_off = take((size_t)n_seqs * 4);
  L.items = take((size_t)n_items * sizeof(AttnItem));
  L.params = take((size_t)n_out * sizeof(SampleParam));
  L.bt = o;
  return L;
}

struct LayerDev {
  const float *input_norm, *post_norm, *bqkv, *q_norm, *k_norm;
  const bf16 *wqkv, *wo, *w_gate_up, *w_down;
};

}  // namespace

struct CudaBackend::Impl {
  ModelConfig cfg;
  CudaOptions opt;
  int hid, H, KV, D, I, V, L, group, qkv_dim, sms = 0;
  float eps;
  cudaDeviceProp prop{};
  cudaStream_t stream = nullptr;
  std::unique_ptr<Cublas> blas;

  // Weights: one allocation.
  void* d_weights = nullptr;
  const bf16 *embed = nullptr, *lm_head = nullptr;
  const float *final_norm = nullptr, *inv_freq = nullptr;
  std::vector<LayerDev> layers;

  // KV cache: [L][2][num_blocks][KV][16][D] bf16.
  bf16* d_kv = nullptr;
  int64_t num_blocks = 0;
  size_t kv_bytes = 0;

  // Workspaces (sized for max_tokens).
  void* d_ws = nullptr;
  float *x, *qkv, *gu, *cos_t, *sin_t, *hsel_f32, *logits, *part_acc, *part_ml, *d_lp;
  bf16 *xn, *q, *attn, *act, *hsel;
  int32_t* d_tok;
  int64_t part_rows = 0;
  void* d_cublas_ws = nullptr;

  // Step inputs and outputs.
  char* h_in = nullptr;
  char* d_in = nullptr;
  size_t in_cap = 0;
  int32_t* h_tok = nullptr;
  float* h_lp = nullptr;

  std::map<int, cudaGraphExec_t> graphs;

  struct Prepared {
    int T = 0, n_seqs = 0, n_items = 0, n_out = 0, splits = 1;
    Layout lay;
    size_t bytes = 0;
  };

  // `store` (may be null): the checkpoint, whose matrices are read from it straight to bf16
  // (those of `w` are then empty).
  Impl(const ModelConfig& c, ModelWeights& w, const TensorStore* store, const CudaOptions& o);
  ~Impl();
  void upload_weights(ModelWeights& w, const TensorStore* store);
  void alloc_workspaces();
  // C[M, N] (f32) = alpha · A[M, K] · W[N, K]^T + beta · C, A and W bf16: gemv_nt for
  // decode-sized M when ENGINE_CUDA_GEMV=1 and the shape fits, else cuBLAS.
  void matmul(int M, int N, int K, const bf16* A, int lda, const bf16* W, int ldw, float* C, int ldc,
              float alpha = 1.0f, float beta = 0.0f) {
    if (gemv_enabled() && gemv_fits(M, K, A, lda, W, ldw)) return gemv_nt(M, N, K, A, lda, W, ldw, C, ldc, alpha, beta, stream);
    blas->gemm_nt(M, N, K, A, lda, W, ldw, C, CUDA_R_32F, ldc, alpha, beta);
  }
  void ensure_input_capacity(size_t bytes);
  void destroy_graphs();
  int choose_splits(int n_items, int T) const;
  Prepared prepare(const std::vector<BatchSeq>& seqs, const std::vector<Backend::DeviceSample>* samples, int pad_to);
  void enqueue_layers(const Prepared& P, bool want_f32_hidden);
  void enqueue_sampling(const Prepared& P);
  template <typename T> T* in_ptr(size_t off) { return reinterpret_cast<T*>(d_in + off); }
};

CudaBackend::Impl::Impl(const ModelConfig& c, ModelWeights& w, const TensorStore* store, const CudaOptions& o)
    : cfg(c), opt(o) {
  hid = (int)c.hidden_size; H = (int)c.num_heads; KV = (int)c.num_kv_heads; D = (int)c.head_dim;
  I = (int)c.intermediate_size; V = (int)c.vocab_size; L = (int)c.num_layers; group = H / KV;
  qkv_dim = (H + 2 * KV) * D;
  eps = (float)c.rms_norm_eps;
  if (opt.max_pos <= 0) opt.max_pos = c.max_position_embeddings;
  ENGINE_CHECK(attention_head_dim_supported(D), "internal",
               "cuda: head_dim " << D << " unsupported (32, 64, 128 or 256)");
  ENGINE_CHECK(hid % 8 == 0 && I % 4 == 0, "internal", "cuda: hidden_size must be a multiple of 8 and "
                                                          "intermediate_size of 4");
  ENGINE_CHECK(opt.max_tokens > 0 && opt.max_tokens <= (1 << 20), "internal", "cuda: bad max tokens");
  ENGINE_CHECK(opt.max_pos < (1 << 30), "internal", "cuda: max positions too large");
  int ndev = 0;
  CUDA_CHECK(cudaGetDeviceCount(&ndev));
  ENGINE_CHECK(opt.device >= 0 && opt.device < ndev, "internal",
               "cuda: device " << opt.device << " does not exist (" << ndev << " devices)");
  CUDA_CHECK(cudaSetDevice(opt.device));
  CUDA_CHECK(cudaGetDeviceProperties(&prop, opt.device));
  sms = prop.multiProcessorCount;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  upload_weights(w, store);
  alloc_workspaces();
  blas = std::make_unique<Cublas>(stream, d_cublas_ws, kCublasWorkspace);

  // Everything else the engine allocates up front comes before the KV cache is sized, so that
  // the cache takes what is really left.
  CUDA_CHECK(cudaHostAlloc((void**)&h_tok, (size_t)opt.max_tokens * sizeof(int32_t), cudaHostAllocDefault));
  CUDA_CHECK(cudaHostAlloc((void**)&h_lp, (size_t)opt.max_tokens * sizeof(float), cudaHostAllocDefault));
  const Layout lay = make_layout((int)opt.max_tokens, (int)opt.max_tokens, (int)opt.max_tokens, (int)opt.max_tokens);
  ensure_input_capacity(lay.bt + (size_t)4 * (1 + opt.max_tokens * 64));
  CUDA_CHECK(cudaStreamSynchronize(stream));

  // KV cache: utilization * total - what is in use now - a reserve for what is allocated
  // later (cuBLAS's own buffers on first use, the captured decode graphs, a growing input
  // buffer): at a high --gpu-memory-utilization the first steps would otherwise run out.
  const size_t per_block = CudaBackend::bytes_per_block(c);
  size_t free_b = 0, total_b = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  if (opt.num_blocks > 0) {
    num_blocks = opt.num_blocks;
  } else {
    const double used = (double)(total_b - free_b);
    const double budget = opt.gpu_memory_utilization * (double)total_b - used - (double)kKvReserveBytes;
    num_blocks = budget > 0 ? (int64_t)(budget / (double)per_block) : 0;
  }
  ENGINE_CHECK(num_blocks > 0, "internal",
               "cuda: no memory left for the KV cache (free " << free_b << " of " << total_b
                   << " bytes after weights and workspaces, " << kKvReserveBytes
                   << " kept in reserve); raise --gpu-memory-utilization or pass --num-blocks");
  if (num_blocks > kMaxKvBlocks) {
    // Block ids are int32 on the wire and offsets are computed in 64 bits, but a table this
    // large is never useful: cap it rather than refuse to start.
    std::fprintf(stderr, "llm-engine: cuda: %lld KV blocks fit; using %lld\n", (long long)num_blocks,
                 (long long)kMaxKvBlocks);
    num_blocks = kMaxKvBlocks;
  }
  kv_bytes = per_block * (size_t)num_blocks;
  CUDA_CHECK(cudaMalloc(&d_kv, kv_bytes));
  // Unwritten slots are never read by a correct schedule; zero them anyway so that a stray
  // read sees finite values.
  CUDA_CHECK(cudaMemsetAsync(d_kv, 0, kv_bytes, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

CudaBackend::Impl::~Impl() {
  destroy_graphs();
  blas.reset();
  if (stream) cudaStreamSynchronize(stream);
  cudaFree(d_weights);
  cudaFree(d_kv);
  cudaFree(d_ws);
  cudaFree(d_cublas_ws);
  cudaFree(d_in);
  cudaFreeHost(h_in);
  cudaFreeHost(h_tok);
  cudaFreeHost(h_lp);
  if (stream) cudaStreamDestroy(stream);
}

void CudaBackend::Impl::upload_weights(ModelWeights& w, const TensorStore* store) {
  // Plan one allocation: bf16 matrices, f32 vectors, each 256-byte aligned. A matrix comes
  // from `w` (f32, converted here) or, given the checkpoint, from its tensors: a bf16
  // checkpoint's bytes go to the device as they are, with no f32 copy of the model on the host.
  struct Item { std::vector<float>* src; const MatrixParts* parts; bool bf; size_t off; };
  std::vector<Item> items;
  size_t total = 0;
  auto plan = [&](std::vector<float>& v, bool bf) {
    if (v.empty()) return;
    items.push_back({&v, nullptr, bf, total});
    total = align_up(total + v.size() * (bf ? 2 : 4), 256);
  };
  // Stands for the matrix `v` (empty in `w`): its address is looked up by &v as for the others.
  auto plan_parts = [&](std::vector<float>& v, const MatrixParts& m) {
    if (m.parts.empty()) return;
    items.push_back({&v, &m, true, total});
    total = align_up(total + (size_t)m.numel() * 2, 256);
  };
  const ModelMatrixParts parts = store ? matrix_parts(cfg, *store) : ModelMatrixParts{};
  auto plan_matrix = [&](std::vector<float>& v, const MatrixParts* m) {
    if (store) plan_parts(v, *m); else plan(v, true);
  };
  const bool tied = store ? parts.lm_head.parts.empty() : w.lm_head.empty();
  plan_matrix(w.embed, &parts.embed);
  if (!tied) plan_matrix(w.lm_head, &parts.lm_head);
  plan(w.final_norm, false);
  std::vector<float> inv = rope_inv_freq(cfg);
  plan(inv, false);
  for (size_t l = 0; l < w.layers.size(); l++) {
    LayerWeights& lw = w.layers[l];
    const LayerMatrixParts* lp = store ? &parts.layers[l] : nullptr;
    plan(lw.input_norm, false); plan(lw.post_norm, false); plan(lw.bqkv, false);
    plan(lw.q_norm, false); plan(lw.k_norm, false);
    plan_matrix(lw.wqkv, lp ? &lp->wqkv : nullptr); plan_matrix(lw.wo, lp ? &lp->wo : nullptr);
    plan_matrix(lw.w_gate_up, lp ? &lp->w_gate_up : nullptr); plan_matrix(lw.w_down, lp ? &lp->w_down : nullptr);
  }
  CUDA_CHECK(cudaMalloc(&d_weights, total));
  char* base = (char*)d_weights;
  std::map<const std::vector<float>*, size_t> where;
  // Upload through a pinned staging buffer, converting on the host; free each host vector
  // right after its copy so that peak host memory stays ~ one f32 model (none from a store).
  const size_t stage_bytes = 64u << 20;
  void* stage = nullptr;
  CUDA_CHECK(cudaHostAlloc(&stage, stage_bytes, cudaHostAllocDefault));
  for (const Item& it : items) {
    where[it.src] = it.off;
    if (it.parts) {
      size_t at = it.off;
      for (const TensorRows& p : it.parts->parts) {
        const int64_t n_all = p.rows * it.parts->cols, per = (int64_t)(stage_bytes / 2);
        for (int64_t i0 = 0; i0 < n_all; i0 += per) {
          const int64_t n = std::min(per, n_all - i0);
          store->load_bf16(p.name, i0, n, (uint16_t*)stage);
          CUDA_CHECK(cudaMemcpy(base + at + (size_t)i0 * 2, stage, (size_t)n * 2, cudaMemcpyHostToDevice));
        }
        at += (size_t)n_all * 2;
      }
      continue;
    }
    const std::vector<float>& v = *it.src;
    const size_t esz = it.bf ? 2 : 4, per = stage_bytes / esz;
    for (size_t i0 = 0; i0 < v.size(); i0 += per) {
      const size_t n = std::min(per, v.size() - i0);
      if (it.bf) {
        uint16_t* s = (uint16_t*)stage;
        const float* src = v.data() + i0;
        // Converted on every core (one thread took ~10 s for an 8B model).
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < (int64_t)n; i++) s[i] = engine::f32_to_bf16(src[i]);
      } else {
        std::memcpy(stage, v.data() + i0, n * 4);
      }
      CUDA_CHECK(cudaMemcpy(base + it.off + i0 * esz, stage, n * esz, cudaMemcpyHostToDevice));
    }
  }
  cudaFreeHost(stage);
  auto dptr = [&](const std::vector<float>& v) -> const void* {
    auto f = where.find(&v);
    return f == where.end() ? nullptr : base + f->second;
  };
  embed = (const bf16*)dptr(w.embed);
  lm_head = tied ? embed : (const bf16*)dptr(w.lm_head);
  final_norm = (const float*)dptr(w.final_norm);
  inv_freq = (const float*)dptr(inv);
  for (LayerWeights& lw : w.layers) {
    LayerDev d;
    d.input_norm = (const float*)dptr(lw.input_norm);
    d.post_norm = (const float*)dptr(lw.post_norm);
    d.bqkv = (const float*)dptr(lw.bqkv);
    d.q_norm = (const float*)dptr(lw.q_norm);
    d.k_norm = (const float*)dptr(lw.k_norm);
    d.wqkv = (const bf16*)dptr(lw.wqkv);
    d.wo = (const bf16*)dptr(lw.wo);
    d.w_gate_up = (const bf16*)dptr(lw.w_gate_up);
    d.w_down = (const bf16*)dptr(lw.w_down);
    layers.push_back(d);
  }
  ENGINE_CHECK((cfg.qk_norm == (layers[0].q_norm != nullptr)), "internal", "cuda: qk_norm weights missing");
  // The device holds the only copy now.
  w.embed = {}; w.lm_head = {}; w.final_norm = {};
  for (LayerWeights& lw : w.layers) lw = LayerWeights{};
}

void CudaBackend::Impl::alloc_workspaces() {
  const size_t T = (size_t)opt.max_tokens;
  part_rows = (int64_t)128 * sms;
  // LM-head rows per group (forward_sample and lm_head(), which takes the engine's host-path
  // groups of up to 64 rows in pieces of this size): at least 16, at most kLogitRows.
  const size_t R = std::max<size_t>(16, (size_t)std::min<int64_t>(kLogitRows, opt.max_tokens));
  const size_t TR = std::max(T, R);
  size_t total = 0;
  struct Slot { void** p; size_t bytes; };
  std::vector<Slot> slots = {
      {(void**)&x, T * hid * 4},          {(void**)&qkv, T * qkv_dim * 4},
      {(void**)&gu, T * 2 * I * 4},       {(void**)&cos_t, T * (D / 2) * 4},
      {(void**)&sin_t, T * (D / 2) * 4},  {(void**)&hsel_f32, TR * hid * 4},
      {(void**)&logits, R * V * 4},
      {(void**)&part_acc, (size_t)part_rows * D * 4}, {(void**)&part_ml, (size_t)part_rows * 2 * 4},
      {(void**)&d_lp, T * 4},             {(void**)&d_tok, T * 4},
      {(void**)&xn, T * hid * 2},         {(void**)&q, T * H * D * 2},
      {(void**)&attn, T * H * D * 2},     {(void**)&act, T * I * 2},
      {(void**)&hsel, TR * hid * 2},
  };
  for (auto& s : slots) total = align_up(total + s.bytes, 256);
  CUDA_CHECK(cudaMalloc(&d_ws, total));
  size_t off = 0;
  for (auto& s : slots) { *s.p = (char*)d_ws + off; off = align_up(off + s.bytes, 256); }
  CUDA_CHECK(cudaMalloc(&d_cublas_ws, kCublasWorkspace));
}

void CudaBackend::Impl::destroy_graphs() {
  for (auto& g : graphs) cudaGraphExecDestroy(g.second);
  graphs.clear();
}

void CudaBackend::Impl::ensure_input_capacity(size_t bytes) {
  if (bytes <= in_cap) return;
  CUDA_CHECK(cudaStreamSynchronize(stream));
  destroy_graphs();  // they captured the old device pointers
  const size_t cap = align_up(std::max(bytes, in_cap * 2), 4096);
  if (h_in) cudaFreeHost(h_in);
  if (d_in) cudaFree(d_in);
  h_in = nullptr;
  d_in = nullptr;
  in_cap = 0;
  CUDA_CHECK(cudaHostAlloc((void**)&h_in, cap, cudaHostAllocDefault));
  CUDA_CHECK(cudaMalloc((void**)&d_in, cap));
  in_cap = cap;
}

int CudaBackend::Impl::choose_splits(int n_items, int T) const {
  // Flash-decoding: split the keys when (items x kv heads) cannot fill ~4 blocks per SM.
  const int64_t blocks = (int64_t)n_items * KV;
  int s = (int)std::min<int64_t>(32, std::max<int64_t>(1, ceil_div(4 * (int64_t)sms, std::max<int64_t>(blocks, 1))));
  while (s > 1 && (int64_t)T * H * s > part_rows) s--;
  return s;
}

CudaBackend::Impl::Prepared CudaBackend::Impl::prepare(const std::vector<BatchSeq>& seqs,
                                                       const std::vector<Backend::DeviceSample>* samples,
                                                       int pad_to) {
  Prepared P;
  const int nh_full = std::min(group, kAttnQR), nt_full = std::max(1, kAttnQR / nh_full);
  const int hchunks = (int)ceil_div(group, nh_full);
  int T = 0, n_out = 0, n_items = 0;
  size_t n_bt = 1;  // entry 0: a dummy table {block 0} for padding sequences
  for (const BatchSeq& s : seqs) {
    ENGINE_CHECK(s.num_tokens > 0, "internal", "cuda: empty sequence slice");
    ENGINE_CHECK(s.start_pos + s.num_tokens <= opt.max_pos, "internal", "cuda: position beyond max_pos");
    const int64_t need = ceil_div(s.start_pos + s.num_tokens, kBlockSize);
    ENGINE_CHECK(s.block_table_len >= need, "internal", "cuda: block table too short");
    T += (int)s.num_tokens;
    n_out += s.need_output;
    n_items += hchunks * (int)ceil_div(s.num_tokens, nt_full);
    n_bt += (size_t)need;
  }
  ENGINE_CHECK(T <= opt.max_tokens, "internal", "cuda: batch of " << T << " tokens exceeds " << opt.max_tokens);
  ENGINE_CHECK(!samples || (int)samples->size() == n_out, "internal", "cuda: samples/outputs mismatch");
  const int n_real_seqs = (int)seqs.size();
  int n_seqs = n_real_seqs;
  if (pad_to > 0) {  // decode bucket: every sequence has one token
    const int extra = pad_to - n_real_seqs;
    T += extra; n_out += extra; n_seqs += extra; n_items += extra * hchunks;
  }
  P.T = T; P.n_seqs = n_seqs; P.n_items = n_items; P.n_out = n_out;
  P.lay = make_layout(T, n_seqs, n_items, n_out);
  P.bytes = P.lay.bt + n_bt * 4;
  ensure_input_capacity(P.bytes);
  P.splits = choose_splits(n_items, T);

  int32_t* tok = (int32_t*)(h_in + P.lay.tokens);
  int32_t* pos = (int32_t*)(h_in + P.lay.positions);
  int32_t* slot = (int32_t*)(h_in + P.lay.slots);
  int32_t* oidx = (int32_t*)(h_in + P.lay.out_idx);
  int32_t* btoff = (int32_t*)(h_in + P.lay.bt_off);
  AttnItem* items = (AttnItem*)(h_in + P.lay.items);
  SampleParam* prm = (SampleParam*)(h_in + P.lay.params);
  int32_t* bt = (int32_t*)(h_in + P.lay.bt);
  bt[0] = 0;
  size_t bt_n = 1;
  int t = 0, o = 0, it_n = 0;
  auto add_items = [&](int t0, int ntok, int seq) {
    for (int h0 = 0; h0 < group; h0 += nh_full)
      for (int j = 0; j < ntok; j += nt_full) {
        AttnItem a{};
        a.t0 = t0 + j;
        a.nt = std::min(nt_full, ntok - j);
        a.h0 = h0;
        a.nh = std::min(nh_full, group - h0);
        a.seq = seq;
        items[it_n++] = a;
      }
  };
  for (int i = 0; i < n_real_seqs; i++) {
    const BatchSeq& s = seqs[i];
    const int64_t need = ceil_div(s.start_pos + s.num_tokens, kBlockSize);
    btoff[i] = (int32_t)bt_n;
    for (int64_t b = 0; b < need; b++) {
      ENGINE_CHECK(s.block_table[b] >= 0 && s.block_table[b] < num_blocks, "internal", "cuda: block id out of range");
      bt[bt_n++] = s.block_table[b];
    }
    add_items(t, (int)s.num_tokens, i);
    for (int64_t j = 0; j < s.num_tokens; j++, t++) {
      const int64_t p = s.start_pos + j;
      tok[t] = s.tokens[j];
      pos[t] = (int32_t)p;
      slot[t] = s.block_table[p / kBlockSize] * (int32_t)kBlockSize + (int32_t)(p % kBlockSize);
    }
    if (s.need_output) {
      oidx[o] = t - 1;
      SampleParam sp{};
      if (samples) {
        const Backend::DeviceSample& d = (*samples)[o];
        sp.temperature = d.params.temperature;
        sp.top_p = d.params.top_p;
        sp.top_k = (int32_t)std::min<int64_t>(d.params.top_k, INT32_MAX);
        sp.u = sampling_uniform(d.params.seed, d.pos);
        sp.want_logprob = d.want_logprob;
      }
      prm[o] = sp;
      o++;
    }
  }
  for (int i = n_real_seqs; i < n_seqs; i++) {  // padding: token 0 at position 0, no KV write
    btoff[i] = 0;
    add_items(t, 1, i);
    tok[t] = 0; pos[t] = 0; slot[t] = -1;
    oidx[o] = t;
    prm[o] = SampleParam{};  // greedy, no logprob
    t++; o++;
  }
  return P;
}

void CudaBackend::Impl::enqueue_layers(const Prepared& P, bool want_f32_hidden) {
  const int T = P.T;
  const int32_t* d_tokens = in_ptr<int32_t>(P.lay.tokens);
  const int32_t* d_pos = in_ptr<int32_t>(P.lay.positions);
  embedding(d_tokens, embed, x, T, hid, stream);
  rope_table(d_pos, inv_freq, cos_t, sin_t, T, D / 2, stream);
  const size_t layer_kv = (size_t)num_blocks * KV * kBlockSize * D;  // elements of K (or V) per layer
  AttnParams ap{};
  ap.q = q;
  ap.positions = d_pos;
  ap.items = in_ptr<AttnItem>(P.lay.items);
  ap.bt_offsets = in_ptr<int32_t>(P.lay.bt_off);
  ap.block_tables = in_ptr<int32_t>(P.lay.bt);
  ap.out = attn;
  ap.part_acc = part_acc;
  ap.part_ml = part_ml;
  ap.H = H; ap.KV = KV; ap.group = group; ap.splits = P.splits;
  ap.scale_log2 = (float)(1.4426950408889634 / std::sqrt((double)D));
  for (int l = 0; l < L; l++) {
    const LayerDev& w = layers[l];
    bf16* kc = d_kv + (size_t)l * 2 * layer_kv;
    bf16* vc = kc + layer_kv;
    rmsnorm(x, nullptr, nullptr, w.input_norm, xn, nullptr, T, hid, eps, stream);
    matmul(T, qkv_dim, hid, xn, hid, w.wqkv, hid, qkv, qkv_dim);
    qkv_rope_kv(qkv, w.bqkv, w.q_norm, w.k_norm, cos_t, sin_t, in_ptr<int32_t>(P.lay.slots), q, kc, vc, T, H, KV, D,
                eps, stream);
    ap.k_cache = kc;
    ap.v_cache = vc;
    paged_attention(ap, P.n_items, T, D, part_rows, stream);
    matmul(T, hid, H * D, attn, H * D, w.wo, H * D, x, hid, 1.0f, 1.0f);
    rmsnorm(x, nullptr, nullptr, w.post_norm, xn, nullptr, T, hid, eps, stream);
    matmul(T, 2 * I, hid, xn, hid, w.w_gate_up, hid, gu, 2 * I);
    swiglu(gu, act, T, I, stream);
    matmul(T, hid, I, act, I, w.w_down, I, x, hid, 1.0f, 1.0f);
  }
  rmsnorm(x, nullptr, in_ptr<int32_t>(P.lay.out_idx), final_norm, hsel, want_f32_hidden ? hsel_f32 : nullptr,
          P.n_out, hid, eps, stream);
}

void CudaBackend::Impl::enqueue_sampling(const Prepared& P) {
  const SampleParam* prm = in_ptr<SampleParam>(P.lay.params);
  for (int r0 = 0; r0 < P.n_out; r0 += kLogitRows) {
    const int rows = std::min(kLogitRows, P.n_out - r0);
    matmul(rows, V, hid, hsel + (size_t)r0 * hid, hid, lm_head, hid, logits, V);
    sample_rows(logits, rows, V, prm + r0, d_tok + r0, d_lp + r0, stream);
  }
}

// ---- CudaBackend ----------------------------------------------------------------------------

size_t CudaBackend::bytes_per_block(const ModelConfig& c) {
  return 2 * (size_t)c.num_layers * kBlockSize * c.num_kv_heads * c.head_dim * 2;
}

CudaBackend::CudaBackend(const ModelConfig& cfg, ModelWeights weights, const CudaOptions& opt)
    : impl_(std::make_unique<Impl>(cfg, weights, nullptr, opt)) {}

CudaBackend::CudaBackend(const ModelConfig& cfg, const TensorStore& store, const CudaOptions& opt) {
  ModelWeights vectors = load_weights(cfg, store, /*with_matrices=*/false);
  impl_ = std::make_unique<Impl>(cfg, vectors, &store, opt);
}

CudaBackend::~CudaBackend() = default;

int64_t CudaBackend::max_batch_tokens() const { return impl_->opt.max_tokens; }
int64_t CudaBackend::num_blocks() const { return impl_->num_blocks; }
size_t CudaBackend::kv_cache_bytes() const { return impl_->kv_bytes; }

std::string CudaBackend::device_description() const {
  const cudaDeviceProp& p = impl_->prop;
  char buf[96];
  std::snprintf(buf, sizeof buf, " (sm_%d%d, %d SMs, %.1f GiB)", p.major, p.minor, p.multiProcessorCount,
                (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
  return std::string(p.name) + buf;
}

void CudaBackend::forward(const std::vector<BatchSeq>& seqs, float* hidden_out) {
  Impl& m = *impl_;
  if (seqs.empty()) return;
  const Impl::Prepared P = m.prepare(seqs, nullptr, 0);
  CUDA_CHECK(cudaMemcpyAsync(m.d_in, m.h_in, P.bytes, cudaMemcpyHostToDevice, m.stream));
  m.enqueue_layers(P, true);
  if (P.n_out > 0)
    CUDA_CHECK(cudaMemcpyAsync(hidden_out, m.hsel_f32, (size_t)P.n_out * m.hid * 4, cudaMemcpyDeviceToHost, m.stream));
  CUDA_CHECK(cudaStreamSynchronize(m.stream));
}

void CudaBackend::lm_head(const float* hidden, int64_t rows, float* logits) {
  Impl& m = *impl_;
  const int64_t cap = std::max<int64_t>(16, std::min<int64_t>(kLogitRows, m.opt.max_tokens));  // = R
  for (int64_t r0 = 0; r0 < rows; r0 += cap) {
    const int n = (int)std::min(cap, rows - r0);
    CUDA_CHECK(cudaMemcpyAsync(m.hsel_f32, hidden + r0 * m.hid, (size_t)n * m.hid * 4, cudaMemcpyHostToDevice, m.stream));
    f32_to_bf16(m.hsel_f32, m.hsel, (int64_t)n * m.hid, m.stream);
    m.matmul(n, m.V, m.hid, m.hsel, m.hid, m.lm_head, m.hid, m.logits, m.V);
    CUDA_CHECK(cudaMemcpyAsync(logits + r0 * m.V, m.logits, (size_t)n * m.V * 4, cudaMemcpyDeviceToHost, m.stream));
    CUDA_CHECK(cudaStreamSynchronize(m.stream));
  }
}

bool CudaBackend::forward_sample(const std::vector<BatchSeq>& seqs, const std::vector<DeviceSample>& samples,
                                 int32_t* tokens_out, float* logprobs_out) {
  Impl& m = *impl_;
  if (seqs.empty()) return true;
  // Decode bucket?
  int bucket = 0;
  bool decode = m.opt.cuda_graphs;
  for (const BatchSeq& s : seqs) decode = decode && s.num_tokens == 1 && s.need_output;
  if (decode) bucket = decode_graph_bucket((int)seqs.size(), m.opt.max_tokens);
  const Impl::Prepared P = m.prepare(seqs, &samples, bucket);
  const int n_real = (int)samples.size();
  CUDA_CHECK(cudaMemcpyAsync(m.d_in, m.h_in, P.bytes, cudaMemcpyHostToDevice, m.stream));
  auto enqueue_all = [&]() {
    m.enqueue_layers(P, false);
    m.enqueue_sampling(P);
    CUDA_CHECK(cudaMemcpyAsync(m.h_tok, m.d_tok, (size_t)P.n_out * 4, cudaMemcpyDeviceToHost, m.stream));
    CUDA_CHECK(cudaMemcpyAsync(m.h_lp, m.d_lp, (size_t)P.n_out * 4, cudaMemcpyDeviceToHost, m.stream));
  };
  if (bucket > 0 && P.n_out <= kLogitRows) {
    auto g = m.graphs.find(bucket);
    if (g != m.graphs.end()) {
      CUDA_CHECK(cudaGraphLaunch(g->second, m.stream));
    } else {
      enqueue_all();  // eager run of this step (also warms cuBLAS up for the capture)
      CUDA_CHECK(cudaStreamSynchronize(m.stream));
      // Capture once the bucket has run eagerly; the captured work is not executed now.
      cudaGraph_t graph = nullptr;
      CUDA_CHECK(cudaStreamBeginCapture(m.stream, cudaStreamCaptureModeThreadLocal));
      capturing_graph() = true;
      try {
        enqueue_all();
      } catch (...) {
        capturing_graph() = false;
        cudaStreamEndCapture(m.stream, &graph);
        if (graph) cudaGraphDestroy(graph);
        throw;
      }
      capturing_graph() = false;
      CUDA_CHECK(cudaStreamEndCapture(m.stream, &graph));
      cudaGraphExec_t exec = nullptr;
      const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
      cudaGraphDestroy(graph);
      CUDA_CHECK(e);
      m.graphs[bucket] = exec;
    }
  } else {
    enqueue_all();
  }
  CUDA_CHECK(cudaStreamSynchronize(m.stream));
  std::memcpy(tokens_out, m.h_tok, (size_t)n_real * 4);
  std::memcpy(logprobs_out, m.h_lp, (size_t)n_real * 4);
  return true;
}

}  // namespace engine::cuda
