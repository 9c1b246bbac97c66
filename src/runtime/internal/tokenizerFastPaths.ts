/**
 * Fast paths around @huggingface/tokenizers for the two per-turn and per-token hot spots,
 * each used only where it is exactly equivalent to the library (tests compare them):
 *
 * - Segment-memoized encode. The library splits text at added tokens first and encodes each
 *   piece between them on its own (normalizer, pre-tokenizer, model), the way Hugging Face
 *   tokenizers' AddedVocabulary does. A chat prompt is mostly the same pieces turn after turn
 *   (one per earlier message), so pieces are memoized. Valid when no added token strips or is
 *   normalized and no pre-tokenizer depends on the piece's index (Metaspace).
 *
 * - Streaming byte-level detokenization. With a ByteLevel decoder (GPT-2 style BPE: Qwen2/3,
 *   Llama 3) and no clean-up of tokenization spaces, decoding is: token strings → bytes through
 *   the GPT-2 byte↔unicode table → UTF-8, special tokens skipped, other added tokens as their
 *   text. A streaming TextDecoder then gives each token's text in O(1), holding back an
 *   incomplete character until its last byte (Radford et al. 2019, GPT-2 `bytes_to_unicode`;
 *   WHATWG Encoding, streaming decode).
 */
import { escapeRegExp } from "./escapeRegExp.js"

/** The subset of tokenizer.json these paths read. */
export interface TokenizerJson {
  readonly model?: { readonly type?: string; readonly vocab?: Record<string, number> | ReadonlyArray<unknown> }
  readonly decoder?: { readonly type?: string } | null
  readonly pre_tokenizer?: unknown
  readonly added_tokens?: ReadonlyArray<{
    readonly id: number
    readonly content: string
    readonly special?: boolean
    readonly lstrip?: boolean
    readonly rstrip?: boolean
    readonly normalized?: boolean
  }>
}

export interface Detokenizer {
  /** Appends one token; returns the newly completed text ("" while a character is incomplete). */
  push(tokenId: number): string
  /** Whatever is still held back at the end of the stream (may contain U+FFFD). */
  flush(): string
}

/** A memoized encoder; `seed` records the ids to use for a piece instead of encoding it. */
export interface MemoizedEncode {
  readonly encode: (text: string) => Array<number>
  /** Whether pieces are memoized at all (false: `encode` is the library's, `seed` a no-op). */
  readonly memoized: boolean
  /** Splits `text` at added tokens: pieces at even indices, added tokens at odd ones. */
  readonly split: (text: string) => Array<string>
  readonly seed: (piece: string, ids: ReadonlyArray<number>) => void
  /** Whether `piece` is memoized (always false when not `memoized`). */
  readonly has: (piece: string) => boolean
}

/**
 * `encode` with memoized pieces, or `encode` itself when the memo would not be exact. The
 * memo holds at most `maxEntries` pieces and `maxIds` ids in all, oldest out first.
 */
export const memoizedEncode = (
  json: TokenizerJson,
  encode: (text: string) => Array<number>,
  options: { readonly maxEntries?: number; readonly maxIds?: number } = {}
): MemoizedEncode => {
  const added = json.added_tokens ?? []
  const exact = added.length > 0 &&
    added.every((t) => !t.lstrip && !t.rstrip && !t.normalized) &&
    !JSON.stringify(json.pre_tokenizer ?? null).includes("Metaspace")
  if (!exact) return { encode, memoized: false, split: (text) => [text], seed: () => {}, has: () => false }
  const idOf = new Map(added.map((t) => [t.content, t.id]))
  // Longest first: at each position the longest added token wins, as in the library's trie.
  const splitter = new RegExp(
    `(${[...idOf.keys()].sort((a, b) => b.length - a.length).map(escapeRegExp).join("|")})`
  )
  const maxEntries = options.maxEntries ?? 16_384
  const maxIds = options.maxIds ?? 1 << 20
  const memo = new Map<string, ReadonlyArray<number>>()
  let numIds = 0
  const remember = (piece: string, ids: ReadonlyArray<number>) => {
    const old = memo.get(piece)
    if (old !== undefined) {
      memo.delete(piece)
      numIds -= old.length
    }
    memo.set(piece, ids)
    numIds += ids.length
    while (memo.size > maxEntries || numIds > maxIds) {
      const [key, value] = memo.entries().next().value!
      memo.delete(key)
      numIds -= value.length
    }
  }
  return {
    memoized: true,
    split: (text) => text.split(splitter),
    seed: remember,
    has: (piece) => memo.has(piece),
    encode: (text) => {
      const parts = text.split(splitter)
      const ids: Array<number> = []
      for (let i = 0; i < parts.length; i++) {
        const part = parts[i]!
        if (i % 2 === 1) {
          ids.push(idOf.get(part)!)
          continue
        }
        if (part.length === 0) continue
        let piece = memo.get(part)
        if (piece === undefined) {
          piece = encode(part)
          remember(part, piece)
        }
        for (const id of piece) ids.push(id)
      }
      return ids
    }
  }
}

