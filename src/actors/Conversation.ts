/**
 * Conversation entity, one per conversation id, sharded freely over gateway runners: the
 * control plane of a conversation's turns (the text goes through the TurnStream data plane).
 *
 * SendTurn: appends the user turn durably (the acknowledgement point: its reply, Accepted),
 * assembles the prompt (system prompt + history + new turn through the model's chat template,
 * dropping the oldest turns if the context is short), takes a DecodeSlot from a GPU of the
 * conversation's pool and starts it with the caller's TurnStream id. It returns once the
 * generation is queued; no fiber waits for it.
 * FinishTurn: sent by the DecodeSlot when the generation ends; appends the assistant turn
 * (`completed`, `cancelled` on Cancel or disconnect, `failed` on an engine error).
 * Cancel: stops the running turn, if any.
 *
 * State: the entity instance owns its running turn (at most one: a second SendTurn is
 * turn_in_progress) and is kept alive while it runs. Everything it must carry across a shard
 * move is in storage: the history and next seq in PostgreSQL (a last user turn without a
 * reply reserves the reply's seq), and where the turn runs in the turn's log (its `start`
 * event: slot and request). The keep-alive message is persisted, so when a gateway runner is
 * lost its conversations with running turns start on their new owner, which takes each turn
 * over (`recover`). The runner's `hot` map is a cache of the history, checked against the
 * store's last seq before use when other runners may have written since.
 */
import { randomInt } from "node:crypto"
import { ClusterSchema, Entity, Sharding } from "@effect/cluster"
import { Rpc } from "@effect/rpc"
import { WorkflowEngine } from "@effect/workflow"
import { Cause, Deferred, Duration, Effect, Exit, Fiber, FiberId, Layer, Option, Runtime, Schedule, Schema } from "effect"
import { DataPlane } from "../runtime/DataPlane.js"
import { TurnEventLog } from "../runtime/TurnEventLog.js"
import { type ConversationId, type Summary, type Turn, TurnId, UserId } from "../runtime/Domain.js"
import {
  ContentFiltered,
  ConversationNotFound,
  DuplicateTurn,
  EngineError,
  IdempotencyKeyReused,
  Overloaded,
  PromptTooLong,
  StorageError,
  TurnInProgress
} from "../runtime/Errors.js"
import { Models } from "../runtime/Models.js"
import { Moderation } from "../runtime/Moderation.js"
import type { ChatMessage } from "../runtime/Tokenizer.js"
import { type CachedConversation, ConversationCache } from "../runtime/ConversationCache.js"
import { ConversationStore, type NewTurn } from "../runtime/Storage.js"
import { lookup, TopologyService, trainingEligible, zeroRetention } from "../runtime/Topology.js"
import { endFromReply, TurnStreamId } from "../runtime/TurnStream.js"
import { DecodeSlot, FinishedTurn, StartPayload, TurnFinisher } from "./DecodeSlot.js"
import { retryShardMoves, SHARD_MOVE_RETRIES } from "./internal/shardMoves.js"
import { BEST_EFFORT_TIMEOUT, quietly, timeoutDetached } from "./internal/callTimeout.js"
import * as failover from "./internal/failover.js"
import { GpuScheduler, shardGroupOf, type SlotReservation } from "./GpuScheduler.js"
import * as ShardTenure from "./internal/shardTenure.js"
import { SHARDS_PER_GROUP } from "../runtime/Cluster.js"
import { type ConversationState, HotConversations } from "./internal/hotConversations.js"
import { askGpu, gpuOrder, markUnanswered } from "./internal/gpuOrder.js"
import { explicitFact } from "./internal/memoryRequests.js"
import { buildPrompt, emptyPromptCache, MIN_NEW_TOKENS } from "./internal/promptAssembly.js"
import { Embedder } from "./Embedder.js"
import { ExtractFacts } from "./FactExtraction.js"
import { planSummary, SummarizeConversation, windowStartOf } from "./Summaries.js"

/** Budget of the runner's hot conversation state (chars of prompts and history, ~2 bytes each). */
const HOT_CONVERSATIONS_MAX_CHARS = 32 * 1024 * 1024

/** Reply of SendTurn: the user turn is durable and the generation is queued. */
export class Accepted extends Schema.Class<Accepted>("Accepted")({
  user_turn_id: TurnId,
  turn_id: TurnId,
  num_prompt_tokens: Schema.Int
}) {}

export const SendTurnError = Schema.Union(
  ContentFiltered,
  ConversationNotFound,
  DuplicateTurn,
  IdempotencyKeyReused,
  TurnInProgress,
  PromptTooLong,
  StorageError,
  EngineError,
  Overloaded
)

export const Conversation = Entity.make("Conversation", [
  Rpc.make("Create", {
    payload: {
      pool: Schema.String,
      system_prompt: Schema.NullOr(Schema.String),
      user_id: UserId,
      org_id: Schema.NullOr(Schema.String),
      /** Days it is kept after its last turn (its creator's tier or org); absent or null: indefinitely. */
      retention_days: Schema.optional(Schema.NullOr(Schema.Int)),
      /** Earlier messages the conversation starts with (an OpenAI request's), stored as completed turns. */
      history: Schema.optional(Schema.Array(Schema.Struct({ role: Schema.Literal("user", "assistant"), content: Schema.String })))
    },
    error: StorageError
  }),
  Rpc.make("SendTurn", {
    payload: {
      content: Schema.String,
      max_tokens: Schema.optional(Schema.Int),
      temperature: Schema.optional(Schema.Number),
      top_p: Schema.optional(Schema.Number),
      stop: Schema.optional(Schema.Array(Schema.String)),
      seed: Schema.optional(Schema.Int),
      /** The sender's tier: its priority and TTFT target at admission (default: the topology's default tier). */
      tier: Schema.optional(Schema.String),
      /** The caller's TurnStream (on the gateway that holds the client) that receives the generated text. */
      stream_id: TurnStreamId,
      /** The client's Idempotency-Key: a turn re-sent with it fails with DuplicateTurn (that turn). */
      idempotency_key: Schema.optional(Schema.String)
    },
    success: Accepted,
    error: SendTurnError
  }),
  /**
   * A slot's report of its ended turn. @returns false when the turn had been moved off that
   * slot (a failover): the report is void, and the slot writes no end (the turn's new slot
   * does); true once the reply is stored (or was already).
   */
  Rpc.make("FinishTurn", { payload: FinishedTurn, success: Schema.Boolean, error: StorageError }),
  /** Stops the streaming turn, if any. @returns whether one was running. */
  Rpc.make("Cancel", { success: Schema.Boolean, error: Schema.Union(ConversationNotFound, StorageError) }),
  /** Stops the running turn, if any, then deletes the conversation, its turns and shares. */
  Rpc.make("Delete", {
    payload: {
      /**
       * Retention: delete only if its last turn (or, without turns, its creation) is before this
       * time (ms since epoch) and no turn runs; the user may have come back since it was listed.
       */
      if_idle_before_ms: Schema.optional(Schema.Number)
    },
    /** Whether it was deleted (false: it was not idle, with `if_idle_before_ms`). */
    success: Schema.Boolean,
    error: Schema.Union(ConversationNotFound, StorageError)
  }),
  /**
   * The turn whose reply may still be generating: the running one, else (after a shard move
   * or a restart) the reply reserved after a last user turn. Null when neither.
   */
  Rpc.make("InFlight", { success: Schema.NullOr(TurnId), error: Schema.Union(ConversationNotFound, StorageError) }),
  /**
   * A reader resumes the running turn `turn_id` from its DecodeSlot's own buffer (the turn
   * log is unavailable): see DecodeSlot's Attach. @returns whether the slot took the reader.
   */
  Rpc.make("Attach", { payload: { turn_id: TurnId, stream_id: TurnStreamId, after_index: Schema.Int }, success: Schema.Boolean })
]).annotate(ClusterSchema.ClientTracingEnabled, false) // no trace exporter (main.ts): spans would only cost CPU

