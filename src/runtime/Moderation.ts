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
import { escapeRegExp } from "./internal/escapeRegExp.js"

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
   * A check of generated text fed delta by delta, for a classifier whose findings are bounded
   * (a blocklist's phrases): it needs to see only what a finding ending in the newest delta
   * may span. Without one, each delta is classified with the newest OUTPUT_WINDOW_CHARS.
   */
  readonly outputCheck?: (() => OutputCheck) | undefined
}

/** Per-turn output check: feed it each delta; it returns the verdict that stops the turn, if any. */
export interface OutputCheck {
  /** `last`: the turn's final delta (nothing follows it). */
  readonly push: (delta: string, last?: boolean) => Verdict | undefined
  /**
   * After a push: a finding may end where the text ends, and whether it is one depends on
   * what comes next ("hell" of "hellish"). The caller holds the text back until a push
   * says otherwise: it is flagged then, or it goes out.
   */
  readonly holding: boolean
}

/**
 * The text a blocklist matches: compatibility forms folded (NFKC: fullwidth letters,
 * ligatures) and Unicode's default-ignorable code points (U+200B, U+200D, U+00AD, …) and
 * interlinear annotation marks (U+FFF9–U+FFFB) removed,
 * so that neither hides a word that shows as the word. ASCII text is already in that form.
 */
const foldForMatch = (text: string): string =>
  /[^\x00-\x7f]/.test(text) ? text.normalize("NFKC").replace(/[\p{Default_Ignorable_Code_Point}\uFFF9-\uFFFB]/gu, "") : text

/** Folded, with each run of white space one space: what the output check keeps of a delta. */
const foldForOutput = (text: string): string => foldForMatch(text).replace(/\s+/g, " ")

const NONE = 0
const HOLD = 1
const FLAG = 2

/**
 * Flags text holding any of `phrases`: case-insensitive, at word boundaries, the words of a
 * phrase separated by any white space, as written or once folded (`foldForMatch`: a format
 * character may separate words, as U+200B does in Thai, or hide one). A word is a run of
 * letters, marks and digits: in text without spaces between words (Chinese), a phrase is
 * found only where something else bounds it.
 *
 * Its output check keeps the folded text of the turn so far, white space runs as one space,
 * and matches the newest delta with the longest phrase's length (plus a character each side)
 * before it, counting only a finding that ends in the delta: one that ends before it was seen
 * by an earlier push, with the text before it that its left boundary needs. One that ends with
 * the delta, on a letter, mark or digit, is held (`holding`) until the next delta shows whether
 * the word goes on. A combining mark in one delta is not composed with the letter ending the one
 * before.
 */
export const blocklistClassifier = (phrases: ReadonlyArray<string>): Classifier => {
  const words = phrases.map((p) => foldForOutput(p).trim()).filter((p) => p.length > 0)
  if (words.length === 0) return { classify: () => pass, outputCheck: () => ({ push: () => undefined, holding: false }) }
  // A word goes on through letters, digits and marks: a Devanagari vowel sign or an Arabic
  // vowel mark is part of it (with मार blocked, कुमार is no finding).
  const source = `(?<![\\p{L}\\p{M}\\p{N}])(?:${words.map((w) => w.split(" ").map(escapeRegExp).join("\\s+")).join("|")})(?![\\p{L}\\p{M}\\p{N}])`
  const pattern = new RegExp(source, "iu")
  const flagged: Verdict = { flagged: true, category: "blocklist" }
  const matches = (text: string) => {
    if (pattern.test(text)) return true
    const folded = foldForMatch(text)
    return folded !== text && pattern.test(folded)
  }
  // A phrase and the character on each side that decides its word boundaries.
  const keep = Math.max(...words.map((w) => w.length)) + 2
  /**
   * FLAG if a finding ends after `fromIndex` of `text`; HOLD if one does only at the text's
   * end on a letter, mark or digit, which the next delta may extend into a longer word (not `last`).
   */
  const findingAfter = (all: RegExp, text: string, fromIndex: number, last: boolean): number => {
    let found = NONE
    all.lastIndex = 0
    for (let m = all.exec(text); m !== null; m = all.exec(text)) {
      const end = m.index + m[0].length
      if (end > fromIndex) {
        if (last || end < text.length || !/[\p{L}\p{M}\p{N}]/u.test(text[end - 1]!)) return FLAG
        found = HOLD
      }
      all.lastIndex = m.index + 1
    }
    return found
  }
  return {
    classify: (text) => matches(text) ? flagged : pass,
    outputCheck: () => {
      const all = new RegExp(source, "giu")
      let rawTail = ""
      let tail = ""
      let holding = false
      return {
        push: (delta, last = false) => {
          if (delta.length === 0) return last && holding ? flagged : undefined
          const raw = rawTail + delta
          rawTail = raw.length > keep ? raw.slice(-keep) : raw
          let folded = foldForOutput(delta)
          if (folded.startsWith(" ") && tail.endsWith(" ")) folded = folded.slice(1)
          const window = tail + folded
          tail = window.length > keep ? window.slice(-keep) : window
          // A finding held back ends where the last text ended: it is decided now.
          const back = holding ? 1 : 0
          const inRaw = findingAfter(all, raw, raw.length - delta.length - back, last)
          const inFolded = raw === window ? inRaw : findingAfter(all, window, window.length - folded.length - back, last)
          if (inRaw === FLAG || inFolded === FLAG) return flagged
          holding = inRaw === HOLD || inFolded === HOLD
          return undefined
        },
        get holding() {
          return holding
        }
      }
    }
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
  outputCheck: classifier.outputCheck ?? (() => {
    // Each delta with the newest OUTPUT_WINDOW_CHARS before it.
    let tail = ""
    return {
      push: (delta) => {
        if (delta.length === 0) return undefined
        const window = tail + delta
        tail = window.length > OUTPUT_WINDOW_CHARS ? window.slice(-OUTPUT_WINDOW_CHARS) : window
        const verdict = classifier.classify(window)
        return verdict.flagged ? verdict : undefined
      },
      holding: false
    }
  })
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
