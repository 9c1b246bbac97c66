// model.cpp — weight loading (HF names -> LayerWeights) and random test models.
#include "model.h"

#include <string>

#include "common.h"

namespace engine {

// Copies tensor `name` of shape [rows, cols] into dst at row offset `row0` of a matrix.
static void load_rows(const TensorStore& st, const std::string& name, int64_t rows, int64_t cols,
                      std::vector<float>& dst, int64_t row0) {
  st.load_f32(name, {rows, cols}, dst.data() + row0 * cols);
}

ModelWeights load_weights(const ModelConfig& c, const TensorStore& st) {
  ModelWeights w;
  const int64_t hid = c.hidden_size, H = c.num_heads, KV = c.num_kv_heads, D = c.head_dim;
  const int64_t I = c.intermediate_size;
  w.dtype = st.get("model.embed_tokens.weight").dtype;
  w.embed = st.load_f32("model.embed_tokens.weight", {c.vocab_size, hid});
  // Tied checkpoints usually omit lm_head.weight; some untied-looking ones omit it too.
  if (st.has("lm_head.weight") && !c.tie_word_embeddings)
    w.lm_head = st.load_f32("lm_head.weight", {c.vocab_size, hid});
  w.final_norm = st.load_f32("model.norm.weight", {hid});
  w.layers.resize(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; l++) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights& L = w.layers[l];
    L.input_norm = st.load_f32(p + "input_layernorm.weight", {hid});
    L.post_norm = st.load_f32(p + "post_attention_layernorm.weight", {hid});
    L.wqkv.resize((H + 2 * KV) * D * hid);
    load_rows(st, p + "self_attn.q_proj.weight", H * D, hid, L.wqkv, 0);
    load_rows(st, p + "self_attn.k_proj.weight", KV * D, hid, L.wqkv, H * D);
    load_rows(st, p + "self_attn.v_proj.weight", KV * D, hid, L.wqkv, (H + KV) * D);
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
    L.wo = st.load_f32(p + "self_attn.o_proj.weight", {hid, H * D});
    L.w_gate_up.resize(2 * I * hid);
    load_rows(st, p + "mlp.gate_proj.weight", I, hid, L.w_gate_up, 0);
    load_rows(st, p + "mlp.up_proj.weight", I, hid, L.w_gate_up, I);
    L.w_down = st.load_f32(p + "mlp.down_proj.weight", {hid, I});
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
