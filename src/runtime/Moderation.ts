/**
 * Moderation of what users send and what the model writes, with a pluggable classifier.
 *
 * - Input: a user message is classified before anything is stored or sent to a GPU; a
 *   flagged one is refused (400 `content_filter`). So is a prompt made mostly of one short
 *   string repeated (the divergence attack of Nasr et al., "Scalable Extraction of Training
 *   Data from (Production) Language Models", 2023: repeating a word makes aligned models
 *   diverge and emit memorized data).
 * - Output: each turn's generated text is classified on a rolling window as it is written
 *   (inline in the DecodeSlot's sink, so it adds nothing to TTFT); when it fires the sequence
 *   stops, its KV blocks are freed, the turn is stored `filtered` with its verdict and the
 *   stream ends with `event: error` code `content_filter`.
 * - A generation caught in a loop (the last tokens one n-gram repeated) stops with
 *   finish_reason `repetition`.
 *
 * The default classifier is rule-based: `MODERATION_BLOCKLIST`, comma-separated words or
 * phrases matched case-insensitively at word boundaries, on text with compatibility forms
 * folded and invisible format characters removed (empty: nothing is flagged). A
 * model-based classifier implements `Classifier` and replaces it in the layer.
 */
import { Config, Context, Effect, Layer } from "effect"

/** A classifier's answer: `category` names what was found when `flagged`. */
export interface Verdict {
  readonly flagged: boolean
  readonly category: string | null
}

export const pass: Verdict = { flagged: false, category: null }

/** Classifies text synchronously (it runs per token event in the sink: keep it cheap). */
export interface Classifier {
  readonly classify: (text: string) => Verdict
  /**
   * The longest text one finding spans, when bounded (a blocklist's longest phrase plus its
   * boundaries): output is then checked on the newest delta plus that much before it, not
   * on the whole window.
   */
  readonly maxMatchChars?: number | undefined
}

/**
 * The text a blocklist matches: compatibility forms folded (NFKC: fullwidth letters,
 * ligatures) and Unicode's default-ignorable code points (U+200B, U+200D, U+00AD, …) removed,
 * so that neither hides a word that shows as the word. ASCII text is already in that form.
 */
const foldForMatch = (text: string): string =>
  /[^\x00-\x7f]/.test(text) ? text.normalize("NFKC").replace(/\p{Default_Ignorable_Code_Point}/gu, "") : text

/**
 * Raw characters of output one finding may span, per character of the phrase: the folded
 * text may have dropped ignorable code points and the phrase's spaces may be runs.
 */
const RAW_CHARS_PER_MATCHED_CHAR = 4

/**
 * Flags text holding any of `phrases` (case-insensitive, at word boundaries, the words of a
 * phrase separated by any white space), matched on the folded text (`foldForMatch`).
 */
