/**
 * A BPE tokenizer's merge ranks without a heap string per merge.
 *
 * @huggingface/tokenizers (0.2.0, `BPE`) keeps its ranks as a Map from
 * `JSON.stringify([left, right])` to the merge's rank, and looks a pair up with
 * `bpe_ranks.get(JSON.stringify([left, right]))`. For Qwen3 that is ~151 k key strings and a
 * Map table of ~7 MB, which every major GC of a serving process marks again although they
 * never change. `packMergeRanks` answers the same `get` from three typed arrays keyed by the
 * two tokens' ids (open addressing, linear probing, load at most 1/2; their memory is outside
 * the GC's heap), parsing the key back with JSON.parse: a lookup costs one parse more than the
 * library's. Ranks are those of tokenizer.json's `model.merges` order (Sennrich et al. 2016,
 * byte-pair encoding; GPT-2's `bpe_ranks`).
 */

import type { PackedVocab } from "./packedVocab.js"

/** The one method of the library's rank Map that its BPE model calls after loading. */
export interface MergeRanks {
  /** The rank of the merge `key` (`JSON.stringify([left, right])`), or undefined if none. */
  readonly get: (key: string) => number | undefined
  readonly size: number
}

const EMPTY = -1

/**
 * Packs `ranks` (key → rank) using the vocabulary (`packVocab` of the library's `tokens_to_ids`
 * and `vocab`). A merge whose halves are not both tokens that are their id's own token (an
 * added token may share an id), or whose key or rank is not of the usual form, stays in a
 * small Map under its key, so `get` answers as `ranks.get` for every key the library looks up
 * (the JSON.stringify of a pair of strings).
 */
export const packMergeRanks = (
  ranks: ReadonlyMap<string, number>,
  vocab: Pick<PackedVocab, "get" | "isTokenOf">
): MergeRanks => {
  let capacity = 2
  while (capacity < ranks.size * 2) capacity *= 2
  const mask = capacity - 1
  const lefts = new Int32Array(capacity).fill(EMPTY)
  const rights = new Int32Array(capacity)
  const values = new Int32Array(capacity)
  const others = new Map<string, number>()
  let left = 0
  let right = 0
  const parse = (key: string): unknown => {
    try {
      return JSON.parse(key)
    } catch {
      return undefined
    }
  }
  /** Sets `left` and `right` to the ids of `pair`'s halves; false when it is no pair of tokens. */
  const idsOf = (pair: unknown): boolean => {
    if (!Array.isArray(pair) || pair.length !== 2) return false
    if (typeof pair[0] !== "string" || typeof pair[1] !== "string") return false
    const l = vocab.get(pair[0])
    const r = vocab.get(pair[1])
    // An id is kept only where it is its token's own (an added token may share it).
    if (l === undefined || r === undefined || !vocab.isTokenOf(l, pair[0]) || !vocab.isTokenOf(r, pair[1])) return false
    left = l
    right = r
    return true
  }
  /** The slot of (left, right): where it is, or the empty slot where it would go. */
  const slotOf = (): number => {
    let i = (Math.imul(left, 0x9e3779b1) ^ Math.imul(right, 0x85ebca6b)) & mask
    while (lefts[i] !== EMPTY && (lefts[i] !== left || rights[i] !== right)) i = (i + 1) & mask
    return i
  }
  for (const [key, rank] of ranks) {
    const pair = parse(key)
    // Only a key that is its pair's JSON.stringify is found through the pair by `get`.
    if (!(Number.isInteger(rank) && rank >= 0 && rank <= 0x7fffffff) || !idsOf(pair) || JSON.stringify(pair) !== key) {
      others.set(key, rank)
      continue
    }
    const i = slotOf()
    lefts[i] = left
    rights[i] = right
    values[i] = rank
  }
  return {
    size: ranks.size,
    get: (key) => {
      if (!idsOf(parse(key))) return others.get(key)
      const i = slotOf()
      return lefts[i] === EMPTY ? others.get(key) : values[i]
    }
  }
}
