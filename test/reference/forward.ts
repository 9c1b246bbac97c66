/**
 * An independent reference forward pass for Llama-family decoder-only transformers
 * (Llama, Mistral, Qwen2, Qwen3), in plain TypeScript with float64 arithmetic.
 *
 * Written from the model equations (Hugging Face `modeling_llama.py` / `modeling_qwen3.py`),
 * sharing no code with the native engine. Tokens are processed one at a time against a plain
 * (non-paged) KV cache, which is mathematically the same as a causal-masked batched prefill.
 *
 * For each layer, with x the residual stream of one token at position p:
 *   h   = RMSNorm(x) ⊙ w_in                                  RMSNorm(v) = v / sqrt(mean(v²) + eps)
 *   q   = W_q h (+ b_q), k = W_k h (+ b_k), v = W_v h (+ b_v) split into heads of head_dim
 *   Qwen3 only: q_h = RMSNorm(q_h) ⊙ w_qn, k_h = RMSNorm(k_h) ⊙ w_kn   (per head, before RoPE)
 *   RoPE (rotate-half): for i < d/2, θ_i = p · inv_freq_i,
 *        out_i = a_i cos θ_i − a_{i+d/2} sin θ_i,  out_{i+d/2} = a_{i+d/2} cos θ_i + a_i sin θ_i
 *        inv_freq_i = rope_theta^(−2i/d), optionally rescaled by llama3 rope_scaling
 *   attention (GQA: query head h reads kv head ⌊h / (H / H_kv)⌋), causal over positions ≤ p:
 *        o_h = Σ_j softmax_j(q_h·k_j / sqrt(d)) v_j
 *   x  += W_o [o_1 … o_H]
 *   x  += W_down (silu(W_gate h') ⊙ W_up h'),  h' = RMSNorm(x) ⊙ w_post,  silu(z) = z / (1 + e^−z)
 * then logits = W_lm RMSNorm(x) ⊙ w_final, with W_lm = embed_tokens when embeddings are tied.
 */
import * as fs from "node:fs"
import * as path from "node:path"
import { readSafetensors } from "../../src/runtime/internal/safetensors.js"

export interface ReferenceConfig {
  readonly architecture: string
  readonly modelType: string
  readonly vocabSize: number
  readonly hidden: number
  readonly intermediate: number
  readonly numLayers: number
  readonly numHeads: number
  readonly numKvHeads: number
  readonly headDim: number
  readonly eps: number
  readonly ropeTheta: number
  readonly maxPositions: number
  readonly tied: boolean
  readonly qkNorm: boolean
}

interface Layer {
  inNorm: Float64Array
  wq: Float64Array
  wk: Float64Array
  wv: Float64Array
  bq: Float64Array | undefined
  bk: Float64Array | undefined
  bv: Float64Array | undefined
  wo: Float64Array
  qNorm: Float64Array | undefined
  kNorm: Float64Array | undefined
  postNorm: Float64Array
  wGate: Float64Array
  wUp: Float64Array
  wDown: Float64Array
}

// ---------------------------------------------------------------------------------------
// Elementary operations (float64)

/** y = W x, W row-major [rows, cols]. */
const matvec = (w: Float64Array, x: Float64Array, rows: number, cols: number, bias?: Float64Array): Float64Array => {
  const y = new Float64Array(rows)
  for (let r = 0; r < rows; r++) {
    let s = 0
    const base = r * cols
    for (let c = 0; c < cols; c++) s += w[base + c]! * x[c]!
    y[r] = bias === undefined ? s : s + bias[r]!
  }
  return y
}

/** RMSNorm over x[off .. off+n) in place into out[off ..): x / sqrt(mean(x²) + eps) ⊙ w. */
const rmsNorm = (x: Float64Array, w: Float64Array, eps: number, off = 0, n = w.length, out: Float64Array = new Float64Array(x.length)): Float64Array => {
  let ss = 0
  for (let i = 0; i < n; i++) ss += x[off + i]! * x[off + i]!
  const inv = 1 / Math.sqrt(ss / n + eps)
  for (let i = 0; i < n; i++) out[off + i] = x[off + i]! * inv * w[i]!
  return out
}

const silu = (z: number): number => z / (1 + Math.exp(-z))