/** A turn between SendTurn and FinishTurn. */
interface ActiveTurn {
  turnId: TurnId
  /** The client's Idempotency-Key of this turn, if it sent one. */
  readonly idempotencyKey: string | undefined
  /** The user's message, where known (not for a turn taken over from another runner). */
  readonly content: string | undefined
  slotId: string | undefined
  /**
   * What starts it, set as its Start is sent (a failover starts it again elsewhere with this;
   * a FinishTurn that overtakes the Start's answer finds the client's stream in it).
   */
  start: StartPayload | undefined
  cancelRequested: boolean
  /**
   * Its slot's FinishTurn is storing the reply (which may take a while through a database
   * outage): the generation is over, and the failover watch must not move it.
   */
  reporting?: boolean
  /** Whether the user turn is durable, once its append ends; FinishTurn waits for it. */
  readonly userTurnStored: Deferred.Deferred<boolean>
  /** Done once the turn is over and the conversation takes a new one (Cancel waits for it). */
  readonly ended: Deferred.Deferred<void>
}

/**
 * Further retries of a reply whose store failed on a transient error (each try has its own
 * ~6 s of retries, Storage's retryTransient): about a minute in all.
 */
const REPLY_STORE_RETRY = Schedule.exponential(Duration.millis(500)).pipe(
  Schedule.either(Schedule.spaced(Duration.seconds(5))),
  Schedule.upTo(Duration.seconds(60))
)

/** The assistant row of a reply that failed (or could not be stored): empty, `failed`. */
const failedReply = (id: ConversationId, seq: number, numPromptTokens: number | null): NewTurn => ({
  conversation_id: id,
  seq,
  role: "assistant",
  content: "",
  status: "failed",
  num_prompt_tokens: numPromptTokens,
  num_completion_tokens: 0
})

/** How long a turn whose log shows its end waits for its FinishTurn before it is settled from the store. */
const ENDED_REPORT_WAIT = Duration.seconds(10)

/** A GPU whose scheduler does not answer admission within this is skipped (its runner is gone; a loaded one answers well within it). */
const ACQUIRE_TIMEOUT = Duration.seconds(10)
/** How long a turn sent again waits for its first copy's user turn to be stored (or refused). */
const RESEND_SETTLE_TIMEOUT = Duration.seconds(30)

/**
 * How long a Conversation that took a running turn over (a shard move) waits for the turn's
 * log to show it started before it stores the reply as failed: the previous owner may still be
 * admitting and starting it (up to the admission timeout).
 */
const TAKEOVER_WAIT_MS = 15_000
/** ...and at most this long while it cannot tell (turn log unreadable, a GPU not answering). */
const TAKEOVER_MAX_WAIT_MS = 300_000

/**
 * The GPU that served a conversation's last turn takes its next one while its predicted
 * queueing delay is within this fraction of the tier's TTFT target (else the pool's others).
 */
const AFFINITY_LOAD_FRACTION = 0.5

/** A conversation with more turns after its summary than this is not put in the shared cache (it loads from the store). */
const MAX_SHARED_MESSAGES = 256
/** ...or more characters (a SET per reply must stay small). */
const MAX_SHARED_CHARS = 256 * 1024

/** How long a Conversation awaits its summary workflow (it goes on in the cluster; the state then reads it from the store). */
const SUMMARY_WAIT = Duration.minutes(10)
/** After a failed summary, the next one waits this long. */
const SUMMARY_RETRY_AFTER_MS = 60_000

/** Remembered facts of the user put in a prompt, at most. */
const MEMORY_TOP_K = 5

/**
 * The prompt's system message: the conversation's system prompt, then the running summary
 * (which stands for the turns before the window), then the user's facts that match the new
 * message; null when there is none of them.
 */
const contextPrompt = (systemPrompt: string | null, summary: Summary | undefined, facts: ReadonlyArray<string>): string | null => {
  const parts: Array<string> = []
  if (systemPrompt !== null) parts.push(systemPrompt)
  if (summary !== undefined && summary.content.length > 0) parts.push(`Summary of the conversation so far:\n${summary.content}`)
  if (facts.length > 0) parts.push(`What you know about the user:\n${facts.map((f) => `- ${f}`).join("\n")}`)
  return parts.length === 0 ? null : parts.join("\n\n")
}

/** How long Delete waits, beyond Cancel's wait, for a stopped turn to be stored. */
const DELETE_SETTLE_TIMEOUT = Duration.seconds(60)

/** How long Cancel waits for the cancelled turn to be stored before it answers. */
const CANCEL_SETTLE_TIMEOUT = Duration.seconds(10)

/** Entity-client failures that mean "the cluster could not deliver": surfaced as a 503. */
/**
 * Rows per history page when a conversation is loaded: decoding a page is a few ms of the
 * event loop, and the loop is free between pages (a 1,000-row history decoded at once held it
 * ~100 ms, which every other client's request waited out).
 */
const HISTORY_PAGE_SIZE = 100

/** A conversation's whole history, oldest first, read newest page first. */
const listAllTurns = (store: ConversationStore["Type"], id: ConversationId) =>
  Effect.gen(function*() {
    const pages: Array<ReadonlyArray<Turn>> = []
    let before: number | undefined
    for (;;) {
      const page = yield* store.listTurns(id, { before, limit: HISTORY_PAGE_SIZE })
      pages.push(page)
      if (page.length < HISTORY_PAGE_SIZE) break
      before = page[0]!.seq
    }
    return pages.reverse().flat()
  })

const clusterUnavailable = (e: { readonly _tag: string }) =>
  new EngineError({ code: "unavailable", message: `cluster could not deliver the message (${e._tag})` })

/** A start payload read back from a turn's log (another process wrote it). */
const decodeStartPayload = Schema.decodeUnknownOption(StartPayload)

/**
 * Whether a call to an entity on another runner ended with neither an answer nor a failure of
 * its own: interrupted (the callee's runner gave up its shards as it answered), or dead (the
 * socket to a runner that died failed under the write, which @effect/platform's socket
 * reports as a defect in the caller's fiber). Either way the call may or may not have arrived.
 */
const unanswered = (cause: Cause.Cause<unknown>): boolean => Option.isNone(Cause.failureOption(cause))

/** Sequence number of a turn id `<conversation_id>:<seq>`. */
const seqOf = (turnId: TurnId): number => Number(turnId.slice(turnId.lastIndexOf(":") + 1))

/** `Effect.catchTags` handlers for the entity clients' delivery failures (→ 503). */
export const clusterErrors = {
  MailboxFull: (e: { readonly _tag: string }) => Effect.fail(clusterUnavailable(e)),
  AlreadyProcessingMessage: (e: { readonly _tag: string }) => Effect.fail(clusterUnavailable(e)),
  PersistenceError: (e: { readonly _tag: string }) => Effect.fail(clusterUnavailable(e))
}

