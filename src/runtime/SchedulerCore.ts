/**
 * Continuous-batching scheduler for one engine, as pure synchronous state (no I/O, no device
 * memory). Follows vLLM v1's scheduler (`vllm/v1/core/sched/scheduler.py`): there are no
 * prefill/decode phases, each sequence's `numComputedTokens` catches up with its
 * `tokenIds.length` under a per-step token budget, so chunked prefill and decode share a
 * step. Blocks come from {@link KvBlockManager}; when they run out, the lowest-priority,
 * latest-arrived running sequence is preempted by recompute (its blocks are freed, its
 * computed count reset, and it goes back to the waiting queue with its output so far).
 *
 * The step loop (GpuWorker) calls `schedule()` → sends the plan to the engine →
 * `applyStepResult()`; `cancel` and `setPaused` may be called at any time in between.
 */
import { KvBlockManager } from "./KvBlockManager.js"

export interface SamplingParams {
  readonly temperature: number
  readonly top_p: number
  readonly top_k: number
  readonly seed: number
}

export interface SequenceRequest {
  /** Engine-wide unique id (also the engine's seq_id). */
  readonly seqId: number
  readonly promptTokenIds: ReadonlyArray<number>
  /** Stop after this many generated tokens (finish reason "length"). */
  readonly maxTokens: number
  readonly sampling: SamplingParams
  /** Lower runs first (tier priority); ties by arrival. */
  readonly priority: number
  /** Generation stops (reason "stop") after sampling one of these; the token is reported. */
  readonly eosTokenIds: ReadonlySet<number>
}

export type FinishReason = "stop" | "length"

interface Sequence {
  readonly request: SequenceRequest
  readonly arrival: number
  readonly tokenIds: Array<number>
  numComputedTokens: number
  numOutputTokens: number
  /** Backpressure: a paused sequence is left out of steps until resumed. */
  paused: boolean
  /** Whether the engine holds this sequence's state (block table, sampling params). */
  engineKnows: boolean
  /** How many entries of the block table the engine has been sent. */
  numBlocksSent: number
  /** The hash chain of its prompt's full blocks (prefix-cache lookup), made at first admission. */
  promptHashes: Array<string> | undefined
  /** Prompt tokens whose KV came from the prefix cache at its first admission. */
  numCachedTokens: number
}

/** One sequence's share of a step, in engine `step` terms (PROTOCOL.md). */
export interface StepItem {
  readonly seq_id: number
  readonly tokens: ReadonlyArray<number>
  readonly start_pos: number
  readonly block_table?: ReadonlyArray<number>
  readonly new_blocks?: ReadonlyArray<number>
  readonly sampling?: SamplingParams
  readonly sample: boolean
}

export interface StepPlan {
  readonly release: ReadonlyArray<number>
  readonly items: ReadonlyArray<StepItem>
  readonly numBatchedTokens: number
  /** Sequences preempted while building this plan (for metrics and tests). */
  readonly preempted: ReadonlyArray<number>
}

/** A sampled token delivered to its sequence; `finishReason` is set on its last token. */
export interface TokenOutput {
  readonly seqId: number
  readonly tokenId: number
  readonly finishReason: FinishReason | undefined
  /** Prompt tokens served from the prefix cache (OpenAI's `cached_tokens`). */
  readonly numCachedTokens: number
}

export interface SchedulerLimits {
  /** Token budget of one step (prefill chunks + decodes). */
  readonly maxNumBatchedTokens: number
  /** Running sequences at most. */
  readonly maxNumSeqs: number
  /** Context window: a sequence stops with "length" when it reaches it. */
  readonly maxModelLen: number
}

export class SchedulerCore {
  private readonly waiting: Array<Sequence> = []
  private readonly running: Array<Sequence> = []
  private readonly bySeqId = new Map<number, Sequence>()
  private readonly pendingRelease = new Set<number>()
  private arrivals = 0

  constructor(readonly kv: KvBlockManager, readonly limits: SchedulerLimits) {}