/** inv_freq_i = theta^(-2i/d), with the llama3 rescaling when configured. */
export const ropeInvFreq = (headDim: number, theta: number, scaling: Record<string, unknown> | null | undefined): Float64Array => {
  const half = headDim / 2
  const inv = new Float64Array(half)
  for (let i = 0; i < half; i++) inv[i] = 1 / Math.pow(theta, (2 * i) / headDim)
  const type = scaling ? (scaling["rope_type"] ?? scaling["type"]) : undefined
  if (type === undefined || type === "default") return inv
  if (type !== "llama3") throw new Error(`reference: unsupported rope_scaling type ${String(type)}`)
  const factor = Number(scaling!["factor"])
  const lowFreqFactor = Number(scaling!["low_freq_factor"])
  const highFreqFactor = Number(scaling!["high_freq_factor"])
  const oldContext = Number(scaling!["original_max_position_embeddings"])
  const lowFreqWavelen = oldContext / lowFreqFactor
  const highFreqWavelen = oldContext / highFreqFactor
  for (let i = 0; i < half; i++) {
    const f = inv[i]!
    const wavelen = (2 * Math.PI) / f
    if (wavelen < highFreqWavelen) {
      inv[i] = f // high frequencies: unchanged
    } else if (wavelen > lowFreqWavelen) {
      inv[i] = f / factor // low frequencies: scaled down by factor
    } else {
      // in between: interpolate smoothly
      const smooth = (oldContext / wavelen - lowFreqFactor) / (highFreqFactor - lowFreqFactor)
      inv[i] = (1 - smooth) * (f / factor) + smooth * f
    }
  }
  return inv
}

/** Rotate-half RoPE of one head vector a[off .. off+d) in place at position pos. */
const applyRope = (a: Float64Array, off: number, d: number, pos: number, invFreq: Float64Array): void => {
  const half = d / 2
  for (let i = 0; i < half; i++) {
    const th = pos * invFreq[i]!
    const c = Math.cos(th)
    const s = Math.sin(th)
    const x1 = a[off + i]!
    const x2 = a[off + half + i]!
    a[off + i] = x1 * c - x2 * s
    a[off + half + i] = x2 * c + x1 * s
  }
}

// ---------------------------------------------------------------------------------------
// Model

export class ReferenceModel {
  private constructor(
    readonly config: ReferenceConfig,
    readonly rawConfig: Record<string, unknown>,
    private readonly embed: Float64Array,
    private readonly layers: ReadonlyArray<Layer>,
    private readonly finalNorm: Float64Array,
    private readonly lmHead: Float64Array,
    readonly invFreq: Float64Array
  ) {}