// The entity clients are made once for all Conversation entities: each one holds an RPC
// client, and making them per entity cost ~hundreds of KB per live conversation.
export const layer = Layer.unwrapScoped(Effect.gen(function*() {
  const gpus = yield* GpuScheduler.client
  const slots = yield* DecodeSlot.client
  const hot = new HotConversations(HOT_CONVERSATIONS_MAX_CHARS)
  const topologyValue = yield* TopologyService
  const multiRunner = topologyValue.runners.length > 1
  const runFork = Runtime.runFork(yield* Effect.runtime<ConversationStore>())
  const workflows = yield* WorkflowEngine.WorkflowEngine
  const shared = yield* ConversationCache
  // With several runners: whether this runner held a conversation's shard since it cached it.
  const tenure = multiRunner ? yield* ShardTenure.make(yield* Sharding.Sharding, "default", SHARDS_PER_GROUP) : undefined
  const embedder = yield* Embedder
  const contextSettings = topologyValue.context
  const eventLog = yield* TurnEventLog
  const failoverDeps: failover.FailoverDeps = {
    slots,
    gpus,
    eventLog,
    dataPlane: yield* DataPlane,
    topology: topologyValue,
    missedPings: failover.gpuHealth(gpus, runFork),
    slotChecks: failover.slotChecks(gpus, runFork)
  }
  const guardStreamEnd = failover.streamEndGuard(failoverDeps, runFork)
  /** Ends turn `turn`'s client stream from its stored reply (its slot's GPU runner was lost). */
  const endStreamFromReply = (start: StartPayload, turn: FinishedTurn) => {
    const sink = failoverDeps.dataPlane.sink(start.stream_id)
    if (sink === undefined) return
    runFork(Effect.logInfo(`turn ${turn.turn_id}: ${shardGroupOf(turn.slot_id)} was lost once its reply was stored; its stream, if still open, is ended from the reply`))
    endFromReply(sink, turn)
  }
  /** Stores a user turn's reply as `failed` (never leaves a hole in the history); logs a failure. */
  const appendFailedReply = (id: ConversationId, seq: number, numPromptTokens: number | null) =>
    Effect.flatMap(ConversationStore, (store) => store.appendTurn(failedReply(id, seq, numPromptTokens)).pipe(Effect.ignoreLogged))
  return Conversation.toLayer(
    Effect.gen(function*() {
      const address = yield* Entity.CurrentAddress
      const id = address.entityId as string as ConversationId
      const store = yield* ConversationStore
      const models = yield* Models
      const moderation = yield* Moderation
      const topology = yield* TopologyService
      const entityContext = yield* Effect.context<Sharding.Sharding | Entity.CurrentAddress>()
      let loaded: ConversationState | undefined
      /** Delete has begun: the conversation takes no new turn. */
      let deleted = false
      /** The conversation's turn between SendTurn and FinishTurn (at most one). */
      let active: ActiveTurn | undefined
      /** The last row of the history as `load` read it from the store (recovery reads it). */
      let lastStoredTurn: { readonly seq: number; readonly role: string } | undefined

      // While a turn is active the instance is kept alive (a persisted keep-alive message):
      // the idle reaper leaves it, and after a shard move the message makes the new owner
      // start the entity at once, which takes the turn over (`recover`).
      let keepAliveOn: Fiber.RuntimeFiber<void> | undefined
      /**
       * This instance has stopped (its shard moved, or the runner stops): what it forked on the
       * runner's runtime (a turn's watch) must not act for it any more.
       */
      let closed = false
      yield* Effect.addFinalizer(() => Effect.sync(() => void (closed = true)))
      const hold = () => {
        keepAliveOn = runFork(Effect.provide(Entity.keepAlive(true), entityContext))
      }
      const unhold = () => {
        const on = keepAliveOn
        keepAliveOn = undefined
        runFork(Effect.zipRight(on === undefined ? Effect.void : Fiber.await(on), Effect.provide(Entity.keepAlive(false), entityContext)))
      }
      /** Ends `turn`: the conversation is free again, and Cancel's wait is over. */
      const release = (turn: ActiveTurn) => {
        if (active === turn) {
          active = undefined
          unhold()
        }
        Deferred.unsafeDone(turn.ended, Exit.void)
      }
      /** Watches a started turn until it ends; one that could not be moved is stored as failed. */
      const watchTurn = (turn: ActiveTurn) =>
        failover.watch(failoverDeps, turn, () => !closed && active === turn).pipe(
          Effect.flatMap((outcome) => {
            if (outcome === "watched") return Effect.void
            if (outcome === "ended") return settleEnded(turn)
            return Effect.gen(function*() {
              yield* appendFailedReply(id, seqOf(turn.turnId), turn.start?.prompt_token_ids.length ?? null)
              hot.delete(id)
              release(turn)
            })
          })
        )

      /**
       * A turn whose log shows its end, while its FinishTurn has not come within
       * ENDED_REPORT_WAIT: the turn is released from what the store holds (its reply, else a
       * `failed` one), so that the conversation is never left answering 409.
       */
      const settleEnded = (turn: ActiveTurn) =>
        Effect.gen(function*() {
          yield* Effect.sleep(ENDED_REPORT_WAIT)
          if (closed || active !== turn) return
          const seq = seqOf(turn.turnId)
          const stored = yield* store.listTurns(id, { before: seq + 1, limit: 1 }).pipe(Effect.orElseSucceed(() => []))
          yield* Effect.logWarning(`turn ${turn.turnId} ended without its report; released from the store (${stored.at(-1)?.seq === seq ? "its reply" : "stored as failed"})`)
          if (stored.at(-1)?.seq !== seq) yield* appendFailedReply(id, seq, turn.start?.prompt_token_ids.length ?? null)
          if (active !== turn) return
          hot.delete(id)
          loaded = undefined
          release(turn)
        })

      /**
       * Writes the conversation's state to the shared cache (Redis), off the turn's path: the
       * turns after the summary, checked by readers against the store's last turn.
       */
      const share = (state: ConversationState, finishing?: TurnId) => {
        const last = lastStoredTurn
        // While a turn runs (other than the one whose reply was just stored), the state holds
        // a user turn that may not be stored yet.
        const running = active !== undefined && active.turnId !== finishing
        if (!shared.enabled || last === undefined || running || zeroRetention(topology, state.orgId)) return
        const start = windowStartOf(state)
        if (state.history.length - start > MAX_SHARED_MESSAGES) return void runFork(shared.delete(id))
        const messages: Array<CachedConversation["messages"][number]> = []
        let chars = 0
        for (let i = start; i < state.history.length && state.seqs[i]! <= last.seq; i++) {
          const m = state.history[i]!
          chars += m.content.length
          if (m.role !== "system") messages.push({ seq: state.seqs[i]!, role: m.role, content: m.content })
        }
        if (chars > MAX_SHARED_CHARS) return void runFork(shared.delete(id))
        runFork(shared.put(id, {
          pool: state.pool,
          user_id: state.userId,
          org_id: state.orgId,
          system_prompt: state.systemPrompt,
          ...(state.summary === undefined ? {} : { summary: state.summary }),
          next_seq: last.seq + (last.role === "user" ? 2 : 1),
          last: { seq: last.seq, role: last.role as "user" | "assistant" },
          messages
        }))
      }

      const load = Effect.gen(function*() {
        if (loaded !== undefined) return loaded
        const cached = hot.get(id)
        if (cached !== undefined && !multiRunner) {
          shared.recordLoad("process")
          return (loaded = cached)
        }
        if (multiRunner) {
          // Cached while this runner held the shard, which it has held since: its own writes.
          const heldSince = tenure?.of(id)
          if (cached !== undefined && heldSince !== undefined && cached.tenure === heldSince) {
            lastStoredTurn = cached.lastStored
            shared.recordLoad("process")
            return (loaded = cached)
          }
          // Another runner may have written turns since this one cached them (the shard
          // moved away and back), and the shared entry may lag behind the store: either
          // holds only while it ends where the store does (its last turn, one indexed row).
          const tail = yield* store.listTurns(id, { limit: 1 })
          if (loaded !== undefined) return loaded
          const last = tail.at(-1)
          if (cached !== undefined) {
            if (last !== undefined && last.seq + (last.role === "user" ? 2 : 1) === cached.nextSeq) {
              lastStoredTurn = last
              cached.tenure = heldSince
              cached.lastStored = last
              shared.recordLoad("checked")
              return (loaded = cached)
            }
            hot.delete(id)
          }
          const entry = last === undefined ? Option.none() : yield* shared.get(id)
          if (loaded !== undefined) return loaded
          if (Option.isSome(entry) && entry.value.last?.seq === last?.seq && entry.value.last?.role === last?.role) {
            const e = entry.value
            lastStoredTurn = last
            loaded = {
              pool: e.pool,
              userId: e.user_id,
              orgId: e.org_id,
              systemPrompt: e.system_prompt,
              history: e.messages.map((m) => ({ role: m.role, content: m.content })),
              seqs: e.messages.map((m) => m.seq),
              cache: emptyPromptCache(),
              summary: e.summary,
              // As `load` computes it from the store's last turn (the entry's was made so too).
              nextSeq: last!.seq + (last!.role === "user" ? 2 : 1),
              tenure: heldSince,
              lastStored: last
            }
            hot.set(id, loaded)
            shared.recordLoad("shared")
            return loaded
          }
        }
        const heldSinceLoad = tenure?.of(id)
        const [row, summary] = yield* Effect.all([store.getConversation(id), store.getSummary(id)], { concurrency: 2 })
        if (Option.isNone(row)) return yield* new ConversationNotFound({ conversation_id: id })
        const turns = yield* listAllTurns(store, id)
        // A concurrent message's load may have finished first: keep the one state in use.
        if (loaded !== undefined) return loaded
        const last = turns.at(-1)
        lastStoredTurn = last
        // Zero retention: the stored turns have no text; the conversation goes on without them.
        const zeroRetained = zeroRetention(topology, row.value.org_id)
        const kept = turns.filter((t) => t.role !== "system" && t.status !== "failed" && t.status !== "filtered" && !(zeroRetained && t.content === ""))
        loaded = {
          pool: row.value.model,
          userId: row.value.user_id,
          orgId: row.value.org_id,
          systemPrompt: row.value.system_prompt,
          history: kept.map((t) => ({ role: t.role, content: t.content })),
          seqs: kept.map((t) => t.seq),
          cache: emptyPromptCache(),
          summary: Option.getOrUndefined(summary),
          // A user turn's reply keeps its seq (user seq + 1) even while its row is missing
          // (still streaming, or lost in a crash until start-up reconciliation fills it in);
          // a running turn's too (a turn still being accepted, as when SendTurn itself loads,
          // has no id yet).
          nextSeq: Math.max(
            last === undefined ? 0 : last.seq + (last.role === "user" ? 2 : 1),
            active === undefined || active.turnId === "" ? 0 : seqOf(active.turnId) + 1
          )
        }
        loaded.tenure = heldSinceLoad
        loaded.lastStored = last
        hot.set(id, loaded)
        shared.recordLoad("store")
        share(loaded)
        return loaded
      })

      /**
       * The last turn's reply could not be stored (the database refused it, or was down past
       * the retries): it is stored `failed` before a new turn takes the next number, so the
       * history has no hole; until it can be, no turn is taken (StorageError: 503). Only a
       * reply whose number is reserved (a conversation created with a history that ends with a
       * user message has none). A reply row found there after all (its append had committed,
       * or a failed reply was stored meanwhile) is read with the rest of the state.
       */
      const settleUnreplied = (conv: ConversationState): Effect.Effect<ConversationState, StorageError | ConversationNotFound> =>
        Effect.gen(function*() {
          const unreplied = conv.lastStored
          if (unreplied?.role !== "user" || conv.nextSeq !== unreplied.seq + 2) return conv
          const seq = unreplied.seq + 1
          return yield* store.appendTurn(failedReply(id, seq, null)).pipe(
            Effect.as(conv),
            Effect.tap(() => {
              conv.lastStored = { seq, role: "assistant" }
              if (lastStoredTurn?.seq === unreplied.seq) lastStoredTurn = conv.lastStored
            }),
            Effect.catchAll((e) =>
              Effect.flatMap(store.listTurns(id, { before: seq + 1, limit: 1 }), (rows) => {
                if (rows.at(-1)?.seq !== seq) return Effect.fail(e)
                hot.delete(id)
                loaded = undefined
                return load
              })
            )
          )
        })

      /**
       * Takes over a turn this instance did not start (its shard moved here while the turn
       * ran: the last stored row is a user turn without its reply). The turn is this entity's
       * at once (a second turn meets turn_in_progress); `takeOver` then finds where it runs.
       * Runs once per instance, before any message is handled.
       */
      const recover = Effect.gen(function*() {
        const conv = yield* load
        if (active !== undefined || lastStoredTurn?.role !== "user") return
        const turn: ActiveTurn = {
          turnId: TurnId.make(`${id}:${lastStoredTurn.seq + 1}`),
          idempotencyKey: undefined,
          content: undefined,
          slotId: undefined,
          start: undefined,
          cancelRequested: false,
          userTurnStored: Deferred.unsafeMake<boolean>(FiberId.none),
          ended: Deferred.unsafeMake<void>(FiberId.none)
        }
        Deferred.unsafeDone(turn.userTurnStored, Exit.succeed(true))
        active = turn
        hold()
        runFork(takeOver(turn, conv.pool))
      }).pipe(
        Effect.catchAll((e) =>
          e._tag === "ConversationNotFound" ? Effect.void : Effect.logWarning(`conversation ${id}: its running turn could not be recovered`, e)
        ),
        // Nothing to keep alive for (a keep-alive message that brought the entity here is answered).
        Effect.ensuring(Effect.suspend(() => active === undefined ? Effect.provide(Entity.keepAlive(false), entityContext) : Effect.void))
      )

      /**
       * Finds where a taken-over turn runs, then watches it as its own (a lost GPU runner still
       * moves it). The pool's GPUs are asked (FindTurn: slot and request) and the turn's log is
       * read (its last `start` event says the same, and is all there is when that GPU's runner
       * is gone; the previous owner logged it before its Start went out). The previous owner may still be starting the turn (its last steps run to the
       * end), so each second for TAKEOVER_WAIT_MS it is looked for again. A turn that ended
       * (`done`: its reply is stored) is released; one that never started, or ended without its
       * reply stored, gets a `failed` reply, so the conversation is never stuck. While the log is
       * unreadable and a GPU does not answer, it waits (up to TAKEOVER_MAX_WAIT_MS).
       */
      const takeOver = (turn: ActiveTurn, pool: string) =>
        Effect.gen(function*() {
          const gpuIds = (lookup(topology.pools, pool)?.gpus ?? []).map((g) => g.id)
          const startedAt = Date.now()
          for (;;) {
            const [found, logged] = yield* Effect.all([
              Effect.forEach(gpuIds, (gpuId) =>
                timeoutDetached(gpus(gpuId).FindTurn({ turn_id: turn.turnId }), Duration.seconds(1)).pipe(
                  Effect.map(Option.some),
                  Effect.catchAllCause(() => Effect.succeed(Option.none()))
                ), { concurrency: "unbounded" }),
              eventLog.read(turn.turnId).pipe(Effect.option)
            ], { concurrency: 2 })
            if (active !== turn) return // its FinishTurn came meanwhile
            const events = Option.getOrElse(logged, () => [])
            let started: { readonly slot_id: string; readonly request: unknown } | null = null
            for (const f of found) if (Option.isSome(f) && f.value !== null) started = f.value
            const ended = events.find((e) => e.kind === "done" || e.kind === "error")
            if (started === null && ended === undefined) for (const e of events) if (e.kind === "start") started = e
            const request = started === null ? Option.none() : decodeStartPayload(started.request)
            if (ended === undefined && Option.isSome(request)) {
              turn.slotId = started!.slot_id
              turn.start = request.value
              yield* Effect.logInfo(`turn ${turn.turnId} taken over on slot ${turn.slotId}`)
              if (turn.cancelRequested) yield* quietly(slots(turn.slotId).Cancel({ turn_id: turn.turnId }))
              return yield* watchTurn(turn)
            }
            const waitedMs = Date.now() - startedAt
            const known = Option.isSome(logged) || found.every(Option.isSome)
            if (ended !== undefined || (waitedMs > TAKEOVER_WAIT_MS && known) || waitedMs > TAKEOVER_MAX_WAIT_MS) {
              // `done` comes only once the reply is stored; otherwise it is stored as failed.
              if (ended?.kind !== "done") {
                yield* Effect.logWarning(`turn ${turn.turnId} has no running generation: its reply is stored as failed`)
                yield* appendFailedReply(id, seqOf(turn.turnId), turn.start?.prompt_token_ids.length ?? null)
              }
              // The state in memory lacks the reply: the next message reads it from the store.
              hot.delete(id)
              loaded = undefined
              return release(turn)
            }
            yield* Effect.sleep(Duration.seconds(1))
          }
        })

      /**
       * Starts the summary workflow when the turns after the summary outgrew the budget
       * (Summaries.planSummary); once it stored the summary, later prompts hold it in place of
       * the turns it covers. Off the TTFT path: the turn that made it due is over. A runner
       * that restarts resumes the workflow; its state here is then read from the store.
       */
      const summarizeIfDue = (state: ConversationState) => {
        if (contextSettings === undefined || state.summaryPending !== undefined || zeroRetention(topology, state.orgId)) return
        if (state.summaryRetryAfterMs !== undefined && Date.now() < state.summaryRetryAfterMs) return
        // The history's share of the budget: what the system prompt and summary leave (~3 chars a token).
        const fixedTokens = Math.ceil(((state.systemPrompt?.length ?? 0) + (state.summary?.content.length ?? 0)) / 3)
        const throughSeq = planSummary(state, Math.max(1, contextSettings.prompt_budget_tokens - fixedTokens))
        if (throughSeq === undefined) return
        state.summaryPending = throughSeq
        runFork(
          SummarizeConversation.execute({ conversation_id: id, through_seq: throughSeq, pool: state.pool }).pipe(
            Effect.provideService(WorkflowEngine.WorkflowEngine, workflows),
            Effect.timeoutFail({ duration: SUMMARY_WAIT, onTimeout: () => new EngineError({ code: "timeout", message: "summary workflow" }) }),
            // A failed summary is not tried again at once (a deterministic failure would repeat).
            Effect.tapErrorCause(() => Effect.sync(() => {
              state.summaryRetryAfterMs = Date.now() + SUMMARY_RETRY_AFTER_MS
            })),
            Effect.tap((summary) =>
              Effect.sync(() => {
                if (summary !== null && (state.summary?.through_seq ?? -1) < summary.through_seq) {
                  state.summary = summary
                  if (loaded === state) share(state)
                }
              })
            ),
            Effect.catchAllCause((cause) => Effect.logWarning(`conversation ${id}: the summary through ${throughSeq} failed`, cause)),
            Effect.ensuring(Effect.sync(() => {
              state.summaryPending = undefined
            }))
          )
        )
      }

      /**
       * Starts the fact-mining workflow for the conversation as it is now (FactExtraction.ts):
       * it mines it once it has been idle for `memory.extract_after_idle_s`.
       */
      const mineWhenIdle = (state: ConversationState) => {
        if (topology.memory === undefined || zeroRetention(topology, state.orgId)) return
        runFork(
          ExtractFacts.execute({ conversation_id: id, user_id: state.userId, through_seq: state.nextSeq, pool: state.pool }, { discard: true }).pipe(
            Effect.provideService(WorkflowEngine.WorkflowEngine, workflows),
            Effect.catchAllCause((cause) => Effect.logWarning(`conversation ${id}: fact mining could not be started`, cause))
          )
        )
      }

      const recovered = multiRunner ? yield* Effect.cached(recover) : Effect.void
      if (multiRunner) yield* Effect.forkScoped(recovered)
      else yield* Entity.keepAlive(false)

      /**
       * The answer to a turn sent with a key this conversation took for turn `turnId`, whose
       * message was `taken` (undefined or "" where not known or not kept): that turn when the
       * message is the same, else the key was reused for another message.
       */
      const sentAgain = (input: SendTurnInput, turnId: string, taken: string | undefined) =>
        taken === undefined || taken === "" || taken === input.content
          ? new DuplicateTurn({ conversation_id: id, turn_id: turnId })
          : new IdempotencyKeyReused({ conversation_id: id, turn_id: turnId })

      const sendTurn = (input: SendTurnInput) =>
        Effect.gen(function*() {
          const key = input.idempotency_key
          yield* recovered
          // Sent again before its user turn is stored: it waits until that is (or the turn was
          // refused), then gets the answer of any re-send below (or is taken anew).
          const pending = active
          if (key !== undefined && pending?.idempotencyKey === key && pending.turnId === "") {
            yield* Effect.raceFirst(Deferred.await(pending.userTurnStored), Deferred.await(pending.ended)).pipe(
              Effect.timeout(RESEND_SETTLE_TIMEOUT),
              Effect.ignore
            )
          }
          if (deleted) return yield* new ConversationNotFound({ conversation_id: id })
          // Claim the conversation before the next yield: handlers run concurrently.
          const running = active
          if (running !== undefined) {
            // The client re-sends the turn it already has (a retry): that one, not a 409.
            if (key !== undefined && running.idempotencyKey === key && running.turnId !== "") {
              return yield* sentAgain(input, running.turnId, running.content)
            }
            // A turn taken over after a shard move does not know its key: the store does.
            if (key !== undefined && running.idempotencyKey === undefined && running.turnId !== "") {
              const earlier = yield* store.findIdempotentTurn(id, key)
              if (Option.isSome(earlier) && earlier.value.seq + 1 === seqOf(running.turnId)) {
                return yield* sentAgain(input, running.turnId, earlier.value.content)
              }
            }
            return yield* new TurnInProgress({ conversation_id: id })
          }
          // The turn id is known once the user turn's seq is; "" until then.
          const userTurnStored = Deferred.unsafeMake<boolean>(FiberId.none)
          const turn: ActiveTurn = {
            turnId: TurnId.make(""),
            idempotencyKey: key,
            content: input.content,
            slotId: undefined,
            start: undefined,
            cancelRequested: false,
            userTurnStored,
            ended: Deferred.unsafeMake<void>(FiberId.none)
          }
          active = turn
          let stored: { readonly seq: number; readonly numPromptTokens: number } | undefined
          /** Start was cut off by a shard move: whether the slot runs the turn is unknown. */
          let startUncertain = false
          /** A slot admitted for this turn and not (yet) started: given back on failure. */
          let reservedSlot: SlotReservation | undefined
          // Interruptible only until something is stored or started (load, prompt, admission):
          // from the append on, a caller that goes away cancels the turn's stream instead, and
          // the turn ends as `failed` (Start finds no stream) or `cancelled`, never half-recorded.
          const accepted = yield* Effect.uninterruptibleMask((restore) => Effect.gen(function*() {
            let conv = yield* restore(load)
            if (key !== undefined) {
              const earlier = yield* restore(store.findIdempotentTurn(id, key))
              if (Option.isSome(earlier)) return yield* sentAgain(input, `${id}:${earlier.value.seq + 1}`, earlier.value.content)
            }
            conv = yield* restore(settleUnreplied(conv))
            const model = models.get(conv.pool)
            const pool = lookup(topology.pools, conv.pool)
            if (model === undefined || pool === undefined) {
              return yield* new EngineError({ code: "unknown_pool", message: `pool ${conv.pool} is not configured` })
            }
            const tier = lookup(topology.tiers, input.tier ?? topology.default_tier) ?? lookup(topology.tiers, topology.default_tier)!
            const maxTokens = input.max_tokens ?? topology.generation.max_tokens
            // Checked before anything is stored: a rejected turn changes nothing.
            // The owner's remembered facts that best match the message go after the system prompt.
            // Ranked by words first; a user with facts has them ranked again with the message's
            // embedding as well (an engine forward pass, only then).
            let facts = yield* restore(store.topFacts(conv.userId, input.content, MEMORY_TOP_K))
            if (facts.length > 0) {
              const [embedding] = yield* restore(embedder.embed([input.content]))
              if (embedding !== undefined) facts = yield* restore(store.topFacts(conv.userId, input.content, MEMORY_TOP_K, embedding))
            }
            const promptState = {
              systemPrompt: contextPrompt(conv.systemPrompt, conv.summary, facts),
              history: conv.history,
              cache: conv.cache,
              windowStart: windowStartOf(conv)
            }
            const promptIds = yield* buildPrompt(model, promptState, input.content, Math.min(maxTokens, MIN_NEW_TOKENS), contextSettings?.prompt_budget_tokens)
            // Input moderation, once the prompt is known to fit (a prompt too long is told so first).
            const verdict = moderation.checkInput(input.content)
            if (verdict.flagged) return yield* new ContentFiltered({ category: verdict.category ?? "flagged" })
            // Admission before anything is stored too: a refused turn leaves no row.
            // Conversation-affine routing: the GPU that served the last turn holds its KV (the
            // prefix cache), so it is asked first, and takes the turn unless its predicted
            // queueing delay is past AFFINITY_LOAD_FRACTION of the TTFT target; then the pool's
            // other GPUs in random order. A GPU that refuses, is draining, or whose runner is
            // gone (no answer within ACQUIRE_TIMEOUT) hands over to the next.
            const order = gpuOrder(pool.gpus.map((g) => g.id), pool.routing === "affinity" ? conv.lastGpuId : undefined)
            const affine = order[0] === conv.lastGpuId && pool.routing === "affinity"
            type AcquireError = Effect.Effect.Error<ReturnType<ReturnType<typeof gpus>["AcquireSlot"]>> | EngineError
            const acquire = (k: number): Effect.Effect<SlotReservation, AcquireError> => {
              const gpuId = order[k]!
              const next = k + 1 < order.length
              const noAnswer = () => Effect.fail(new EngineError({ code: "unavailable", message: `${gpuId} did not answer` }))
              return askGpu(
                gpuId,
                gpus(gpuId).AcquireSlot({
                  priority: tier.priority,
                  num_prompt_tokens: promptIds.length,
                  ttft_target_ms: k === 0 && affine && next ? Math.round(tier.ttft_p99_ms * AFFINITY_LOAD_FRACTION) : tier.ttft_p99_ms
                }),
                ACQUIRE_TIMEOUT
              ).pipe(
                Effect.catchTag("TimeoutException", noAnswer),
                // Its runner died under the call: as a GPU that does not answer (a defect
                // left alone would restart this entity mid-turn).
                Effect.catchAllDefect(() => Effect.zipRight(Effect.sync(() => markUnanswered(gpuId)), noAnswer())),
                Effect.catchIf(
                  (e) => next && (e._tag === "AdmissionRefused" || (e._tag === "EngineError" && e.code === "unavailable")),
                  () => acquire(k + 1)
                )
              )
            }
            const reserved = yield* restore(acquire(0)).pipe(
              Effect.catchTags({
                AdmissionRefused: (e) => Effect.fail(new Overloaded({ message: e.message, retry_after_s: e.retry_after_s })),
                UnknownGpu: (e) => Effect.fail(new EngineError({ code: "unknown_gpu", message: e.gpu_id })),
                ...clusterErrors
              })
            )
            reservedSlot = reserved
            const slotId = reserved.slot_id
            const userSeq = conv.nextSeq
            // The append runs while the generation is queued (it is on the TTFT path
            // otherwise); SendTurn, which acknowledges the turn, returns only once it is durable.
            const append = yield* store.appendTurn({
              conversation_id: id,
              seq: userSeq,
              role: "user",
              // Zero retention: the text stays in this runner's memory only.
              content: zeroRetention(topology, conv.orgId) ? "" : input.content,
              status: "completed",
              num_prompt_tokens: null,
              num_completion_tokens: null,
              training_eligible: trainingEligible(topology, conv.orgId)
            }, { idempotencyKey: key }).pipe(
              Effect.onExit((exit) =>
                Effect.suspend(() => {
                  // Not stored (possibly a stale hot state, see hotConversations.ts): drop
                  // the state that already holds this user turn; the next message reloads.
                  if (Exit.isFailure(exit)) {
                    hot.delete(id)
                    loaded = undefined
                  } else {
                    conv.lastStored = { seq: userSeq, role: "user" }
                    // "Remember that …": the fact joins the user's memory (deduplicated).
                    const fact = zeroRetention(topology, conv.orgId) ? undefined : explicitFact(input.content)
                    if (fact !== undefined) {
                      runFork(Effect.flatMap(embedder.embed([fact]), (e) => store.updateFacts(conv.userId, { add: [fact], remove: [] }, e)).pipe(Effect.ignoreLogged))
                    }
                  }
                  return Deferred.succeed(userTurnStored, Exit.isSuccess(exit))
                })
              ),
              Effect.fork
            )
            conv.nextSeq = userSeq + 2 // the assistant turn's seq is reserved now
            // The instance outlives this message while the turn runs (and moves with its shard):
            // held from here, so that a shard move from now on brings the next owner, whose
            // `recover` takes the turn over, even if this message never finishes.
            if (active === turn) hold()
            const userMessage: ChatMessage = { role: "user", content: input.content }
            conv.history.push(userMessage)
            conv.seqs.push(userSeq)
            hot.grew(id, conv, userMessage)
            const turnId = TurnId.make(`${id}:${userSeq + 1}`)
            turn.turnId = turnId
            stored = { seq: userSeq + 1, numPromptTokens: promptIds.length }

            const startPayload: StartPayload = {
              pool: conv.pool,
              conversation_id: id,
              turn_id: turnId,
              stream_id: input.stream_id,
              prompt_token_ids: promptIds,
              max_tokens: Math.min(maxTokens, model.maxModelLen - promptIds.length),
              sampling: {
                temperature: input.temperature ?? topology.generation.temperature,
                top_p: input.top_p ?? topology.generation.top_p,
                top_k: topology.generation.top_k,
                seed: input.seed ?? randomInt(0, 2 ** 31)
              },
              priority: tier.priority,
              stop: input.stop ?? [],
              ...(multiRunner && zeroRetention(topology, conv.orgId) ? { ephemeral: true } : {})
            }
            // A Start cut off by a shard move (the slot's runner gave up its shard locks for a
            // moment) or by its runner's death may or may not have started the sequence; it is
            // not sent again (the slot may have been reserved anew since). The turn is taken as
            // started on that slot: its watch finds out (its slot check, or the GPU's silence), and moves
            // it to a GPU if it is not running there. A runner that died before it answered
            // would keep the Start waiting for ever (the cluster holds a message to a pinned
            // shard until its runner is back), so once the GPU is given up by the watch's rule
            // the Start is taken as cut off. It runs in a fiber of its own: it goes out whatever
            // becomes of this wait (an instance stopped by a shard move leaves the turn to the
            // next owner, which finds it on its slot).
            turn.start = startPayload
            // The turn's start is logged before the Start goes out (its slot logs it too, once
            // running): should this instance stop (a shard move) before its watch could move
            // the turn, the next owner's `takeOver` finds the turn, and what starts it
            // elsewhere, in the log. The slot's own entry may never be written: its runner can
            // die between answering the Start and its next log write.
            if (multiRunner) eventLog.append(turnId, { index: -1, kind: "start", slot_id: slotId, request: startPayload })
            const startCall = slots(slotId).Start({ ...startPayload, reservation_id: reserved.reservation_id })
            const startOrLost = !multiRunner ? startCall : Effect.gen(function*() {
              const start = yield* Effect.forkDaemon(startCall)
              const lost = yield* Effect.raceFirst(
                Effect.interruptible(Effect.as(Fiber.join(start), false)),
                Effect.interruptible(Effect.as(failover.untilLost(failoverDeps, shardGroupOf(slotId), conv.pool), true))
              )
              if (!lost) return
              yield* Fiber.interruptFork(start)
              startUncertain = true
              yield* Effect.logWarning(`turn ${turnId}: ${shardGroupOf(slotId)} was lost before it answered the Start; its watch moves the turn`)
            })
            yield* startOrLost.pipe(
              Effect.catchAllCause((cause) =>
                multiRunner && unanswered(cause)
                  ? Effect.zipRight(
                    Effect.sync(() => void (startUncertain = true)),
                    Effect.logInfo(`turn ${turnId}: its Start on ${slotId} was cut off (a shard move, or its runner died); its watch checks it`)
                  )
                  : Effect.failCause(cause)
              ),
              Effect.catchTags({
                UnknownGpu: (e) => Effect.fail(new EngineError({ code: "unknown_gpu", message: e.gpu_id })),
                ...clusterErrors
              }),
              // A Start that failed gave its slot back itself; one that never arrived did not.
              Effect.tapErrorTag("EngineError", (e) => Effect.sync(() => {
                if (e.code !== "unavailable") reservedSlot = undefined
              }))
            )
            reservedSlot = undefined
            turn.slotId = slotId
            conv.lastGpuId = shardGroupOf(slotId)
            yield* Fiber.join(append).pipe(
              // Not durable: the generation stops, and its FinishTurn stores nothing (one whose
              // Start was cut off may not run: it is abandoned, and the turn released below).
              Effect.tapError(() => quietly(startUncertain ? slots(slotId).Abandon({ turn_id: turnId }) : slots(slotId).Cancel({ turn_id: turnId })))
            )
            if (turn.cancelRequested) yield* quietly(slots(slotId).Cancel({ turn_id: turnId }))
            // Other runners may die: a turn whose GPU runner goes moves to another GPU.
            if (multiRunner) runFork(watchTurn(turn))
            return new Accepted({
              user_turn_id: TurnId.make(`${id}:${userSeq}`),
              turn_id: turnId,
              num_prompt_tokens: promptIds.length
            })
          })).pipe(
            // Not started (an error, a defect, or an interrupt during load): the conversation is
            // free again (once a started generation's FinishTurn has come); a stored user turn
            // gets its assistant turn as `failed`, so the history never has a hole.
            Effect.onExit((exit) =>
              Exit.isSuccess(exit) ? Effect.void : Effect.gen(function*() {
                // Interrupted once the turn was being acknowledged: from there on the region is
                // uninterruptible, so it ran to its end and the turn runs (an interrupt that
                // came meanwhile, from a caller that went away or from this instance stopping as
                // its shard moves, shows only now). Nothing is undone. A stopped instance's turn
                // is taken over by the shard's next owner, brought by the keep-alive (`recover`):
                // it watches the generation, or stores the reply as failed if none started.
                if (stored !== undefined && turn.slotId !== undefined && Cause.isInterruptedOnly(exit.cause)) {
                  if (closed) yield* Effect.logInfo(`turn ${id}:${stored.seq} left to the shard's next owner (this instance stopped)`)
                  return
                }
                if (reservedSlot !== undefined) {
                  // Bounded: the GPU's runner may be gone (an unstarted reservation expires there).
                  yield* quietly(gpus(shardGroupOf(reservedSlot.slot_id)).ReleaseSlot(reservedSlot))
                }
                // Given up unstarted after its start was logged: the log ends it too (a
                // follower, or a later owner's takeover, must not wait on it).
                const logGivenUp = () => {
                  if (multiRunner && turn.start !== undefined) {
                    eventLog.append(turn.turnId, { index: 0, kind: "error", code: "generation_failed", message: "the turn did not start" })
                  }
                }
                const userTurnDurable = stored !== undefined && (yield* Deferred.await(userTurnStored))
                if (!userTurnDurable) {
                  // A started generation's FinishTurn releases the turn; an abandoned one never comes.
                  if (turn.slotId === undefined || startUncertain) {
                    logGivenUp()
                    release(turn)
                  }
                  return
                }
                yield* Effect.logWarning(`turn ${id}:${stored!.seq} did not start: its reply is stored as failed`, exit.cause)
                yield* appendFailedReply(id, stored!.seq, stored!.numPromptTokens)
                logGivenUp()
                release(turn)
              })
            )
          )
          return accepted
        })

      const finishTurn = (turn: FinishedTurn) =>
        Effect.gen(function*() {
          const seq = seqOf(turn.turn_id)
          // A generation can end before its user turn is durable (SendTurn appends it
          // meanwhile); a reply to a user turn that was never stored is not stored either.
          yield* recovered
          const current = active
          if (current?.turnId === turn.turn_id) {
            // The turn moved to another GPU (failover): the earlier slot's report is void.
            if (current.slotId !== undefined && turn.slot_id !== current.slotId) return false
            current.reporting = true
            if (!(yield* Deferred.await(current.userTurnStored))) {
              return yield* new StorageError({ message: `the user turn of ${turn.turn_id} was not stored` })
            }
          }
          // A report of a turn this instance did not start (one that ended as the shard moved)
          // updates the runner's cached state, if any (or only the store, which has it now).
          // With several runners only a state that `load` checked against the store is updated
          // (a `hot` entry may miss turns another runner wrote): else the next load reads it.
          const state = loaded ?? (multiRunner ? undefined : hot.get(id))
          if (state === undefined) hot.delete(id)
          const orgId = state !== undefined ? state.orgId : Option.getOrNull(Option.map(yield* store.getConversation(id), (row) => row.org_id))
          yield* store.appendTurn({
            conversation_id: id,
            seq,
            role: "assistant",
            content: zeroRetention(topology, orgId) ? "" : turn.text,
            status: turn.status,
            num_prompt_tokens: turn.num_prompt_tokens,
            num_completion_tokens: turn.num_completion_tokens,
            moderation_verdict: turn.moderation_verdict ?? null,
            training_eligible: trainingEligible(topology, orgId)
          }).pipe(
            // Its client has the text and waits for `done`: a database that is down for longer
            // than one statement's retries is waited for (the client gets keep-alives).
            Effect.retry({ schedule: REPLY_STORE_RETRY, while: (e) => e.transient === true && !closed && !deleted })
          )
          // The slot ends the client's stream once this returns, unless its GPU runner dies first.
          if (multiRunner && current?.turnId === turn.turn_id && current.start !== undefined) {
            const start = current.start
            guardStreamEnd(shardGroupOf(turn.slot_id), start.pool, () => endStreamFromReply(start, turn))
          }
          // A reply delivered twice (a FinishTurn resent after a shard move) is in the state already.
          const known = state !== undefined && (state.seqs.at(-1) ?? -1) >= seq
          if (state !== undefined && !known) {
            loaded = state
            // A failed or filtered reply never goes into later prompts.
            const reply: ChatMessage | undefined = turn.status === "failed" || turn.status === "filtered" ? undefined : { role: "assistant", content: turn.text }
            if (reply !== undefined) {
              loaded.history.push(reply)
              loaded.seqs.push(seq)
            }
            loaded.nextSeq = Math.max(loaded.nextSeq, seq + 1)
            hot.grew(id, loaded, reply)
            if (lastStoredTurn === undefined || lastStoredTurn.seq < seq) lastStoredTurn = { seq, role: "assistant" }
            loaded.lastStored = lastStoredTurn
            share(loaded, turn.turn_id)
            summarizeIfDue(loaded)
            if (turn.status === "completed") mineWhenIdle(loaded)
            // The next prompts hold this message: use the ids the model produced for it
            // rather than encode its text again (the per-turn cost of a long reply).
            if (turn.completion_token_ids !== undefined) {
              models.get(loaded.pool)?.tokenizer.rememberAssistant(turn.text, turn.completion_token_ids)
            }
          }
          return true
        }).pipe(
          // Not for the report of a slot the turn moved off: the turn runs on elsewhere, and
          // its new slot's report ends it (a new turn must not start beside it).
          Effect.ensuring(Effect.sync(() => {
            if (active?.turnId === turn.turn_id && (active.slotId === undefined || active.slotId === turn.slot_id)) release(active)
          }))
        )

      /** Stops the running turn, if any; succeeds once it is stored. @returns whether one ran. */
      const cancelRunning = Effect.gen(function*() {
        yield* load
        yield* recovered
        const turn = active
        if (turn === undefined) return false
        let cancelled = true
        if (turn.slotId === undefined) turn.cancelRequested = true
        else {
          cancelled = yield* timeoutDetached(slots(turn.slotId).Cancel({ turn_id: turn.turnId }), BEST_EFFORT_TIMEOUT).pipe(
            Effect.catchAllCause(() => Effect.succeed(false))
          )
        }
        // Answer once the turn is stored and the conversation takes a new one (a send
        // right after the 204 must not meet turn_in_progress).
        yield* Deferred.await(turn.ended).pipe(Effect.timeout(CANCEL_SETTLE_TIMEOUT), Effect.ignore)
        return cancelled
      })

      return Conversation.of({
        Create: ({ payload }) =>
          store.createConversation({
            id,
            model: payload.pool,
            system_prompt: payload.system_prompt,
            user_id: payload.user_id,
            org_id: payload.org_id,
            retention_days: payload.retention_days ?? null
          }, zeroRetention(topology, payload.org_id) ? (payload.history ?? []).map((m) => ({ role: m.role, content: "" })) : payload.history ?? []).pipe(
            Effect.tap(() =>
              Effect.sync(() => {
                loaded = {
                  pool: payload.pool,
                  userId: payload.user_id,
                  orgId: payload.org_id,
                  systemPrompt: payload.system_prompt,
                  history: (payload.history ?? []).map((m) => ({ role: m.role, content: m.content })),
                  seqs: (payload.history ?? []).map((_, seq) => seq),
                  cache: emptyPromptCache(),
                  summary: undefined,
                  nextSeq: payload.history?.length ?? 0,
                  // Made here, on the shard's owner: its own state from the start.
                  tenure: tenure?.of(id),
                  lastStored: payload.history === undefined || payload.history.length === 0
                    ? undefined
                    : { seq: payload.history.length - 1, role: payload.history[payload.history.length - 1]!.role }
                }
                hot.set(id, loaded)
              })
            ),
            Effect.asVoid
          ),
        SendTurn: ({ payload }) => sendTurn(payload),
        InFlight: () =>
          Effect.gen(function*() {
            yield* recovered
            if (active !== undefined && active.turnId !== "") return active.turnId
            const conv = yield* load
            // The reply of a last stored user turn (a failed or filtered reply is stored but
            // is not in `history`, which holds what later prompts see).
            const last = conv.lastStored
            return last?.role === "user" ? TurnId.make(`${id}:${last.seq + 1}`) : null
          }),
        FinishTurn: ({ payload }) => finishTurn(payload),
        Attach: ({ payload }) =>
          Effect.gen(function*() {
            yield* recovered
            const turn = active
            // A turn being taken over (a shard move) is found within a few seconds.
            for (let i = 0; i < 50 && turn !== undefined && turn.slotId === undefined && active === turn; i++) {
              yield* Effect.sleep(Duration.millis(100))
            }
            if (turn?.turnId !== payload.turn_id || turn.slotId === undefined) return false
            return yield* timeoutDetached(slots(turn.slotId).Attach(payload), Duration.seconds(2)).pipe(Effect.catchAllCause(() => Effect.succeed(false)))
          }),
        Cancel: () => cancelRunning,
        Delete: ({ payload }) =>
          Effect.gen(function*() {
            const cutoffMs = payload.if_idle_before_ms
            if (cutoffMs !== undefined) {
              // Claimed before the check: a turn sent meanwhile meets a deleted conversation.
              if (active !== undefined || deleted) return false
              deleted = true
              const [row, tail] = yield* Effect.all([store.getConversation(id), store.listTurns(id, { limit: 1 })], { concurrency: 2 }).pipe(
                Effect.tapError(() => Effect.sync(() => (deleted = false)))
              )
              const lastMs = tail.at(-1)?.created_at_ms ?? Option.getOrUndefined(row)?.created_at_ms
              if (Option.isNone(row) || lastMs === undefined || lastMs >= cutoffMs) {
                deleted = false
                return false
              }
            }
            // From now on no turn starts; the running one is stopped and stored first, so that
            // nothing writes after the delete.
            deleted = true
            yield* cancelRunning
            const left = active
            if (left !== undefined) yield* Deferred.await(left.ended).pipe(Effect.timeout(DELETE_SETTLE_TIMEOUT), Effect.ignore)
            yield* store.deleteConversation(id)
            loaded = undefined
            lastStoredTurn = undefined
            hot.delete(id)
            yield* shared.delete(id)
            return true
          })
      })
    }),
    // Cancel and FinishTurn must reach the entity while SendTurn waits; a second SendTurn
    // gets TurnInProgress. An idle instance without a turn is dropped 1 s after its last
    // message (its history stays in `hot`); one with a turn is kept alive until it ends.
    { concurrency: "unbounded", maxIdleTime: Duration.seconds(1) }
  )
}))

