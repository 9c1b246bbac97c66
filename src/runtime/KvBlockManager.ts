/**
 * Paged KV cache block *accounting* for one engine (vLLM's PagedAttention, Kwon et al. 2023;
 * the `BlockManager` of nano-vllm) with automatic prefix caching (vLLM v1
 * `kv_cache_manager.py`: hash-chained full blocks, `get_computed_blocks`). The engine owns
 * the KV memory; this class only decides which block ids each sequence's block table holds.
 *
 * Prefix caching: a *full* block (blockSize tokens whose KV has been computed) is named by a
 * hash chained from the previous block's hash and its token ids (the first block's chain
 * starts from `salt`, e.g. the model: anything else that changes the KV). Blocks carry
 * reference counts (the sequences whose tables hold them). A block whose count drops to 0
 * keeps its KV and its hash: it is free, but a later sequence whose prompt has the same
 * chain takes it back (`findCachedPrefix` + `allocate` with a prefix) instead of computing
 * it again. Free cached blocks are evicted least recently freed first, and only when an
 * allocation needs a block and no never-cached one is left. Shared blocks are never written:
 * a prefix hit covers full blocks only and at most the prompt's length − 1 tokens (the last
 * prompt token is always computed, to sample from), so new tokens start in a new block.
 *
 * Check-then-mutate: callers ask `canAllocate` and only then `allocate`; `allocate` on a
 * request that does not fit returns `undefined` and changes nothing. Never throws.
 *
 * Invariants (property-tested): a block is either free or held by ≥ 1 sequence, and its
 * reference count equals its holders; `numFreeBlocks + distinct held blocks = numBlocks`; a
 * cached hash always names a block whose tokens are those of the hash.
 */
import { createHash } from "node:crypto"

/** The hash of a full block: sha256 of the previous block's hash and the block's token ids. */
export const blockHash = (previous: string, tokenIds: ReadonlyArray<number>): string => {
  const h = createHash("sha256")
  h.update(previous)
  h.update(new Uint8Array(Int32Array.from(tokenIds).buffer))
  return h.digest("base64")
}

export class KvBlockManager {
  /** Free blocks that hold no cached KV (used first). */
  private readonly uncachedFree: Array<number>
  /** Free blocks that hold cached KV, least recently freed first (insertion order). */
  private readonly cachedFree = new Map<number, true>()
  private readonly refCounts: Int32Array
  /** Each block's hash while it holds cached KV. */
  private readonly hashes: Array<string | undefined>
  private readonly byHash = new Map<string, number>()
  private readonly tables = new Map<number, Array<number>>()
  /** Per sequence: how many of its blocks are hashed, and the last hash of the chain. */
  private readonly chains = new Map<number, { numHashed: number; last: string }>()
  /** Prefix-cache lookups and hits, in tokens (since start). */
  numQueriedTokens = 0
  numHitTokens = 0

  /**
   * @param numBlocks blocks the engine allocated (ids 0 … numBlocks-1), from its `info`.
   * @param blockSize tokens per block (16).
   * @param options.enableCaching keep and reuse full blocks (default true); off, a freed
   *   block is forgotten at once (the comparison baseline).
   * @param options.salt starts every hash chain (the model's name: another model's KV differs).
   */
  constructor(
    readonly numBlocks: number,
    readonly blockSize: number,
    private readonly options: { readonly enableCaching?: boolean; readonly salt?: string } = {}
  ) {
    // Pop from the end: lowest ids are handed out first, which keeps tests readable.
    this.uncachedFree = Array.from({ length: numBlocks }, (_, i) => numBlocks - 1 - i)
    this.refCounts = new Int32Array(numBlocks)
    this.hashes = new Array<string | undefined>(numBlocks)
  }

  get cachingEnabled(): boolean {
    return this.options.enableCaching !== false
  }

  /** Free blocks, cached ones included (an allocation may evict them). */
  get numFreeBlocks(): number {
    return this.uncachedFree.length + this.cachedFree.size
  }

