/**
 * The workload: seeded random numbers and the distributions of input length, output length and
 * conversation length (turns). See bench/README.md, "Workload", for the sources.
 *
 * - Input (new user message) and output lengths, in tokens: log-normal, fitted to the means the
 *   vLLM paper reports for ShareGPT (Kwon et al., "Efficient Memory Management for Large Language
 *   Model Serving with PagedAttention", SOSP 2023, §6.1 / Fig. 11: mean input 161.31 tokens, mean
 *   output 337.99 tokens), with a shape parameter sigma chosen to reproduce the long right tail of
 *   that figure's histograms; clipped to [min, max] (the clip moves the mean a little: the achieved
 *   means are reported with every run).
 * - Turns per conversation: geometric on {1, 2, …} with mean 3, capped at 8 (LMSYS-Chat-1M reports
 *   2.0 turns per conversation, ShareGPT conversations are longer; 3 is our middle ground), and a
 *   conversation also ends before its context would pass `maxContextTokens`.
 */

/** mulberry32: a small, fast, seeded PRNG (uniform in [0, 1)). */
export const rng = (seed: number): (() => number) => {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

export const normal = (u: () => number): number => {
  // Box-Muller; 1 - u() keeps the log argument in (0, 1].
  const r = Math.sqrt(-2 * Math.log(1 - u()))
  return r * Math.cos(2 * Math.PI * u())
}

export interface LengthDistribution {
  /** Mean of the log-normal before clipping. */
  readonly mean: number
  /** Shape: standard deviation of ln(length). */
  readonly sigma: number
  readonly min: number
  readonly max: number
}

/** ln-space location for a log-normal of the given mean: mu = ln(mean) - sigma^2 / 2. */
export const sampleLength = (u: () => number, d: LengthDistribution): number => {
  const mu = Math.log(d.mean) - (d.sigma * d.sigma) / 2
  const x = Math.round(Math.exp(mu + d.sigma * normal(u)))
  return Math.min(d.max, Math.max(d.min, x))
}

/** Geometric on {1, 2, …} with the given mean, capped. */
export const sampleTurns = (u: () => number, mean: number, cap: number): number => {
  const p = 1 / mean
  let k = 1
  while (k < cap && u() >= p) k++
  return k
}

/** Exponential inter-arrival gap in ms for a Poisson process of `ratePerSecond`. */
export const sampleGapMs = (u: () => number, ratePerSecond: number): number => (-Math.log(1 - u()) / ratePerSecond) * 1000

export interface Workload {
  readonly input: LengthDistribution
  readonly output: LengthDistribution
  readonly turnsMean: number
  readonly turnsCap: number
  /** A conversation ends early rather than let history + next turn pass this many tokens. */
  readonly maxContextTokens: number
  readonly seed: number
  /**
   * Each conversation's first message starts with words of its own, so that conversations
   * share no prompt prefix (the fixed word sequence of `contentOf` otherwise makes every first
   * turn a prefix-cache hit of every other).
   */
  readonly distinctConversations?: boolean
}

export const SHAREGPT_LIKE: Workload = {
  input: { mean: 161.31, sigma: 1.0, min: 4, max: 1024 },
  output: { mean: 337.99, sigma: 0.9, min: 4, max: 1024 },
  turnsMean: 3,
  turnsCap: 8,
  maxContextTokens: 3584,
  seed: 42
}

/** Words the Qwen3 tokenizer maps to one token each, with their leading space. */
const ONE_TOKEN_WORDS = (
  "hello world the and data model token cache block table prefix decode batch stream shard runner " +
  "entity memory server client request reply story river mountain garden window paper music light " +
  "water green blue red yellow house city people time year day night morning evening summer winter " +
  "spring autumn friend family school market street forest ocean island bridge road train plane ship"
).split(" ").map((w) => ` ${w}`)

/**
 * The user message of `n` tokens: the first `n` words of one fixed, non-repeating sequence of
 * one-token words (the achieved prompt length is checked against `usage.prompt_tokens`). Not
 * one word repeated: moderation refuses such a prompt as a divergence attack.
 */
export const contentOf = (n: number): string => {
  let text = ""
  for (let i = 0; i < n; i++) {
    // An integer hash of the position (splitmix-like): no short period.
    let h = Math.imul(i + 1, 0x9e3779b1) >>> 0
    h = Math.imul(h ^ (h >>> 15), 0x85ebca6b) >>> 0
    text += ONE_TOKEN_WORDS[((h ^ (h >>> 13)) >>> 0) % ONE_TOKEN_WORDS.length]
  }
  return text
}

/**
 * Multi-turn (issue 11's prefix-cache workload): ShareGPT-like lengths, 10 turns per
 * conversation (a conversation also ends before its context would pass maxContextTokens),
 * conversations distinct from their first token.
 */
export const MULTI_TURN: Workload = {
  ...SHAREGPT_LIKE,
  turnsMean: 10,
  turnsCap: 10,
  // The default model's context (max_model_len): past it the prompt's window slides (the
  // oldest exchanges drop out), which changes the prompt from its start: a cache miss that is
  // the window's doing, not the cache's.
  maxContextTokens: 4096,
  distinctConversations: true
}