export const blocklistClassifier = (phrases: ReadonlyArray<string>): Classifier => {
  const words = phrases.map((p) => foldForMatch(p).trim()).filter((p) => p.length > 0)
  if (words.length === 0) return { classify: () => pass, maxMatchChars: 0 }
  const escaped = words.map((w) => w.split(/\s+/).map((part) => part.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("\\s+"))
  const pattern = new RegExp(`(?<![\\p{L}\\p{N}])(?:${escaped.join("|")})(?![\\p{L}\\p{N}])`, "iu")
  return {
    classify: (text) => pattern.test(foldForMatch(text)) ? { flagged: true, category: "blocklist" } : pass,
    // A phrase and the character on each side that decides its word boundaries.
    maxMatchChars: (Math.max(...words.map((w) => w.length)) + 2) * RAW_CHARS_PER_MATCHED_CHAR
  }
}

/** Shortest prompt the divergence guard looks at, in characters. */
const MIN_REPETITIVE_CHARS = 200
/** Longest period (characters) of a repeated string it looks for. */
const MAX_PERIOD_CHARS = 32
/** Fraction of the text that must repeat with one period. */
const REPETITIVE_FRACTION = 0.9

/**
 * Whether `text` is mostly one string of at most MAX_PERIOD_CHARS characters repeated
 * ("poem poem poem …"): some period p has text[i] = text[i - p] for 90 % of positions.
 * Cost O(MAX_PERIOD_CHARS × length).
 */
export const isRepetitive = (text: string): boolean => {
  const n = text.length
  if (n < MIN_REPETITIVE_CHARS) return false
  for (let p = 1; p <= MAX_PERIOD_CHARS; p++) {
    let same = 0
    for (let i = p; i < n; i++) if (text.charCodeAt(i) === text.charCodeAt(i - p)) same++
    if (same >= REPETITIVE_FRACTION * (n - p)) return true
  }
  return false
}

/** Characters of generated text the output check sees at once (the newest). */
const OUTPUT_WINDOW_CHARS = 512

/** Per-turn output check: feed it each delta; it returns the verdict that stops the turn, if any. */
export interface OutputCheck {
  readonly push: (delta: string) => Verdict | undefined
}

/** Longest n-gram (tokens) the repetition guard looks for. */
const MAX_NGRAM = 8
/** Consecutive repeats of it that stop a generation... */
const MIN_REPEATS = 16
/** ...covering at least this many tokens (a list of 20 zeros or a table rule is not a loop). */
const MIN_REPEATED_TOKENS = 64

/**
 * Per-turn loop detector over generated token ids: `push` returns true once the newest
 * tokens are one n-gram (n ≤ 8) repeated ≥ 16 times, over ≥ 64 tokens. O(MAX_NGRAM) per
 * token (a run length per n).
 */
export const repetitionGuard = () => {
  const recent: Array<number> = []
  // run[n]: how many consecutive newest tokens equal the token n before them.
  const run = new Array<number>(MAX_NGRAM + 1).fill(0)
  return {
    push: (tokenId: number): boolean => {
      recent.push(tokenId)
      if (recent.length > MAX_NGRAM * MIN_REPEATS * 2) recent.splice(0, recent.length - MAX_NGRAM * MIN_REPEATS)
      const last = recent.length - 1
      for (let n = 1; n <= MAX_NGRAM; n++) {
        run[n] = last - n >= 0 && recent[last - n] === tokenId ? run[n]! + 1 : 0
        // A run of r tokens equal to their n-th predecessor is the n-gram repeated (r + n) / n times.
        const covered = run[n]! + n
        if (covered >= MIN_REPEATED_TOKENS && covered >= MIN_REPEATS * n) return true
      }
      return false
    }
  }
}

export class Moderation extends Context.Tag("chat/Moderation")<Moderation, {
  /** The verdict on a user message (classifier, then the divergence guard). */
  readonly checkInput: (text: string) => Verdict
  /** A new output check for one turn. */
  readonly outputCheck: () => OutputCheck
}>() {}

const make = (classifier: Classifier): Context.Tag.Service<Moderation> => ({
  checkInput: (text) => {
    const verdict = classifier.classify(text)
    if (verdict.flagged) return verdict
    return isRepetitive(text) ? { flagged: true, category: "repetitive_prompt" } : pass
  },
  outputCheck: () => {
    // What the classifier sees: the new delta and the text before it that a finding ending in
    // the delta may span (bounded classifiers), else the newest OUTPUT_WINDOW_CHARS.
    const keep = classifier.maxMatchChars ?? OUTPUT_WINDOW_CHARS
    let tail = ""
    return {
      push: (delta) => {
        if (delta.length === 0) return undefined
        const window = tail + delta
        tail = window.length > keep ? window.slice(-keep) : window
        const verdict = classifier.classify(window)
        return verdict.flagged ? verdict : undefined
      }
    }
  }
})

export const layer = (classifier: Classifier): Layer.Layer<Moderation> => Layer.succeed(Moderation, make(classifier))

/** The rule-based classifier from `MODERATION_BLOCKLIST` (comma-separated; unset: none). */
export const layerConfig: Layer.Layer<Moderation> = Layer.effect(
  Moderation,
  Effect.map(
    Config.string("MODERATION_BLOCKLIST").pipe(Config.withDefault(""), Effect.orElseSucceed(() => "")),
    (raw) => make(blocklistClassifier(raw.split(",")))
  )
)
