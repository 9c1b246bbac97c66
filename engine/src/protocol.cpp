// protocol.cpp — see protocol.h.
#include "protocol.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <msgpack.hpp>

#include "common.h"

namespace engine {

namespace {

// An integer as sent on the wire: sign and magnitude, whatever its msgpack encoding.
struct WireInt {
  bool negative = false;
  uint64_t mag = 0;  // |value|
  int64_t clamped() const {  // to int64, saturating
    const uint64_t lim = (uint64_t)std::numeric_limits<int64_t>::max();
    if (!negative) return mag > lim ? std::numeric_limits<int64_t>::max() : (int64_t)mag;
    return mag > lim ? std::numeric_limits<int64_t>::min() : -(int64_t)mag;
  }
};

bool is_absent(const msgpack::object& o) {
  if (o.type == msgpack::type::NIL) return true;
  // msgpackr encodes `undefined` as fixext1 type 0, data 0.
  return o.type == msgpack::type::EXT && o.via.ext.size == 1 && o.via.ext.type() == 0;
}

// Field `key` of map `m`, or nullptr when missing / nil / undefined.
const msgpack::object* field(const msgpack::object& m, const char* key) {
  const size_t klen = std::strlen(key);
  for (uint32_t i = 0; i < m.via.map.size; i++) {
    const msgpack::object& k = m.via.map.ptr[i].key;
    if (k.type == msgpack::type::STR && k.via.str.size == klen &&
        std::memcmp(k.via.str.ptr, key, klen) == 0)
      return is_absent(m.via.map.ptr[i].val) ? nullptr : &m.via.map.ptr[i].val;
  }
  return nullptr;
}

bool to_int(const msgpack::object& o, WireInt* out) {
  switch (o.type) {
    case msgpack::type::POSITIVE_INTEGER:
      *out = {false, o.via.u64};
      return true;
    case msgpack::type::NEGATIVE_INTEGER:
      *out = {true, o.via.i64 == std::numeric_limits<int64_t>::min() ? (uint64_t)1 << 63
                                                                     : (uint64_t)(-o.via.i64)};
      return true;
    case msgpack::type::FLOAT32:
    case msgpack::type::FLOAT64: {
      const double d = o.via.f64;
      if (!std::isfinite(d) || d != std::floor(d) || std::fabs(d) >= 0x1.0p64) return false;
      *out = {d < 0, (uint64_t)std::fabs(d)};
      return true;
    }
    default:
      return false;
  }
}

[[noreturn]] void bad(const std::string& msg) { throw EngineError("bad_message", msg); }

WireInt need_int(const msgpack::object& o, const std::string& what) {
  WireInt w;
  if (!to_int(o, &w)) bad(what + " must be an integer");
  return w;
}

uint64_t need_uint(const msgpack::object& o, const std::string& what) {
  WireInt w = need_int(o, what);
  if (w.negative && w.mag != 0) bad(what + " must be a non-negative integer");
  return w.mag;
}

double need_float(const msgpack::object& o, const std::string& what) {
  if (o.type == msgpack::type::FLOAT32 || o.type == msgpack::type::FLOAT64) return o.via.f64;
  WireInt w;
  if (!to_int(o, &w)) bad(what + " must be a number");
  return w.negative ? -(double)w.mag : (double)w.mag;
}

bool need_bool(const msgpack::object& o, const std::string& what) {
  if (o.type != msgpack::type::BOOLEAN) bad(what + " must be a boolean");
  return o.via.boolean;
}

const msgpack::object& need_array(const msgpack::object& o, const std::string& what) {
  if (o.type != msgpack::type::ARRAY) bad(what + " must be an array");
  return o;
}

std::vector<int64_t> int_array(const msgpack::object& o, const std::string& what) {
  need_array(o, what);
  std::vector<int64_t> v(o.via.array.size);
  for (uint32_t i = 0; i < o.via.array.size; i++) v[i] = need_int(o.via.array.ptr[i], what).clamped();
  return v;
}

std::vector<uint64_t> uint_array(const msgpack::object& o, const std::string& what) {
  need_array(o, what);
  std::vector<uint64_t> v(o.via.array.size);
  for (uint32_t i = 0; i < o.via.array.size; i++) v[i] = need_uint(o.via.array.ptr[i], what);
  return v;
}

StepSeqRequest decode_seq(const msgpack::object& o, size_t i) {
  const std::string at = "seqs[" + std::to_string(i) + "]";
  if (o.type != msgpack::type::MAP) bad(at + " must be a map");
  StepSeqRequest s;
  const msgpack::object* f;
  if (!(f = field(o, "seq_id"))) bad(at + ".seq_id is required");
  s.seq_id = need_uint(*f, at + ".seq_id");
  if (!(f = field(o, "tokens"))) bad(at + ".tokens is required");
  s.tokens = int_array(*f, at + ".tokens");
  if (!(f = field(o, "start_pos"))) bad(at + ".start_pos is required");
  s.start_pos = need_int(*f, at + ".start_pos").clamped();
  if ((f = field(o, "block_table"))) {
    s.has_block_table = true;
    s.block_table = int_array(*f, at + ".block_table");
  }
  if ((f = field(o, "new_blocks"))) {
    s.has_new_blocks = true;
    s.new_blocks = int_array(*f, at + ".new_blocks");
  }
  if ((f = field(o, "sampling"))) {
    if (f->type != msgpack::type::MAP) bad(at + ".sampling must be a map");
    s.has_sampling = true;
    const msgpack::object* g;
    if ((g = field(*f, "temperature"))) s.sampling.temperature = need_float(*g, at + ".sampling.temperature");
    if ((g = field(*f, "top_p"))) s.sampling.top_p = need_float(*g, at + ".sampling.top_p");
    if ((g = field(*f, "top_k"))) {
      s.top_k_raw = need_int(*g, at + ".sampling.top_k").clamped();
      s.sampling.top_k = s.top_k_raw;
    }
    if ((g = field(*f, "seed"))) {
      const WireInt w = need_int(*g, at + ".sampling.seed");
      s.seed_negative = w.negative && w.mag != 0;
      s.sampling.seed = w.mag;
    }
  }
  if ((f = field(o, "sample"))) s.sample = need_bool(*f, at + ".sample");
  if ((f = field(o, "logprobs"))) s.logprobs = need_bool(*f, at + ".logprobs");
  if ((f = field(o, "return_logits"))) s.return_logits = need_bool(*f, at + ".return_logits");
  return s;
}

}  // namespace

Request decode_request(const char* data, size_t len, uint64_t* req_id) {
  *req_id = 0;
  msgpack::object_handle oh;
  try {
    size_t off = 0;
    // Limits bound container sizes by the frame size, so a tiny frame that claims a huge
    // array cannot make the decoder allocate gigabytes.
    const msgpack::unpack_limit limit(len, len, len, len, len, 64);
    oh = msgpack::unpack(data, len, off, nullptr, nullptr, limit);
    if (off != len) bad("trailing bytes after the msgpack value");
  } catch (const EngineError&) {
    throw;
  } catch (const std::exception& e) {
    bad(std::string("not msgpack: ") + e.what());
  }
  const msgpack::object& m = oh.get();
  if (m.type != msgpack::type::MAP) bad("request must be a msgpack map");
  const msgpack::object* f = field(m, "req_id");
  WireInt rid;
  if (!f || !to_int(*f, &rid) || (rid.negative && rid.mag != 0)) bad("req_id must be a non-negative integer");
  *req_id = rid.mag;

  Request r;
  r.req_id = rid.mag;
  if (!(f = field(m, "v"))) bad("v is required");
  WireInt v;
  if (!to_int(*f, &v)) bad("v must be an integer");
  if (v.negative || v.mag != (uint64_t)kProtocolVersion)
    throw EngineError("unsupported_version", "protocol version " + std::string(v.negative ? "-" : "") +
                                                 std::to_string(v.mag) + " is not supported (want 1)");
  if (!(f = field(m, "type")) || f->type != msgpack::type::STR) bad("type must be a string");
  r.type.assign(f->via.str.ptr, f->via.str.size);

  if (r.type == "info" || r.type == "health") {
    // no body
  } else if (r.type == "step") {
    if ((f = field(m, "release"))) r.release = uint_array(*f, "release");
    if ((f = field(m, "packed_outputs"))) r.packed_outputs = need_bool(*f, "packed_outputs");
    if (!(f = field(m, "seqs"))) bad("seqs is required");
    need_array(*f, "seqs");
    r.seqs.reserve(f->via.array.size);
    for (uint32_t i = 0; i < f->via.array.size; i++) r.seqs.push_back(decode_seq(f->via.array.ptr[i], i));
  } else if (r.type == "release") {
    if (!(f = field(m, "seq_ids"))) bad("seq_ids is required");
    r.seq_ids = uint_array(*f, "seq_ids");
  } else if (r.type == "embed") {
    if (!(f = field(m, "tokens"))) bad("tokens is required");
    r.tokens = int_array(*f, "tokens");
  } else {
    throw EngineError("unknown_type", "unknown request type \"" + r.type + "\"");
  }
  return r;
}

// ---- encoding ----

namespace {

using Packer = msgpack::packer<msgpack::sbuffer>;

void key(Packer& p, const char* k) { p.pack_str((uint32_t)std::strlen(k)); p.pack_str_body(k, (uint32_t)std::strlen(k)); }
void str(Packer& p, const std::string& s) { p.pack_str((uint32_t)s.size()); p.pack_str_body(s.data(), (uint32_t)s.size()); }

// Writes the success envelope {v, req_id, ok: true, type} plus room for `body_fields` more.
void ok_header(Packer& p, uint64_t req_id, const char* type, uint32_t body_fields) {
  p.pack_map(4 + body_fields);
  key(p, "v"); p.pack_uint64(kProtocolVersion);
  key(p, "req_id"); p.pack_uint64(req_id);
  key(p, "ok"); p.pack_true();
  key(p, "type"); str(p, type);
}

std::string to_string(const msgpack::sbuffer& b) { return std::string(b.data(), b.size()); }

}  // namespace

std::string encode_error(uint64_t req_id, const std::string& code, const std::string& message) {
  msgpack::sbuffer b;
  Packer p(b);
  p.pack_map(4);
  key(p, "v"); p.pack_uint64(kProtocolVersion);
  key(p, "req_id"); p.pack_uint64(req_id);
  key(p, "ok"); p.pack_false();
  key(p, "error");
  p.pack_map(2);
  key(p, "code"); str(p, code);
  key(p, "message"); str(p, message);
  return to_string(b);
}

std::string encode_info(uint64_t req_id, const InfoReply& r) {
  msgpack::sbuffer b;
  Packer p(b);
  const ModelConfig& c = *r.cfg;
  ok_header(p, req_id, "info", 8);
  key(p, "model");
  p.pack_map(11);
  key(p, "architecture"); str(p, c.architecture);
  key(p, "model_type"); str(p, c.model_type);
  key(p, "vocab_size"); p.pack_uint64(c.vocab_size);
  key(p, "hidden_size"); p.pack_uint64(c.hidden_size);
  key(p, "num_layers"); p.pack_uint64(c.num_layers);
  key(p, "num_heads"); p.pack_uint64(c.num_heads);
  key(p, "num_kv_heads"); p.pack_uint64(c.num_kv_heads);
  key(p, "head_dim"); p.pack_uint64(c.head_dim);
  key(p, "max_position_embeddings"); p.pack_uint64(r.max_position_embeddings);
  key(p, "eos_token_ids");
  p.pack_array((uint32_t)c.eos_token_ids.size());
  for (int64_t e : c.eos_token_ids) p.pack_uint64((uint64_t)e);
  key(p, "dtype"); str(p, r.dtype);
  key(p, "device"); str(p, r.device);
  key(p, "protocol_version"); p.pack_uint64(kProtocolVersion);
  key(p, "block_size"); p.pack_uint64(16);
  key(p, "num_blocks"); p.pack_uint64(r.num_blocks);
  key(p, "kv_cache_bytes"); p.pack_uint64(r.kv_cache_bytes);
  key(p, "num_active_seqs"); p.pack_uint64(r.num_active_seqs);
  key(p, "num_used_blocks"); p.pack_uint64(r.num_used_blocks);
  return to_string(b);
}

std::string encode_health(uint64_t req_id, const HealthReply& r) {
  msgpack::sbuffer b;
  Packer p(b);
  ok_header(p, req_id, "health", 3);
  key(p, "status"); str(p, "ok");
  key(p, "uptime_ms"); p.pack_double(r.uptime_ms);
  key(p, "num_steps"); p.pack_uint64(r.num_steps);
  return to_string(b);
}

namespace {
void pack_output(Packer& p, const StepOutput& o) {
  p.pack_map(1 + o.has_token + o.has_logprob + o.has_logits);
  key(p, "seq_id"); p.pack_uint64(o.seq_id);
  if (o.has_token) { key(p, "token"); p.pack_uint64((uint64_t)o.token); }
  if (o.has_logprob) { key(p, "logprob"); p.pack_double(o.logprob); }
  if (o.has_logits) {
    // x86-64 is little-endian, so the in-memory floats are already f32 LE.
    key(p, "logits");
    const uint32_t n = (uint32_t)(o.logits.size() * sizeof(float));
    p.pack_bin(n);
    p.pack_bin_body((const char*)o.logits.data(), n);
  }
}

// A token-only output whose id fits the packed form.
bool packable(const StepOutput& o) {
  return o.has_token && !o.has_logprob && !o.has_logits && o.seq_id <= 0xFFFFFFFFull && o.token >= 0;
}

void pack_u32_bin(Packer& p, const std::vector<uint32_t>& v) {
  // x86-64 is little-endian: the in-memory array is already u32 LE.
  const uint32_t n = (uint32_t)(v.size() * sizeof(uint32_t));
  p.pack_bin(n);
  p.pack_bin_body((const char*)v.data(), n);
}
}  // namespace

std::string encode_step(uint64_t req_id, const StepReply& r, bool packed) {
  msgpack::sbuffer b;
  Packer p(b);
  if (!packed) {
    ok_header(p, req_id, "step", 3);
    key(p, "outputs");
    p.pack_array((uint32_t)r.outputs.size());
    for (const StepOutput& o : r.outputs) pack_output(p, o);
  } else {
    // Packed: token-only outputs go to two parallel u32 arrays, the rest stay in `outputs`;
    // outputs without a token (prefill chunks) are left out.
    std::vector<uint32_t> seq_ids, tokens;
    seq_ids.reserve(r.outputs.size());
    tokens.reserve(r.outputs.size());
    std::vector<const StepOutput*> rest;
    for (const StepOutput& o : r.outputs) {
      if (packable(o)) {
        seq_ids.push_back((uint32_t)o.seq_id);
        tokens.push_back((uint32_t)o.token);
      } else if (o.has_token || o.has_logprob || o.has_logits) {
        rest.push_back(&o);
      }
    }
    ok_header(p, req_id, "step", 4);
    key(p, "outputs");
    p.pack_array((uint32_t)rest.size());
    for (const StepOutput* o : rest) pack_output(p, *o);
    key(p, "packed");
    p.pack_map(2);
    key(p, "seq_ids"); pack_u32_bin(p, seq_ids);
    key(p, "tokens"); pack_u32_bin(p, tokens);
  }
  key(p, "timings");
  p.pack_map(3);
  key(p, "forward_ms"); p.pack_double(r.forward_ms);
  key(p, "sample_ms"); p.pack_double(r.sample_ms);
  key(p, "total_ms"); p.pack_double(r.total_ms);
  key(p, "num_tokens"); p.pack_uint64(r.num_tokens);
  return to_string(b);
}

std::string encode_release(uint64_t req_id, const ReleaseReply& r) {
  msgpack::sbuffer b;
  Packer p(b);
  ok_header(p, req_id, "release", 2);
  key(p, "released");
  p.pack_array((uint32_t)r.released.size());
  for (uint64_t id : r.released) p.pack_uint64(id);
  key(p, "unknown");
  p.pack_array((uint32_t)r.unknown.size());
  for (uint64_t id : r.unknown) p.pack_uint64(id);
  return to_string(b);
}

std::string encode_embed(uint64_t req_id, const EmbedReply& r) {
  msgpack::sbuffer b;
  Packer p(b);
  ok_header(p, req_id, "embed", 2);
  key(p, "embedding");
  p.pack_array((uint32_t)r.embedding.size());
  for (float x : r.embedding) p.pack_float(x);
  key(p, "forward_ms"); p.pack_double(r.forward_ms);
  return to_string(b);
}

}  // namespace engine