  /** Loads config.json and every *.safetensors file of a checkpoint directory. */
  static load(dir: string): ReferenceModel {
    const raw = JSON.parse(fs.readFileSync(path.join(dir, "config.json"), "utf8")) as Record<string, unknown>
    const weights = new Map<string, { shape: ReadonlyArray<number>; data: Float32Array }>()
    for (const f of fs.readdirSync(dir).filter((f) => f.endsWith(".safetensors")).sort()) {
      for (const [name, t] of readSafetensors(path.join(dir, f)).tensors) weights.set(name, t)
    }
    const num = (k: string, dflt?: number): number => {
      const v = raw[k]
      if (typeof v === "number") return v
      if (dflt !== undefined) return dflt
      throw new Error(`reference: config.json lacks ${k}`)
    }
    const hidden = num("hidden_size")
    const numHeads = num("num_attention_heads")
    const get = (name: string, shape: ReadonlyArray<number>): Float64Array => {
      const t = weights.get(name)
      if (t === undefined) throw new Error(`reference: missing tensor ${name}`)
      if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
        throw new Error(`reference: tensor ${name} has shape [${t.shape.join(",")}], expected [${shape.join(",")}]`)
      }
      return Float64Array.from(t.data)
    }
    const opt = (name: string, shape: ReadonlyArray<number>): Float64Array | undefined => (weights.has(name) ? get(name, shape) : undefined)
    const hasLmHead = weights.has("lm_head.weight")
    const tiedCfg = raw["tie_word_embeddings"]
    const config: ReferenceConfig = {
      architecture: ((raw["architectures"] as Array<string> | undefined) ?? ["?"])[0]!,
      modelType: String(raw["model_type"] ?? "?"),
      vocabSize: num("vocab_size"),
      hidden,
      intermediate: num("intermediate_size"),
      numLayers: num("num_hidden_layers"),
      numHeads,
      numKvHeads: num("num_key_value_heads", numHeads),
      headDim: typeof raw["head_dim"] === "number" ? (raw["head_dim"] as number) : hidden / numHeads,
      eps: num("rms_norm_eps", 1e-6),
      ropeTheta: num("rope_theta", 10000),
      maxPositions: num("max_position_embeddings", 2048),
      tied: typeof tiedCfg === "boolean" ? tiedCfg || !hasLmHead : !hasLmHead,
      qkNorm: weights.has("model.layers.0.self_attn.q_norm.weight")
    }
    const c = config
    const qDim = c.numHeads * c.headDim
    const kvDim = c.numKvHeads * c.headDim
    const layers: Array<Layer> = []
    for (let i = 0; i < c.numLayers; i++) {
      const p = `model.layers.${i}`
      layers.push({
        inNorm: get(`${p}.input_layernorm.weight`, [hidden]),
        wq: get(`${p}.self_attn.q_proj.weight`, [qDim, hidden]),
        wk: get(`${p}.self_attn.k_proj.weight`, [kvDim, hidden]),
        wv: get(`${p}.self_attn.v_proj.weight`, [kvDim, hidden]),
        bq: opt(`${p}.self_attn.q_proj.bias`, [qDim]),
        bk: opt(`${p}.self_attn.k_proj.bias`, [kvDim]),
        bv: opt(`${p}.self_attn.v_proj.bias`, [kvDim]),
        wo: get(`${p}.self_attn.o_proj.weight`, [hidden, qDim]),
        qNorm: c.qkNorm ? get(`${p}.self_attn.q_norm.weight`, [c.headDim]) : undefined,
        kNorm: c.qkNorm ? get(`${p}.self_attn.k_norm.weight`, [c.headDim]) : undefined,
        postNorm: get(`${p}.post_attention_layernorm.weight`, [hidden]),
        wGate: get(`${p}.mlp.gate_proj.weight`, [c.intermediate, hidden]),
        wUp: get(`${p}.mlp.up_proj.weight`, [c.intermediate, hidden]),
        wDown: get(`${p}.mlp.down_proj.weight`, [hidden, c.intermediate])
      })
    }
    const embed = get("model.embed_tokens.weight", [c.vocabSize, hidden])
    const lmHead = c.tied ? embed : get("lm_head.weight", [c.vocabSize, hidden])
    const invFreq = ropeInvFreq(c.headDim, c.ropeTheta, raw["rope_scaling"] as Record<string, unknown> | null | undefined)
    return new ReferenceModel(config, raw, embed, layers, get("model.norm.weight", [hidden]), lmHead, invFreq)
  }

  /** A fresh sequence with an empty KV cache. */
  session(): ReferenceSession {
    return new ReferenceSession(this)
  }

  /** Full logits of the last token of `tokens` (a fresh session). */
  logits(tokens: ReadonlyArray<number>): Float64Array {
    return this.session().forward(tokens)
  }

  /** @internal one token through every layer; appends to the caches; returns the final hidden state. */
  forwardToken(token: number, pos: number, kCache: Array<Array<Float64Array>>, vCache: Array<Array<Float64Array>>): Float64Array {
    const c = this.config
    if (!Number.isInteger(token) || token < 0 || token >= c.vocabSize) throw new Error(`reference: token ${token} out of range`)
    const d = c.headDim
    const qDim = c.numHeads * d
    const kvDim = c.numKvHeads * d
    const group = c.numHeads / c.numKvHeads
    const scale = 1 / Math.sqrt(d)
    const x = this.embed.slice(token * c.hidden, (token + 1) * c.hidden)
    for (let l = 0; l < c.numLayers; l++) {
      const L = this.layers[l]!
      // --- attention block
      const h = rmsNorm(x, L.inNorm, c.eps)
      const q = matvec(L.wq, h, qDim, c.hidden, L.bq)
      const k = matvec(L.wk, h, kvDim, c.hidden, L.bk)
      const v = matvec(L.wv, h, kvDim, c.hidden, L.bv)
      for (let hd = 0; hd < c.numHeads; hd++) {
        if (L.qNorm) rmsNorm(q, L.qNorm, c.eps, hd * d, d, q)
        applyRope(q, hd * d, d, pos, this.invFreq)
      }
      for (let hd = 0; hd < c.numKvHeads; hd++) {
        if (L.kNorm) rmsNorm(k, L.kNorm, c.eps, hd * d, d, k)
        applyRope(k, hd * d, d, pos, this.invFreq)
      }
      kCache[l]!.push(k)
      vCache[l]!.push(v)
      const keys = kCache[l]!
      const values = vCache[l]!
      const n = keys.length
      const attn = new Float64Array(qDim)
      const scores = new Float64Array(n)
      for (let hd = 0; hd < c.numHeads; hd++) {
        const kvOff = Math.floor(hd / group) * d
        const qOff = hd * d
        let max = -Infinity
        for (let j = 0; j < n; j++) {
          const kj = keys[j]!
          let s = 0
          for (let i = 0; i < d; i++) s += q[qOff + i]! * kj[kvOff + i]!
          s *= scale
          scores[j] = s
          if (s > max) max = s
        }
        let sum = 0
        for (let j = 0; j < n; j++) {
          const e = Math.exp(scores[j]! - max)
          scores[j] = e
          sum += e
        }
        for (let j = 0; j < n; j++) {
          const p = scores[j]! / sum
          const vj = values[j]!
          for (let i = 0; i < d; i++) attn[qOff + i] = attn[qOff + i]! + p * vj[kvOff + i]!
        }
      }
      const o = matvec(L.wo, attn, c.hidden, qDim)
      for (let i = 0; i < c.hidden; i++) x[i] = x[i]! + o[i]!
      // --- MLP block
      const h2 = rmsNorm(x, L.postNorm, c.eps)
      const g = matvec(L.wGate, h2, c.intermediate, c.hidden)
      const u = matvec(L.wUp, h2, c.intermediate, c.hidden)
      for (let i = 0; i < c.intermediate; i++) g[i] = silu(g[i]!) * u[i]!
      const m = matvec(L.wDown, g, c.hidden, c.intermediate)
      for (let i = 0; i < c.hidden; i++) x[i] = x[i]! + m[i]!
    }
    return x
  }

  /** @internal The final hidden state RMSNorm(x) ⊙ w_final (what the LM head reads). */
  finalHidden(x: Float64Array): Float64Array {
    return rmsNorm(x, this.finalNorm, this.config.eps)
  }

  /** @internal logits = W_lm · RMSNorm(x) ⊙ w_final. */
  head(x: Float64Array): Float64Array {
    const c = this.config
    return matvec(this.lmHead, rmsNorm(x, this.finalNorm, c.eps), c.vocabSize, c.hidden)
  }
}