  /** Free blocks that still hold cached KV. */
  get numCachedFreeBlocks(): number {
    return this.cachedFree.size
  }

  /** Blocks needed to hold `numTokens` tokens. */
  blocksFor(numTokens: number): number {
    return Math.ceil(numTokens / this.blockSize)
  }

  /**
   * The hash chain of `tokenIds`' full blocks, at most `maxBlocks` of them (the prompt's:
   * computed once per sequence, for `findCachedPrefix`).
   */
  hashChain(tokenIds: ReadonlyArray<number>, maxBlocks = Infinity): Array<string> {
    const chain: Array<string> = []
    let last = this.options.salt ?? ""
    const n = Math.min(maxBlocks, Math.floor(tokenIds.length / this.blockSize))
    for (let i = 0; i < n; i++) {
      last = blockHash(last, tokenIds.slice(i * this.blockSize, (i + 1) * this.blockSize))
      chain.push(last)
    }
    return chain
  }

  /**
   * The longest run of cached blocks that starts `chain` (vLLM's `get_computed_blocks`), at
   * most enough for `numPromptTokens - 1` tokens.
   * @returns the block ids (not yet held: pass them to `allocate`).
   */
  findCachedPrefix(chain: ReadonlyArray<string>, numPromptTokens: number): ReadonlyArray<number> {
    if (!this.cachingEnabled) return []
    const maxBlocks = Math.floor((numPromptTokens - 1) / this.blockSize)
    const blocks: Array<number> = []
    for (let i = 0; i < Math.min(maxBlocks, chain.length); i++) {
      const b = this.byHash.get(chain[i]!)
      if (b === undefined) break
      blocks.push(b)
    }
    return blocks
  }

  /** Counts a sequence's lookup in the hit statistics (once it was admitted with its hit). */
  recordLookup(numQueriedTokens: number, numHitTokens: number): void {
    this.numQueriedTokens += numQueriedTokens
    this.numHitTokens += numHitTokens
  }

  /**
   * Forgets every cached block (the engine lost its KV memory: it was restarted). Held blocks
   * stay held; only their names go.
   */
  dropCache(): void {
    for (const b of this.cachedFree.keys()) this.uncachedFree.push(b)
    this.cachedFree.clear()
    this.byHash.clear()
    this.hashes.fill(undefined)
    this.chains.clear()
  }

  /** Extra blocks `seqId` needs so its table covers `numTokens` tokens (0 if it already does). */
  numBlocksNeeded(seqId: number, numTokens: number, prefix: ReadonlyArray<number> = []): number {
    const owned = this.tables.get(seqId)?.length ?? prefix.length
    return Math.max(0, this.blocksFor(numTokens) - owned)
  }

  /**
   * Whether `allocate(seqId, numTokens, prefix)` would succeed: the new blocks must come from
   * the free ones left after the prefix's free cached blocks are taken back.
   */
  canAllocate(seqId: number, numTokens: number, prefix: ReadonlyArray<number> = []): boolean {
    return this.numBlocksNeeded(seqId, numTokens, prefix) <= this.numFreeBlocks - this.numFreeIn(seqId, prefix)
  }

  /**
   * Grows `seqId`'s table to cover `numTokens` tokens. A sequence without a table may start
   * with `prefix` (cached blocks from `findCachedPrefix`): they are shared, not copied.
   * @returns the newly appended block ids (the prefix's included), or `undefined` if there
   *          are not enough free blocks (nothing changed).
   */
  allocate(seqId: number, numTokens: number, prefix: ReadonlyArray<number> = []): ReadonlyArray<number> | undefined {
    if (!this.canAllocate(seqId, numTokens, prefix)) return undefined
    let table = this.tables.get(seqId)
    const added: Array<number> = []
    if (table === undefined) {
      table = []
      this.tables.set(seqId, table)
      for (const b of prefix) {
        this.hold(b)
        table.push(b)
        added.push(b)
      }
      if (prefix.length > 0) this.chains.set(seqId, { numHashed: prefix.length, last: this.hashes[prefix.at(-1)!]! })
    }
    const needed = this.blocksFor(numTokens) - table.length
    for (let i = 0; i < needed; i++) {
      const b = this.takeFree()
      this.refCounts[b] = 1
      table.push(b)
      added.push(b)
    }
    return added
  }

