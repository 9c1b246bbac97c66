/**
 * Facts mined from idle conversations into their users' memory.
 *
 * After each stored reply the Conversation entity starts `ExtractFacts` for the conversation
 * as it is then (its next seq). The workflow sleeps on a durable clock for the topology's
 * `memory.extract_after_idle_s`; when it wakes, its `Extract` step mines the recent turns only
 * if none came meanwhile (else the workflow of the later turn does it), with the model of
 * `memory.extraction_pool`, and its `Store` step adds the facts to the user's memory (the
 * store merges equal facts). Durable (@effect/workflow on the cluster's message storage):
 * a runner that restarts resumes the sleeping and the started ones; a step run twice adds
 * nothing twice.
 */
import { Activity, DurableClock, Workflow } from "@effect/workflow"
import { Duration, Effect, Layer, Schema } from "effect"
import { ConversationId, UserId } from "../runtime/Domain.js"
import { EngineError, StorageError } from "../runtime/Errors.js"
import { EXTRACTION_MAX_TOKENS, extractionPrompt, FactExtractor, parseFacts } from "../runtime/FactExtractor.js"
import { ConversationStore } from "../runtime/Storage.js"
import type { ChatMessage } from "../runtime/Tokenizer.js"
import { TopologyService } from "../runtime/Topology.js"
import { BackgroundModel } from "./BackgroundModel.js"
import { Embedder } from "./Embedder.js"

/** Turns mined, at most: the latest ones. */
const MINED_TURNS = 20

export const ExtractFacts = Workflow.make({
  name: "ExtractFacts",
  payload: {
    conversation_id: ConversationId,
    user_id: UserId,
    /** The conversation's next seq when the workflow started: it is idle while that is still so. */
    through_seq: Schema.Int,
    pool: Schema.String
  },
  /** The facts added (empty: the conversation was not idle, or nothing new). */
  success: Schema.Array(Schema.String),
  error: Schema.Union(StorageError, EngineError),
  idempotencyKey: (p) => `${p.conversation_id}:${p.through_seq}`
})

const STEP_RETRIES = 5

/** The workflow's implementation (register it on every gateway runner). */
export const layer = ExtractFacts.toLayer(Effect.fn(function*(payload) {
  const store = yield* ConversationStore
  const extractor = yield* FactExtractor
  const topology = yield* TopologyService
  const embedder = yield* Embedder
  yield* DurableClock.sleep({ name: "idle", duration: Duration.seconds(topology.memory?.extract_after_idle_s ?? 600) })
  const id = payload.conversation_id
  const facts = yield* Activity.make({
    name: "Extract",
    success: Schema.Array(Schema.String),
    error: Schema.Union(StorageError, EngineError),
    execute: Effect.gen(function*() {
      const turns = yield* store.listTurns(id, { limit: MINED_TURNS })
      // A turn came since (or the conversation is gone): not idle.
      if (turns.length === 0 || turns.at(-1)!.seq + 1 !== payload.through_seq) return []
      const messages = turns
        .filter((t) => t.role !== "system" && t.status === "completed" && t.content.length > 0)
        .map((t): ChatMessage => ({ role: t.role, content: t.content }))
      if (!messages.some((m) => m.role === "user")) return []
      const existing = (yield* store.listFacts(payload.user_id)).map((f) => f.content)
      return yield* extractor.extract({ conversationId: id, pool: payload.pool, messages, existing })
    })
  }).pipe(Activity.retry({ times: STEP_RETRIES }))
  if (facts.length === 0) return []
  yield* Activity.make({
    name: "Store",
    error: StorageError,
    execute: Effect.flatMap(embedder.embed(facts), (embeddings) => store.updateFacts(payload.user_id, { add: facts, remove: [] }, embeddings))
  }).pipe(Activity.retry({ times: STEP_RETRIES }))
  return facts
}))

/** The FactExtractor on the engine: the model of `memory.extraction_pool` (else the conversation's pool), as a background sequence. */
export const layerExtractor = Layer.effect(
  FactExtractor,
  Effect.gen(function*() {
    const background = yield* BackgroundModel
    const topology = yield* TopologyService
    return FactExtractor.of({
      extract: (input) =>
        background.generate({
          pool: topology.memory?.extraction_pool ?? input.pool,
          conversationId: input.conversationId,
          prompt: (model) => extractionPrompt(model.tokenizer, model.maxModelLen, input),
          maxTokens: EXTRACTION_MAX_TOKENS,
          purpose: "facts"
        }).pipe(Effect.map((reply) => parseFacts(reply, input.existing)))
    })
  })
)