/** One sequence: a plain KV cache (one K and one V vector per layer and position). */
export class ReferenceSession {
  private readonly kCache: Array<Array<Float64Array>>
  private readonly vCache: Array<Array<Float64Array>>
  private pos = 0

  constructor(readonly model: ReferenceModel) {
    this.kCache = Array.from({ length: model.config.numLayers }, () => [])
    this.vCache = Array.from({ length: model.config.numLayers }, () => [])
  }

  /** Number of tokens in the cache (= position of the next token). */
  get position(): number {
    return this.pos
  }

  /** Appends `tokens` (≥ 1) and returns the logits of the last one. */
  forward(tokens: ReadonlyArray<number>): Float64Array {
    if (tokens.length === 0) throw new Error("reference: forward needs at least one token")
    let x: Float64Array | undefined
    for (const t of tokens) x = this.model.forwardToken(t, this.pos++, this.kCache, this.vCache)
    return this.model.head(x!)
  }

  /** Appends `tokens` and returns the last one's final hidden state, L2-normalised (last-token pooling). */
  embed(tokens: ReadonlyArray<number>): Float64Array {
    let x: Float64Array | undefined
    for (const t of tokens) x = this.model.forwardToken(t, this.pos++, this.kCache, this.vCache)
    const h = this.model.finalHidden(x!)
    let norm = 0
    for (const v of h) norm += v * v
    return h.map((v) => v / Math.sqrt(norm))
  }

  /** Appends `tokens` and returns the logits after every one of them. */
  forwardAll(tokens: ReadonlyArray<number>): Array<Float64Array> {
    return tokens.map((t) => this.model.head(this.model.forwardToken(t, this.pos++, this.kCache, this.vCache)))
  }
}

// ---------------------------------------------------------------------------------------
// Helpers for comparisons

/** Index of the largest value (ties → lowest index), like the engine's greedy sampler. */
export const argmax = (xs: ArrayLike<number>): number => {
  let best = 0
  for (let i = 1; i < xs.length; i++) if (xs[i]! > xs[best]!) best = i
  return best
}

/** max_i |e_i − r_i| / max_i |r_i|. */
export const maxRelativeError = (engine: ArrayLike<number>, ref: ArrayLike<number>): number => {
  if (engine.length !== ref.length) throw new Error(`length mismatch: ${engine.length} vs ${ref.length}`)
  let num = 0
  let den = 0
  for (let i = 0; i < ref.length; i++) {
    num = Math.max(num, Math.abs(engine[i]! - ref[i]!))
    den = Math.max(den, Math.abs(ref[i]!))
  }
  return num / den
}

/** Elements violating |e − r| ≤ atol + rtol·|r|; returns the count and the worst offender. */
export const elementwiseCheck = (
  engine: ArrayLike<number>,
  ref: ArrayLike<number>,
  atol = 1e-4,
  rtol = 1e-3
): { violations: number; worstIndex: number; worstExcess: number } => {
  let violations = 0
  let worstIndex = -1
  let worstExcess = -Infinity
  for (let i = 0; i < ref.length; i++) {
    const excess = Math.abs(engine[i]! - ref[i]!) - (atol + rtol * Math.abs(ref[i]!))
    if (excess > 0) violations++
    if (excess > worstExcess) {
      worstExcess = excess
      worstIndex = i
    }
  }
  return { violations, worstIndex, worstExcess }
}

/** Gap between the largest and second-largest value (how well separated greedy is). */
export const top2Gap = (xs: ArrayLike<number>): number => {
  let a = -Infinity
  let b = -Infinity
  for (let i = 0; i < xs.length; i++) {
    const v = xs[i]!
    if (v > a) {
      b = a
      a = v
    } else if (v > b) b = v
  }
  return a - b
}
