// model.cpp — weight loading (HF names -> LayerWeights) and random test models.
#include "model.h"

#include <string>

#include "common.h"

namespace engine {

int64_t MatrixParts::numel() const {
  int64_t rows = 0;
  for (const TensorRows& p : parts) rows += p.rows;
  return rows * cols;
}

ModelMatrixParts matrix_parts(const ModelConfig& c, const TensorStore& st) {
  const int64_t hid = c.hidden_size, H = c.num_heads, KV = c.num_kv_heads, D = c.head_dim;
  const int64_t I = c.intermediate_size;
  auto matrix = [&](std::vector<TensorRows> parts, int64_t cols) {
    for (const TensorRows& p : parts) {
      const std::vector<int64_t>& shape = st.get(p.name).shape;
      ENGINE_CHECK(shape == std::vector<int64_t>({p.rows, cols}), "internal",
                   "tensor " << p.name << " has shape " << shape_str(shape) << ", expected "
                             << shape_str({p.rows, cols}));
    }
    return MatrixParts{std::move(parts), cols};
  };
  ModelMatrixParts m;
  m.embed = matrix({{"model.embed_tokens.weight", c.vocab_size}}, hid);
  // Tied checkpoints usually omit lm_head.weight; some untied-looking ones omit it too.
  if (st.has("lm_head.weight") && !c.tie_word_embeddings) m.lm_head = matrix({{"lm_head.weight", c.vocab_size}}, hid);
  m.layers.resize(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; l++) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerMatrixParts& L = m.layers[l];
    L.wqkv = matrix({{p + "self_attn.q_proj.weight", H * D}, {p + "self_attn.k_proj.weight", KV * D},
                     {p + "self_attn.v_proj.weight", KV * D}}, hid);
    L.wo = matrix({{p + "self_attn.o_proj.weight", hid}}, H * D);
    L.w_gate_up = matrix({{p + "mlp.gate_proj.weight", I}, {p + "mlp.up_proj.weight", I}}, hid);
    L.w_down = matrix({{p + "mlp.down_proj.weight", hid}}, I);
  }
  return m;
}

// The matrix as f32, its parts stacked.
static std::vector<float> load_matrix(const TensorStore& st, const MatrixParts& m) {
  std::vector<float> v((size_t)m.numel());
  int64_t row0 = 0;
  for (const TensorRows& p : m.parts) {
    st.load_f32(p.name, {p.rows, m.cols}, v.data() + row0 * m.cols);
    row0 += p.rows;
  }
  return v;
}

ModelWeights load_weights(const ModelConfig& c, const TensorStore& st, bool with_matrices) {
  ModelWeights w;
  const int64_t hid = c.hidden_size, H = c.num_heads, KV = c.num_kv_heads, D = c.head_dim;
  const ModelMatrixParts m = matrix_parts(c, st);
  w.dtype = st.get("model.embed_tokens.weight").dtype;
  if (with_matrices) {
    w.embed = load_matrix(st, m.embed);
    w.lm_head = load_matrix(st, m.lm_head);
  }
  w.final_norm = st.load_f32("model.norm.weight", {hid});
  w.layers.resize(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; l++) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights& L = w.layers[l];
    L.input_norm = st.load_f32(p + "input_layernorm.weight", {hid});
    L.post_norm = st.load_f32(p + "post_attention_layernorm.weight", {hid});
    if (c.attention_bias) {
      L.bqkv.resize((H + 2 * KV) * D);
      st.load_f32(p + "self_attn.q_proj.bias", {H * D}, L.bqkv.data());
      st.load_f32(p + "self_attn.k_proj.bias", {KV * D}, L.bqkv.data() + H * D);
      st.load_f32(p + "self_attn.v_proj.bias", {KV * D}, L.bqkv.data() + (H + KV) * D);
    }
    if (c.qk_norm) {
      L.q_norm = st.load_f32(p + "self_attn.q_norm.weight", {D});
      L.k_norm = st.load_f32(p + "self_attn.k_norm.weight", {D});
    }
    if (with_matrices) {
      L.wqkv = load_matrix(st, m.layers[l].wqkv);
      L.wo = load_matrix(st, m.layers[l].wo);
      L.w_gate_up = load_matrix(st, m.layers[l].w_gate_up);
      L.w_down = load_matrix(st, m.layers[l].w_down);
    }
  }
  return w;
}

ModelWeights random_weights(const ModelConfig& c, uint64_t seed, float scale) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  auto fill = [&](std::vector<float>& v, size_t n) {
    v.resize(n);
    for (auto& x : v) {  // xorshift64*: deterministic and dependency-free
      s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
      const uint64_t r = s * 2685821657736338717ull;
      x = scale * (float)((double)(r >> 11) * 0x1.0p-53 * 2.0 - 1.0);
    }
  };
  auto ones = [](std::vector<float>& v, size_t n) { v.assign(n, 1.0f); };
  const int64_t hid = c.hidden_size, H = c.num_heads, KV = c.num_kv_heads, D = c.head_dim;
  const int64_t I = c.intermediate_size;
  ModelWeights w;
  fill(w.embed, c.vocab_size * hid);
  if (!c.tie_word_embeddings) fill(w.lm_head, c.vocab_size * hid);
  ones(w.final_norm, hid);
  w.layers.resize(c.num_layers);
  for (auto& L : w.layers) {
    ones(L.input_norm, hid);
    ones(L.post_norm, hid);
    fill(L.wqkv, (H + 2 * KV) * D * hid);
    if (c.attention_bias) fill(L.bqkv, (H + 2 * KV) * D);
    if (c.qk_norm) { ones(L.q_norm, D); ones(L.k_norm, D); }
    fill(L.wo, hid * H * D);
    fill(L.w_gate_up, 2 * I * hid);
    fill(L.w_down, hid * I);
  }
  return w;
}

}  // namespace engine
