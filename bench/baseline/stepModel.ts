/**
 * The sim engine's step-time model (engine/src/sim/sim_backend.h, `model_step`), in
 * TypeScript, with the same defaults, so that the baseline server steps at the same pace as
 * `llm-engine --device sim` for the same batch:
 *
 *   bytes = 2·P + Σ_i c_i·kv_tok + T·kv_tok
 *   flops = 2·P·T + 4·L·H·D·Σ_i (n_i·s_i + n_i(n_i+1)/2)
 *   t     = max(bytes / (BW·eff_bw), flops / (F·eff_f)) + overhead
 *
 * for a pass over sequences i with n_i new tokens at start position s_i (context c_i = s_i + n_i),
 * T = Σ n_i. Defaults: Llama-3.1-8B shape (P = 8,030,261,248 parameters, kv_tok = 131,072 bytes,
 * L = 32, H = 32, D = 128) on an H100 SXM5 (BW = 3350 GB/s, F = 989 TFLOP/s), eff_bw = 0.8,
 * eff_f = 0.6, overhead = 250 µs (the engine's documented assumptions).
 */

export interface StepModelParams {
  readonly numParams: number
  readonly layers: number
  readonly heads: number
  readonly kvHeads: number
  readonly headDim: number
  readonly bandwidthGBps: number
  readonly tflops: number
  readonly bwEfficiency: number
  readonly flopsEfficiency: number
  readonly overheadUs: number
  readonly timeScale: number
}

/** Llama-3.1-8B: P = embed + LM head + 32 layers (q, k, v, o, gate/up/down, 2 norms) + final norm. */
const llama31_8b = (): number => {
  const h = 4096, q = 32 * 128, kv = 8 * 128, inter = 14336, vocab = 128256
  const perLayer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
  return 2 * vocab * h + 32 * perLayer + h
}

export const DEFAULT_STEP_MODEL: StepModelParams = {
  numParams: llama31_8b(),
  layers: 32,
  heads: 32,
  kvHeads: 8,
  headDim: 128,
  bandwidthGBps: 3350,
  tflops: 989,
  bwEfficiency: 0.8,
  flopsEfficiency: 0.6,
  overheadUs: 250,
  timeScale: 1
}

export interface PassItem {
  /** Tokens of this sequence in the pass (1 for a decode, a chunk for a prefill). */
  readonly numTokens: number
  /** Position of its first token (tokens already in the KV cache). */
  readonly startPos: number
}

/** Modelled seconds of one forward pass (already multiplied by timeScale). */
export const stepSeconds = (p: StepModelParams, items: ReadonlyArray<PassItem>): number => {
  const kvTok = 2 * p.layers * p.kvHeads * p.headDim * 2
  let tokens = 0
  let ctx = 0
  let keys = 0
  for (const it of items) {
    const n = it.numTokens
    const s = it.startPos
    tokens += n
    ctx += s + n
    keys += n * s + (n * (n + 1)) / 2
  }
  const bytes = 2 * p.numParams + ctx * kvTok + tokens * kvTok
  const flops = 2 * p.numParams * tokens + 4 * p.layers * p.heads * p.headDim * keys
  const memory = bytes / (p.bandwidthGBps * 1e9 * p.bwEfficiency)
  const compute = flops / (p.tflops * 1e12 * p.flopsEfficiency)
  return (Math.max(memory, compute) + p.overheadUs * 1e-6) * p.timeScale
}