/** GPT-2's byte → printable character table, inverted: char code → byte (−1: none). */
const unicodeToByte = (() => {
  const table = new Int16Array(512).fill(-1)
  let extra = 0
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)
    table[printable ? b : 256 + extra++] = b
  }
  return table
})()

/**
 * Every vocabulary token's bytes, packed: token `id` is `bytes[offsets[id]..offsets[id + 1])`
 * (`offsets`: vocabulary size + 1 entries). A token that is not byte-level text (a character
 * outside the GPT-2 table) or an id the vocabulary skips has no bytes. Two objects for the
 * whole vocabulary, built once at load: a per-token cache grows to ~150 k arrays (two heap
 * objects each) that every full garbage collection of a busy server marks again.
 */
const packTokenBytes = (vocab: Record<string, number>): { readonly bytes: Uint8Array; readonly offsets: Uint32Array } => {
  const tokens: Array<string | undefined> = []
  let numBytes = 0
  // for…in, not Object.entries: a third of the time on a 151 k-token vocabulary (no pair arrays).
  for (const token in vocab) {
    const id = vocab[token]!
    if (!Number.isInteger(id) || id < 0) continue
    tokens[id] = token
    numBytes += token.length
  }
  const bytes = new Uint8Array(numBytes)
  const offsets = new Uint32Array(tokens.length + 1)
  let end = 0
  for (let id = 0; id < tokens.length; id++) {
    const token = tokens[id]
    const start = end
    if (token !== undefined) {
      for (let i = 0; i < token.length; i++) {
        const code = token.charCodeAt(i)
        const b = code < 512 ? unicodeToByte[code]! : -1
        if (b < 0) {
          end = start
          break
        }
        bytes[end++] = b
      }
    }
    offsets[id + 1] = end
  }
  return { bytes, offsets }
}

/**
 * A factory of streaming byte-level detokenizers, or undefined when the tokenizer is not
 * byte-level BPE with clean-up off (then the generic prefix/read-offset one applies).
 * `skipped`: the token strings the library skips with skip_special_tokens.
 */
export const byteLevelDetokenizer = (
  json: TokenizerJson,
  config: { readonly clean_up_tokenization_spaces?: unknown; readonly additional_special_tokens?: unknown }
): (() => Detokenizer) | undefined => {
  const vocab = json.model?.vocab
  if (
    json.decoder?.type !== "ByteLevel" || json.model?.type !== "BPE" || config.clean_up_tokenization_spaces !== false ||
    vocab === undefined || Array.isArray(vocab)
  ) return undefined
  const extraSpecial = new Set(Array.isArray(config.additional_special_tokens) ? config.additional_special_tokens : [])
  /** Added tokens: their text, or "" when skipped as special. */
  const addedText = new Map<number, string>()
  for (const t of json.added_tokens ?? []) addedText.set(t.id, t.special || extraSpecial.has(t.content) ? "" : t.content)
  const { bytes, offsets } = packTokenBytes(vocab as Record<string, number>)
  const numTokens = offsets.length - 1
  return () => {
    const decoder = new TextDecoder("utf-8", { fatal: false, ignoreBOM: true })
    return {
      push: (tokenId) => {
        const added = addedText.get(tokenId)
        if (added !== undefined) return added === "" ? "" : decoder.decode() + added
        // A token outside the vocabulary, or not byte-level, decodes to nothing (0 bytes).
        if (!(tokenId >>> 0 === tokenId && tokenId < numTokens)) return ""
        return decoder.decode(bytes.subarray(offsets[tokenId]!, offsets[tokenId + 1]!), { stream: true })
      },
      flush: () => decoder.decode()
    }
  }
}