interface SendTurnInput {
  readonly content: string
  readonly max_tokens?: number | undefined
  readonly temperature?: number | undefined
  readonly top_p?: number | undefined
  readonly stop?: ReadonlyArray<string> | undefined
  readonly seed?: number | undefined
  readonly tier?: string | undefined
  readonly stream_id: TurnStreamId
  readonly idempotency_key?: string | undefined
}

/** How long a finished turn's report may wait for its Conversation's shard to be reassigned. */
const FINISH_SHARD_MOVE_RETRIES = 3 * SHARD_MOVE_RETRIES

/**
 * The DecodeSlots' TurnFinisher: each finished turn goes to its Conversation entity; a
 * summary's generation is not a turn (its workflow reads the text from its stream). A report
 * cut by a shard move is sent again to the shard's next owner (FinishTurn takes a reply it
 * already stored): the client's `done` waits for it.
 */
export const layerTurnFinisher = Layer.effect(
  TurnFinisher,
  Effect.map(Conversation.client, (client) => ({
    finish: (turn: FinishedTurn) =>
      turn.purpose !== undefined ? Effect.succeed(true) : retryShardMoves(
        () => client(turn.conversation_id).FinishTurn(turn).pipe(Effect.catchTags(clusterErrors)),
        () => new StorageError({ message: `the conversation of ${turn.turn_id} stayed between runners` }),
        FINISH_SHARD_MOVE_RETRIES
      )
  }))
)