  get numWaiting(): number {
    return this.waiting.length
  }
  get numRunning(): number {
    return this.running.length
  }
  has(seqId: number): boolean {
    return this.bySeqId.has(seqId)
  }
  /** Whether a step (or a bare release) has anything to do. */
  get hasWork(): boolean {
    return this.pendingRelease.size > 0 || this.waiting.length > 0 || this.running.some((s) => !s.paused)
  }

  /**
   * Engine steps by which the queue delays the first token of a new sequence of `priority` with
   * `numPromptTokens`: the steps until its first token, less the ceil(numPromptTokens /
   * maxNumBatchedTokens) its own prefill takes on an idle engine (so 0 when nothing is ahead).
   * Predicted from the queue ahead of it (waiting sequences of its priority or better, whose
   * prefill shares the token budget) and from the running sequences' remaining output bounds
   * (`maxTokens`): once every running seat is taken, a newcomer waits for as many running
   * sequences to finish as there are sequences ahead of it beyond the free seats. An upper
   * bound when sequences stop early (end of sequence); paused sequences count as running.
   */
  predictedQueueingSteps(priority: number, numPromptTokens: number): number {
    const ownSteps = Math.ceil(numPromptTokens / this.limits.maxNumBatchedTokens)
    let ahead = 0
    let prefillTokens = numPromptTokens
    for (const seq of this.waiting) {
      if (seq.request.priority > priority) break
      ahead++
      prefillTokens += seq.tokenIds.length - seq.numComputedTokens
    }
    const prefillSteps = Math.ceil(prefillTokens / this.limits.maxNumBatchedTokens)
    const freeSeats = this.limits.maxNumSeqs - this.running.length
    if (ahead < freeSeats) return prefillSteps - ownSteps
    const remaining = this.running.map((s) => Math.max(0, s.request.maxTokens - s.numOutputTokens)).sort((a, b) => a - b)
    const k = ahead - freeSeats // index of the running sequence whose end frees our seat
    if (k < remaining.length) return remaining[k]! + prefillSteps - ownSteps
    // Past every running sequence: later ones wait for the waiting ones to run in turn.
    const longest = remaining.at(-1) ?? 0
    const rounds = Math.ceil((k - remaining.length + 1) / this.limits.maxNumSeqs)
    const meanMaxTokens = this.waiting.reduce((sum, s) => sum + s.request.maxTokens, 0) / Math.max(1, this.waiting.length)
    return longest + rounds * meanMaxTokens + prefillSteps - ownSteps
  }

  /** Queues a new sequence. @returns false if the seqId is already live or the prompt cannot ever fit. */
  add(request: SequenceRequest): boolean {
    if (this.bySeqId.has(request.seqId)) return false
    const n = request.promptTokenIds.length
    if (n === 0 || n >= this.limits.maxModelLen) return false
    if (this.kv.blocksFor(n + 1) > this.kv.numBlocks) return false
    const seq: Sequence = {
      request,
      arrival: this.arrivals++,
      tokenIds: [...request.promptTokenIds],
      numComputedTokens: 0,
      numOutputTokens: 0,
      paused: false,
      engineKnows: false,
      numBlocksSent: 0,
      promptHashes: undefined,
      numCachedTokens: 0
    }
    this.bySeqId.set(request.seqId, seq)
    insertByPriority(this.waiting, seq)
    return true
  }

  /**
   * Removes a sequence wherever it is; its blocks are free at once and the engine is told in
   * the next step (or bare release). Safe while a step is in flight: that step's output for
   * this sequence is dropped by `applyStepResult`. @returns whether it was live.
   */
  cancel(seqId: number): boolean {
    const seq = this.bySeqId.get(seqId)
    if (seq === undefined) return false
    this.finish(seq)
    return true
  }

  setPaused(seqId: number, paused: boolean): void {
    const seq = this.bySeqId.get(seqId)
    if (seq !== undefined) seq.paused = paused
  }