  /**
   * Names the full blocks of `seqId` whose KV is now computed (`numComputedTokens` of
   * `tokenIds`), so that later sequences can share them. A block whose chain another block
   * already names stays unnamed (the first one keeps serving hits).
   */
  cacheComputedBlocks(seqId: number, tokenIds: ReadonlyArray<number>, numComputedTokens: number, knownHashes?: ReadonlyArray<string>): void {
    if (!this.cachingEnabled) return
    const table = this.tables.get(seqId)
    if (table === undefined) return
    let chain = this.chains.get(seqId)
    if (chain === undefined) this.chains.set(seqId, chain = { numHashed: 0, last: this.options.salt ?? "" })
    const numFull = Math.min(table.length, Math.floor(numComputedTokens / this.blockSize))
    for (let i = chain.numHashed; i < numFull; i++) {
      // The prompt's chain was computed for the lookup already: `knownHashes` (same salt and tokens).
      chain.last = knownHashes?.[i] ?? blockHash(chain.last, tokenIds.slice(i * this.blockSize, (i + 1) * this.blockSize))
      const b = table[i]!
      if (this.hashes[b] === undefined && !this.byHash.has(chain.last)) {
        this.hashes[b] = chain.last
        this.byHash.set(chain.last, b)
      }
    }
    chain.numHashed = Math.max(chain.numHashed, numFull)
  }

  /**
   * Drops `seqId`'s hold on its blocks. A block no one holds any more keeps its cached KV (a
   * later prompt may take it back) until an allocation evicts it; the table's last blocks go
   * first, as they are the least likely to be shared. @returns how many blocks it held.
   */
  free(seqId: number): number {
    const table = this.tables.get(seqId)
    if (table === undefined) return 0
    this.tables.delete(seqId)
    this.chains.delete(seqId)
    for (let i = table.length - 1; i >= 0; i--) {
      const b = table[i]!
      if (--this.refCounts[b]! > 0) continue
      if (this.hashes[b] !== undefined && this.cachingEnabled) this.cachedFree.set(b, true)
      else this.uncachedFree.push(b)
    }
    return table.length
  }

  /** The block table of `seqId` (empty if it owns none). */
  blockTable(seqId: number): ReadonlyArray<number> {
    return this.tables.get(seqId) ?? []
  }

  /** Sequences that own at least one table entry (possibly empty). */
  get numSeqs(): number {
    return this.tables.size
  }

  /** Holders of block `b` (0: free). */
  refCount(b: number): number {
    return this.refCounts[b]!
  }

  /** The hash naming block `b`'s cached KV, if any. */
  hashOf(b: number): string | undefined {
    return this.hashes[b]
  }

  /** How many of `prefix`'s blocks are free now (taking them back uses up free blocks). */
  private numFreeIn(seqId: number, prefix: ReadonlyArray<number>): number {
    if (this.tables.has(seqId)) return 0
    let n = 0
    for (const b of prefix) if (this.refCounts[b] === 0) n++
    return n
  }

  private hold(b: number): void {
    if (this.refCounts[b] === 0) this.cachedFree.delete(b)
    this.refCounts[b]!++
  }

  /** A free block for new KV: a never-cached one, else the least recently freed cached one (evicted). */
  private takeFree(): number {
    const uncached = this.uncachedFree.pop()
    if (uncached !== undefined) return uncached
    // canAllocate guarantees one: the least recently freed cached block is evicted.
    const b = this.cachedFree.keys().next().value as number
    this.cachedFree.delete(b)
    this.byHash.delete(this.hashes[b]!)
    this.hashes[b] = undefined
    return b
  }
}
