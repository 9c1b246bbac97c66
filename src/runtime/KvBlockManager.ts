/**
 * Paged KV cache block *accounting* for one engine (vLLM's PagedAttention, Kwon et al. 2023;
 * the `BlockManager` of nano-vllm). The engine owns the KV memory; this class only decides
 * which block ids each sequence's block table holds.
 *
 * Check-then-mutate: callers ask `canAllocate` and only then `allocate`; `allocate` on a
 * request that does not fit returns `undefined` and changes nothing. Never throws.
 *
 * Invariants (property-tested): every block id is either free or owned by exactly one
 * sequence; `numFreeBlocks + Σ owned = numBlocks`.
 */
export class KvBlockManager {
  private readonly freeBlockIds: Array<number>
  private readonly tables = new Map<number, Array<number>>()

  /**
   * @param numBlocks blocks the engine allocated (ids 0 … numBlocks-1), from its `info`.
   * @param blockSize tokens per block (16).
   */
  constructor(readonly numBlocks: number, readonly blockSize: number) {
    // Pop from the end: lowest ids are handed out first, which keeps tests readable.
    this.freeBlockIds = Array.from({ length: numBlocks }, (_, i) => numBlocks - 1 - i)
  }

  get numFreeBlocks(): number {
    return this.freeBlockIds.length
  }

  /** Blocks needed to hold `numTokens` tokens. */
  blocksFor(numTokens: number): number {
    return Math.ceil(numTokens / this.blockSize)
  }

  /** Extra blocks `seqId` needs so its table covers `numTokens` tokens (0 if it already does). */
  numBlocksNeeded(seqId: number, numTokens: number): number {
    const owned = this.tables.get(seqId)?.length ?? 0
    return Math.max(0, this.blocksFor(numTokens) - owned)
  }

  canAllocate(seqId: number, numTokens: number): boolean {
    return this.numBlocksNeeded(seqId, numTokens) <= this.freeBlockIds.length
  }

  /**
   * Grows `seqId`'s table to cover `numTokens` tokens.
   * @returns the newly appended block ids (possibly empty), or `undefined` if there are not
   *          enough free blocks (nothing changed).
   */
  allocate(seqId: number, numTokens: number): ReadonlyArray<number> | undefined {
    const needed = this.numBlocksNeeded(seqId, numTokens)
    if (needed > this.freeBlockIds.length) return undefined
    let table = this.tables.get(seqId)
    if (table === undefined) {
      table = []
      this.tables.set(seqId, table)
    }
    const added: Array<number> = []
    for (let i = 0; i < needed; i++) {
      const id = this.freeBlockIds.pop()!
      table.push(id)
      added.push(id)
    }
    return added
  }

  /** Returns every block of `seqId` to the free list. @returns how many blocks were freed. */
  free(seqId: number): number {
    const table = this.tables.get(seqId)
    if (table === undefined) return 0
    this.tables.delete(seqId)
    for (let i = table.length - 1; i >= 0; i--) this.freeBlockIds.push(table[i]!)
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
}