  /**
   * The engine lost every sequence's state (it was restarted): each running sequence goes
   * back to the waiting queue with its output so far, as a preemption by recompute, and is
   * prefilled again from prompt + generated tokens on the next engine. Pending releases are
   * dropped (the new engine holds nothing).
   */
  requeueAll(): void {
    for (const seq of [...this.running]) this.preempt(seq)
    for (const seq of this.waiting) {
      seq.engineKnows = false
      seq.numBlocksSent = 0
    }
    this.pendingRelease.clear()
    // The new engine's KV memory holds nothing: no cached block is valid.
    this.kv.dropCache()
  }

  /** Ids of every live sequence (running and waiting). */
  liveSeqIds(): ReadonlyArray<number> {
    return [...this.bySeqId.keys()]
  }

  /** Release ids not yet sent to the engine; taking them clears the set. */
  takePendingRelease(): ReadonlyArray<number> {
    const ids = [...this.pendingRelease]
    this.pendingRelease.clear()
    return ids
  }

  /** Builds the next step, or `undefined` when no sequence can run (pending releases stay queued). */
  schedule(): StepPlan | undefined {
    const items: Array<StepItem> = []
    const preempted: Array<number> = []
    let budget = this.limits.maxNumBatchedTokens

    // Running sequences first, in priority order; preemption frees blocks from the tail.
    for (let i = 0; i < this.running.length && budget > 0; i++) {
      const seq = this.running[i]!
      if (seq.paused) continue
      const n = Math.min(seq.tokenIds.length - seq.numComputedTokens, budget)
      if (n <= 0) continue
      let fits = this.kv.canAllocate(seq.request.seqId, seq.numComputedTokens + n)
      while (!fits) {
        const victim = this.running[this.running.length - 1]!
        this.preempt(victim)
        preempted.push(victim.request.seqId)
        if (victim === seq) break
        fits = this.kv.canAllocate(seq.request.seqId, seq.numComputedTokens + n)
      }
      if (!fits) break // seq itself was the tail and got preempted: nothing after it remains
      this.kv.allocate(seq.request.seqId, seq.numComputedTokens + n)
      items.push(this.item(seq, n))
      budget -= n
    }

    // Admit waiting sequences (never in a step that had to preempt: blocks are short).
    if (preempted.length === 0) {
      let w = 0
      while (w < this.waiting.length && budget > 0 && this.running.length < this.limits.maxNumSeqs) {
        const seq = this.waiting[w]!
        if (seq.paused) {
          w++
          continue
        }
        // Prefix caching: the KV of the longest cached chain of its full blocks is shared, and
        // its computation starts after it (a preempted sequence gets back what is still cached).
        let prefix: ReadonlyArray<number> = []
        if (seq.numComputedTokens === 0 && this.kv.cachingEnabled) {
          seq.promptHashes ??= this.kv.hashChain(seq.tokenIds, Math.floor((seq.tokenIds.length - 1) / this.kv.blockSize))
          prefix = this.kv.findCachedPrefix(seq.promptHashes, seq.tokenIds.length)
        }
        const start = seq.numComputedTokens + prefix.length * this.kv.blockSize
        const n = Math.min(seq.tokenIds.length - start, budget)
        // Head-of-line: keep priority order rather than let a small late request jump ahead.
        if (this.kv.allocate(seq.request.seqId, start + n, prefix) === undefined) break
        if (seq.numComputedTokens === 0 && this.kv.cachingEnabled) {
          this.kv.recordLookup(seq.tokenIds.length, start)
          if (seq.numOutputTokens === 0) seq.numCachedTokens = start
        }
        seq.numComputedTokens = start
        this.waiting.splice(w, 1)
        insertByPriority(this.running, seq)
        items.push(this.item(seq, n))
        budget -= n
      }
    }

    if (items.length === 0) return undefined
    return {
      release: this.takePendingRelease(),
      items,
      numBatchedTokens: this.limits.maxNumBatchedTokens - budget,
      preempted
    }
  }

