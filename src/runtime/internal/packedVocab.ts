/**
 * A tokenizer's vocabulary without a heap string per token.
 *
 * @huggingface/tokenizers (0.2.0, `BPE`) keeps its vocabulary as a Map from token to id
 * (`tokens_to_ids`) and an array from id to token (`vocab`), sharing ~151 k strings for Qwen3,
 * which every major GC of a serving process marks again although they never change.
 * `packVocab` holds both in typed arrays (UTF-16 code units, offsets, and an open-addressing
 * table of FNV-1a hashes with linear probing, load at most 1/2), outside the GC's heap:
 * `get`/`has` answer as the Map, `tokenOf` as the array (a new string each call). A lookup
 * hashes the token's code units in JS, where the Map used the string's cached hash: encoding,
 * the one user of `get` after loading, is memoized per message and long text goes to a worker.
 */

export interface PackedVocab {
  /** Number of token → id entries (the Map's size). */
  readonly size: number
  /** Number of ids (the array's length). */
  readonly length: number
  /** The id of `token`, as `tokens_to_ids.get`. */
  readonly get: (token: string) => number | undefined
  readonly has: (token: string) => boolean
  /** The token of `id` (a new string), as `vocab[id]`; undefined where the array has none. */
  readonly tokenOf: (id: number) => string | undefined
  /** Whether `token` is `vocab[id]`, without building the string. */
  readonly isTokenOf: (id: number, token: string) => boolean
}

/** Strings packed: string `i` is `units[offsets[i]..offsets[i + 1])` (a missing one is empty). */
interface Packed {
  readonly units: Uint16Array
  readonly offsets: Uint32Array
}

const pack = (strings: ReadonlyArray<string | undefined>): Packed => {
  let numUnits = 0
  for (const s of strings) numUnits += s?.length ?? 0
  const units = new Uint16Array(numUnits)
  const offsets = new Uint32Array(strings.length + 1)
  let end = 0
  for (let i = 0; i < strings.length; i++) {
    const s = strings[i]
    if (s !== undefined) for (let j = 0; j < s.length; j++) units[end++] = s.charCodeAt(j)
    offsets[i + 1] = end
  }
  return { units, offsets }
}

const equals = (packed: Packed, i: number, s: string): boolean => {
  const start = packed.offsets[i]!
  if (packed.offsets[i + 1]! - start !== s.length) return false
  for (let j = 0; j < s.length; j++) if (packed.units[start + j] !== s.charCodeAt(j)) return false
  return true
}

const unpack = (packed: Packed, i: number): string => {
  let s = ""
  // Chunked: fromCharCode takes its units as arguments.
  for (let a = packed.offsets[i]!, b = packed.offsets[i + 1]!; a < b; a += 4096) {
    s += String.fromCharCode(...packed.units.subarray(a, Math.min(b, a + 4096)))
  }
  return s
}

/** FNV-1a (32-bit) over UTF-16 code units (Fowler, Noll, Vo). */
const hashOf = (s: string): number => {
  let h = 0x811c9dc5
  for (let j = 0; j < s.length; j++) h = Math.imul(h ^ s.charCodeAt(j), 0x01000193)
  return h >>> 0
}

/**
 * Packs a vocabulary: `idOf` (token → id, the library's `tokens_to_ids`) and `tokens` (id →
 * token, its `vocab`; holes allowed). Both are copied; the caller drops the originals.
 */
export const packVocab = (idOf: ReadonlyMap<string, number>, tokens: ReadonlyArray<string | undefined>): PackedVocab => {
  // Loops, not callbacks: a closure naming `idOf` or `tokens` here would keep them alive in the
  // context that the returned functions share.
  const keys: Array<string> = []
  const keyIds = new Int32Array(idOf.size)
  for (const [key, id] of idOf) {
    keyIds[keys.length] = id
    keys.push(key)
  }
  const packedKeys = pack(keys)
  let capacity = 2
  while (capacity < keys.length * 2) capacity *= 2
  const mask = capacity - 1
  /** Entry index + 1 per slot; 0: empty. */
  const slots = new Int32Array(capacity)
  for (let i = 0; i < keys.length; i++) {
    let slot = hashOf(keys[i]!) & mask
    while (slots[slot] !== 0) slot = (slot + 1) & mask
    slots[slot] = i + 1
  }
  const present = new Uint8Array(tokens.length)
  for (let id = 0; id < tokens.length; id++) present[id] = tokens[id] === undefined ? 0 : 1
  const packedTokens = pack(tokens) // a hole reads as undefined
  const entryOf = (token: string): number => {
    let slot = hashOf(token) & mask
    for (let entry = slots[slot]!; entry !== 0; entry = slots[slot]!) {
      if (equals(packedKeys, entry - 1, token)) return entry - 1
      slot = (slot + 1) & mask
    }
    return -1
  }
  const inRange = (id: number) => Number.isInteger(id) && id >= 0 && id < present.length && present[id] === 1
  return {
    size: keys.length,
    length: tokens.length,
    get: (token) => {
      const entry = entryOf(token)
      return entry < 0 ? undefined : keyIds[entry]
    },
    has: (token) => entryOf(token) >= 0,
    tokenOf: (id) => (inRange(id) ? unpack(packedTokens, id) : undefined),
    isTokenOf: (id, token) => inRange(id) && equals(packedTokens, id, token)
  }
}

/**
 * `vocab` as the library reads it (`vocab[id]`, `vocab.length`): a read-only view whose
 * elements are built on access. Only decoding reads it after loading, and where streaming
 * matters this runtime decodes through its own byte table (`byteLevelDetokenizer`).
 */
export const vocabArrayView = (vocab: PackedVocab): ReadonlyArray<string | undefined> =>
  new Proxy([] as Array<string | undefined>, {
    get: (target, property, receiver) => {
      if (property === "length") return vocab.length
      const id = arrayIndexOf(property)
      return id === undefined ? Reflect.get(target, property, receiver) : vocab.tokenOf(id)
    },
    // Array methods (map, forEach) skip the indices that `in` does not find.
    has: (target, property) => {
      const id = arrayIndexOf(property)
      return id === undefined ? Reflect.has(target, property) : vocab.tokenOf(id) !== undefined
    }
  })

/** The array index a property key names (decimal digits, at most 10), if it names one. */
const arrayIndexOf = (property: string | symbol): number | undefined =>
  typeof property === "string" && property !== "" && property.length <= 10 && /^\d+$/.test(property) ? Number(property) : undefined
