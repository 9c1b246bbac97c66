/**
 * Running summaries of long conversations: a prompt holds the system prompt, the user's facts,
 * the summary and the most recent turns within the topology's `context.prompt_budget_tokens`.
 *
 * - `planSummary`: after a reply is stored, the Conversation entity checks whether the turns
 *   since the summary outgrew SUMMARY_TRIGGER of the budget; if so it folds the oldest of them
 *   into the summary, keeping about SUMMARY_KEEP of the budget as verbatim turns. Between two
 *   summary updates the prompt's prefix (system prompt, summary, first kept turn) stays the
 *   same, so the GPU's prefix cache serves it.
 * - `SummarizeConversation`: a durable workflow (@effect/workflow on the cluster's message
 *   storage), off the TTFT path. Its `Summarize` step reads the summary and the turns up to
 *   `through_seq` from the store and has the summary pool's model write the new summary; its
 *   `Store` step stores it only in place of the summary it was made from. A runner that dies
 *   mid-way resumes the workflow on restart; a step run twice stores nothing twice.
 * - `layerSummarizer`: the model call, as a background sequence (BackgroundModel) on a GPU of
 *   the summary pool.
 */
import { Activity, Workflow } from "@effect/workflow"
import { Effect, Layer, Option, Schema } from "effect"
import { ConversationId, Summary } from "../runtime/Domain.js"
import { EngineError, StorageError } from "../runtime/Errors.js"
import { ConversationStore } from "../runtime/Storage.js"
import { Summarizer, summaryPrompt, summaryText } from "../runtime/Summarizer.js"
import type { ChatMessage } from "../runtime/Tokenizer.js"
import { TopologyService } from "../runtime/Topology.js"
import { BackgroundModel } from "./BackgroundModel.js"
import type { PromptCache } from "./internal/promptAssembly.js"

/** A summary is due once the turns after it take this fraction of the prompt budget. */
export const SUMMARY_TRIGGER = 0.6
/** ...and it leaves about this fraction of the budget as verbatim turns. */
export const SUMMARY_KEEP = 0.3

/** What the plan reads of a conversation's state. */
export interface SummaryState {
  readonly history: ReadonlyArray<ChatMessage>
  /** The stored seq of each `history` message. */
  readonly seqs: ReadonlyArray<number>
  readonly cache: PromptCache
  readonly summary: Summary | undefined
}

/** Index of the first history message after the summary (the prompt's window starts there). */
export const windowStartOf = (state: Pick<SummaryState, "seqs" | "summary">): number => {
  const through = state.summary?.through_seq
  if (through === undefined) return 0
  let lo = 0
  let hi = state.seqs.length
  while (lo < hi) {
    const mid = (lo + hi) >> 1
    if (state.seqs[mid]! < through) lo = mid + 1
    else hi = mid
  }
  return lo
}

/** A message's tokens: its encoding when prompt assembly made one, else ~3 characters a token. */
const tokensOf = (state: SummaryState, i: number): number =>
  state.cache.historyIds[i]?.length ?? Math.ceil(state.history[i]!.content.length / 3)

/**
 * The seq the next summary should run through, or undefined while the turns after the summary
 * take less than SUMMARY_TRIGGER of `budgetTokens`. The oldest turns are folded until about
 * SUMMARY_KEEP of the budget is left, at an exchange boundary (a user message starts the kept
 * window).
 */
export const planSummary = (state: SummaryState, budgetTokens: number): number | undefined => {
  const n = state.history.length
  const start = windowStartOf(state)
  let total = 0
  for (let i = start; i < n; i++) total += tokensOf(state, i)
  if (total <= budgetTokens * SUMMARY_TRIGGER) return undefined
  let end = start
  while (end < n && total > budgetTokens * SUMMARY_KEEP) total -= tokensOf(state, end++)
  while (end < n && state.history[end]!.role !== "user") end++
  if (end === start) return undefined
  return end < n ? state.seqs[end]! : state.seqs[n - 1]! + 1
}

/** The text of a summary step: the new summary, and the one it was made from (null: none). */
const Draft = Schema.Struct({ based_on: Schema.NullOr(Schema.Int), summary: Summary })

export const SummarizeConversation = Workflow.make({
  name: "SummarizeConversation",
  payload: {
    conversation_id: ConversationId,
    /** The summary covers the turns with seq < through_seq. */
    through_seq: Schema.Int,
    /** The pool whose model writes it. */
    pool: Schema.String
  },
  /** The summary stored; null when there was nothing to do (a newer one exists, the conversation is gone). */
  success: Schema.NullOr(Summary),
  error: Schema.Union(StorageError, EngineError),
  idempotencyKey: (p) => `${p.conversation_id}:${p.through_seq}`
})

/** Retries of a summary step that failed (a busy GPU, a database blip): ~1 minute in all. */
const STEP_RETRIES = 5

/** The workflow's implementation (register it on every gateway runner). */
export const layer = SummarizeConversation.toLayer(Effect.fn(function*(payload) {
  const store = yield* ConversationStore
  const summarizer = yield* Summarizer
  const topology = yield* TopologyService
  const maxTokens = topology.context?.summary_max_tokens ?? 256
  const id = payload.conversation_id
  const draft = yield* Activity.make({
    name: "Summarize",
    success: Schema.NullOr(Draft),
    error: Schema.Union(StorageError, EngineError),
    execute: Effect.gen(function*() {
      const previous = Option.getOrUndefined(yield* store.getSummary(id))
      const from = previous?.through_seq ?? 0
      if (from >= payload.through_seq || Option.isNone(yield* store.getConversation(id))) return null
      const turns = yield* store.listTurns(id, { before: payload.through_seq, limit: payload.through_seq - from })
      const messages = turns
        .filter((t) => t.seq >= from && t.role !== "system" && t.status !== "failed" && t.status !== "filtered")
        .map((t): ChatMessage => ({ role: t.role, content: t.content }))
      const content = yield* summarizer.summarize({ conversationId: id, pool: payload.pool, previous: previous?.content ?? null, messages, maxTokens })
      // An empty summary would drop the turns it stands for from every prompt.
      if (content.trim().length === 0) return yield* new EngineError({ code: "empty_summary", message: "the model wrote an empty summary" })
      return {
        based_on: previous?.through_seq ?? null,
        summary: new Summary({ through_seq: payload.through_seq, content, updated_at_ms: Date.now() })
      }
    })
  }).pipe(Activity.retry({ times: STEP_RETRIES }))
  if (draft === null) return null
  const stored = yield* Activity.make({
    name: "Store",
    success: Schema.Boolean,
    error: StorageError,
    execute: store.putSummary(id, draft.summary, draft.based_on)
  }).pipe(Activity.retry({ times: STEP_RETRIES }))
  return stored ? draft.summary : null
}))

/**
 * The Summarizer on the engine: the model of the topology's `context.summary_pool` (else the
 * conversation's pool), as a background sequence (BackgroundModel).
 */
export const layerSummarizer = Layer.effect(
  Summarizer,
  Effect.gen(function*() {
    const background = yield* BackgroundModel
    const topology = yield* TopologyService
    return Summarizer.of({
      summarize: (input) =>
        background.generate({
          pool: topology.context?.summary_pool ?? input.pool,
          conversationId: input.conversationId,
          prompt: (model) => summaryPrompt(model.tokenizer, model.maxModelLen, input),
          maxTokens: input.maxTokens,
          purpose: "summary"
        }).pipe(Effect.map(summaryText))
    })
  })
)