  /**
   * Applies the engine's reply to `plan`: advances computed counts, appends sampled tokens,
   * finishes sequences on EOS / max tokens / context length (their blocks are freed now).
   * @param sampled token id per item that had `sample: true`, keyed by seq_id.
   * @returns the sampled tokens, each sequence's first token before all others: delivering a
   * step's tokens costs ~30 µs per stream (a socket write each), so at batch 1024 a new
   * sequence's first token would otherwise wait ~30 ms behind the running ones (its TTFT).
   */
  applyStepResult(plan: StepPlan, sampled: ReadonlyMap<number, number>): ReadonlyArray<TokenOutput> {
    const firsts: Array<TokenOutput> = []
    const outputs: Array<TokenOutput> = []
    for (const item of plan.items) {
      const seq = this.bySeqId.get(item.seq_id)
      // Cancelled while the step was in flight: its result is void.
      if (seq === undefined || seq.numComputedTokens !== item.start_pos) continue
      seq.numComputedTokens += item.tokens.length
      this.kv.cacheComputedBlocks(seq.request.seqId, seq.tokenIds, seq.numComputedTokens, seq.promptHashes)
      if (!item.sample) continue
      const tokenId = sampled.get(item.seq_id)
      if (tokenId === undefined) continue
      seq.tokenIds.push(tokenId)
      seq.numOutputTokens++
      const finishReason: FinishReason | undefined = seq.request.eosTokenIds.has(tokenId)
        ? "stop"
        : seq.numOutputTokens >= seq.request.maxTokens || seq.tokenIds.length >= this.limits.maxModelLen
        ? "length"
        : undefined
      ;(seq.numOutputTokens === 1 ? firsts : outputs).push({ seqId: seq.request.seqId, tokenId, finishReason, numCachedTokens: seq.numCachedTokens })
      if (finishReason !== undefined) this.finish(seq)
    }
    return firsts.length === 0 ? outputs : firsts.concat(outputs)
  }

  /**
   * The engine learns of the sequence as soon as the plan is sent, so it counts as known from
   * here on: a cancel that lands while this step is in flight must still release it.
   */
  private item(seq: Sequence, n: number): StepItem {
    const start = seq.numComputedTokens
    const tokens = seq.tokenIds.slice(start, start + n)
    const sample = start + n === seq.tokenIds.length
    const table = this.kv.blockTable(seq.request.seqId)
    const sent = seq.numBlocksSent
    seq.numBlocksSent = table.length
    if (!seq.engineKnows) {
      seq.engineKnows = true
      return { seq_id: seq.request.seqId, tokens, start_pos: start, block_table: [...table], sampling: seq.request.sampling, sample }
    }
    if (table.length > sent) {
      return { seq_id: seq.request.seqId, tokens, start_pos: start, new_blocks: table.slice(sent), sample }
    }
    return { seq_id: seq.request.seqId, tokens, start_pos: start, sample }
  }

  private preempt(seq: Sequence): void {
    remove(this.running, seq)
    this.kv.free(seq.request.seqId)
    if (seq.engineKnows) this.pendingRelease.add(seq.request.seqId)
    seq.engineKnows = false
    seq.numBlocksSent = 0
    seq.numComputedTokens = 0
    // Its tokens grew: the lookup at its readmission hashes prompt + output so far.
    seq.promptHashes = undefined
    insertByPriority(this.waiting, seq)
  }

  private finish(seq: Sequence): void {
    remove(this.running, seq) || remove(this.waiting, seq)
    this.bySeqId.delete(seq.request.seqId)
    this.kv.free(seq.request.seqId)
    if (seq.engineKnows) this.pendingRelease.add(seq.request.seqId)
  }
}

const before = (a: Sequence, b: Sequence): boolean =>
  a.request.priority < b.request.priority || (a.request.priority === b.request.priority && a.arrival < b.arrival)

function insertByPriority(queue: Array<Sequence>, seq: Sequence): void {
  let i = queue.length
  while (i > 0 && before(seq, queue[i - 1]!)) i--
  queue.splice(i, 0, seq)
}

function remove(queue: Array<Sequence>, seq: Sequence): boolean {
  const i = queue.indexOf(seq)
  if (i < 0) return false
  queue.splice(i, 1)
  return true
}
