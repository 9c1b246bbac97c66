/**
 * The `Conversations` facade (what the HTTP layer calls) implemented with the cluster:
 * every call goes to the Conversation entity of its id; history pages read the store. A turn
 * gets a TurnStream in this runner's registry first; the entity's DecodeSlot writes into it.
 */
import { randomUUID } from "node:crypto"
import { Config, Duration, Effect, Exit, Fiber, Layer, Option, Stream } from "effect"
import { Conversations } from "../runtime/Conversations.js"
import { ConversationId, ConversationList, formatConversationCursor, HistoryPage, noValidation, type Identity, Share, SharedConversation, ShareId, TurnId, type UserId, UserId as UserIdSchema, UserMemory, usageJson } from "../runtime/Domain.js"
import { ContentFiltered, ConversationNotFound, EngineError, ModelNotFound, ShareNotFound, ShuttingDown, StorageError, StreamNotFound, type TurnEventsUnavailable, UserNotFound } from "../runtime/Errors.js"
import { type LoggedEvent, TurnEventLog } from "../runtime/TurnEventLog.js"
import { GpuWorkers } from "../runtime/GpuWorkers.js"
import { Metrics } from "../runtime/Metrics.js"
import { Models } from "../runtime/Models.js"
import { Moderation } from "../runtime/Moderation.js"
import { TurnTraces } from "../runtime/TurnTraces.js"
import { ConversationStore } from "../runtime/Storage.js"
import { poolFor, retentionDaysFor, TopologyService, zeroRetention } from "../runtime/Topology.js"
import { TurnStreams } from "../runtime/TurnStream.js"
import { Embedder } from "./Embedder.js"
import { clusterErrors, Conversation } from "./Conversation.js"
import { timeoutDetached } from "./internal/callTimeout.js"
import { detachedIn } from "./internal/detachedCall.js"
import { buildPrompt, emptyPromptCache, MIN_NEW_TOKENS } from "./internal/promptAssembly.js"
import { retryShardMoves as retryShardMovesOf } from "./internal/shardMoves.js"
import * as silentStreams from "./internal/silentStreams.js"


/** Create, Cancel and InFlight have no 503 of their own: a cluster that cannot deliver them is a defect. */
type DeliveryFailure = { readonly _tag: "MailboxFull" | "AlreadyProcessingMessage" | "PersistenceError" }
const dieOnDeliveryFailure = <A, E extends { readonly _tag: string }, R>(
  effect: Effect.Effect<A, E, R>
): Effect.Effect<A, Exclude<E, Extract<E, DeliveryFailure>>, R> =>
  Effect.catchIf(
    effect,
    (e): e is Extract<E, DeliveryFailure> =>
      e._tag === "MailboxFull" || e._tag === "AlreadyProcessingMessage" || e._tag === "PersistenceError",
    Effect.die
  )

/**
 * How long a request waits for its Conversation entity (`CONVERSATION_CALL_TIMEOUT`, default
 * 30 s). A call to a shard that no runner holds is resent by the cluster until one does:
 * through a database outage (the shard locks are in PostgreSQL, and every runner gives its
 * shards up ~1.5 s in) requests waited for the whole outage. Well above a loaded SendTurn's
 * time (admission, then the user turn's INSERT).
 */
const callTimeoutConfig = Config.duration("CONVERSATION_CALL_TIMEOUT").pipe(Config.withDefault(Duration.seconds(30)))

/** Past the shard-move retries a call is a 503: the conversation is still between runners. */
const retryShardMoves = <A, E, R>(call: (attempt: number) => Effect.Effect<A, E, R>): Effect.Effect<A, E | EngineError, R> =>
  retryShardMovesOf(call, () => new EngineError({ code: "unavailable", message: "the conversation is moving between runners; try again" }))


/** Conversation owners a gateway keeps (an owner never changes: this is a cache of the store). */
const OWNER_CACHE_MAX = 100_000

/** A conversation's owner and model pool (neither ever changes). */
interface OwnerEntry {
  readonly userId: UserId
  readonly pool: string
}

/** Least recently used first out, past `max` entries. */
class OwnerCache {
  private readonly owners = new Map<ConversationId, OwnerEntry>()
  constructor(private readonly max: number) {}
  get(id: ConversationId): OwnerEntry | undefined {
    const owner = this.owners.get(id)
    if (owner !== undefined) {
      this.owners.delete(id)
      this.owners.set(id, owner)
    }
    return owner
  }
  delete(id: ConversationId): void {
    this.owners.delete(id)
  }
  set(id: ConversationId, owner: OwnerEntry): void {
    this.owners.set(id, owner)
    if (this.owners.size > this.max) this.owners.delete(this.owners.keys().next().value!)
  }
}

/** If the HTTP layer never takes the turn's stream, the generation is stopped after this. */
const UNCONSUMED_STREAM_TIMEOUT_MS = 15_000

/** How long a stop waits for its stopped turns to be stored before it ends their streams. */
export const STOPPED_TURNS_STORE_MS = 10_000

/** How long a readiness probe waits for the database's answer before it says unready. */
const READY_PING_TIMEOUT = Duration.seconds(2)

export const layer = Layer.scoped(
  Conversations,
  Effect.gen(function*() {
    const client = yield* Conversation.client
    const callTimeout = yield* callTimeoutConfig
    /**
     * `retryShardMoves`, and past `callTimeout` a 503 (the call interrupted, as when its client
     * goes away). Not for Delete, which may wait longer for a running turn to settle and must
     * not be cut off halfway.
     */
    const withinDeadline = <A, E, R>(call: (attempt: number) => Effect.Effect<A, E, R>): Effect.Effect<A, E | EngineError | StorageError, R> =>
      retryShardMoves(call).pipe(
        Effect.timeoutFail({
          duration: callTimeout,
          onTimeout: () => new StorageError({ message: "no runner took the conversation's call in time (its shard is not held, or its database does not answer)", transient: true })
        })
      )
    const store = yield* ConversationStore
    const topology = yield* TopologyService
    const streams = yield* TurnStreams
    const embedder = yield* Embedder
    const workers = yield* GpuWorkers
    const eventLog = yield* TurnEventLog
    const metrics = yield* Metrics
    const traces = yield* TurnTraces
    const moderation = yield* Moderation
    const models = yield* Models
    /** Input moderation of an OpenAI request's earlier messages: fails with ContentFiltered. */
    const moderate = (text: string) =>
      Effect.suspend(() => {
        const verdict = moderation.checkInput(text)
        if (!verdict.flagged) return Effect.void
        metrics.moderationVerdict("input", verdict.category ?? "flagged")
        return Effect.fail(new ContentFiltered({ category: verdict.category ?? "flagged" }))
      })
    let draining = false
    const owners = new OwnerCache(OWNER_CACHE_MAX)
    /** Succeeds when `owner` owns conversation `id`; another user's conversation is not found, as a missing one. */
    const authorize = (owner: Identity, id: ConversationId) =>
      Effect.gen(function*() {
        let entry = owners.get(id)
        if (entry === undefined) {
          const row = yield* store.getConversation(id)
          if (Option.isNone(row)) return yield* new ConversationNotFound({ conversation_id: id })
          entry = { userId: row.value.user_id, pool: row.value.model }
          owners.set(id, entry)
        }
        if (entry.userId !== owner.user_id) return yield* new ConversationNotFound({ conversation_id: id })
        return entry
      })
    /** Polls until no turn stream is open, or `ms` have passed. */
    const awaitNoStreams = (ms: number) =>
      Effect.gen(function*() {
        const deadline = Date.now() + ms
        while (streams.size() > 0 && Date.now() < deadline) yield* Effect.sleep(Duration.millis(25))
      })
    // Entity calls run in fibers of this layer's runtime, not the caller's (detachedCall.ts):
    // an entity made by a call keeps the caller's fiber refs for its lifetime, and an HTTP
    // request's hold the request, its socket and response.
    const detached = detachedIn(yield* Effect.runtime<never>())

    /**
     * A running turn's events after `afterIndex`, from its DecodeSlot instead of the turn log:
     * the slot moves its output to a stream of this runner, first the events it wrote after
     * that index. Fails with `unavailable` when the slot cannot (the turn is not running, or
     * its reader wants events from before a failover).
     */
    const fromSlot = (id: ConversationId, turnId: TurnId, afterIndex: number, unavailable: TurnEventsUnavailable) =>
      Effect.gen(function*() {
        const stream = streams.make(topology.generation.client_buffer_tokens, afterIndex + 1)
        stream.setTurnId(turnId)
        const attached = yield* retryShardMoves(() =>
          client(id).Attach({ turn_id: turnId, stream_id: stream.id, after_index: afterIndex }).pipe(detached)
        ).pipe(Effect.orElseSucceed(() => false))
        if (!attached) {
          // Not known to be attached, which is not known not to be: the Conversation gives up
          // on the slot's answer after 2 s, and the slot may have moved the turn's output here
          // meanwhile. Cancelling would cancel the turn then; detached, it runs on for the
          // detach grace, for the client's next resume (told 503 with Retry-After) to take.
          stream.detach()
          return yield* unavailable
        }
        /** The next token event's index (the terminal event's is the number of token events). */
        let next = afterIndex + 1
        const events: Stream.Stream<LoggedEvent, TurnEventsUnavailable> = stream.toStream().pipe(
          Stream.map((e): LoggedEvent => {
            if (e._tag === "Token") return { index: (next = e.index + 1) - 1, kind: "token", text: e.text, ids: [] }
            const { usage } = e
            return {
              index: next,
              kind: "done",
              done: { turn_id: e.turn_id, finish_reason: e.finish_reason, usage: usageJson(usage) }
            }
          }),
          Stream.catchAll((e) => {
            const failed: LoggedEvent = { index: next, kind: "error", code: e._tag === "GenerationFailed" ? "generation_failed" : e.code, message: e.message }
            return Stream.succeed(failed)
          })
        )
        return { _tag: "Events", events } as const
      })

    /**
     * A new conversation. `checked`: its system prompt was moderated and its turn's prompt is
     * built at once (a chat completion's): else a system prompt is refused as a message would
     * be, and so is one that leaves no room for a turn in the model's context (every turn of
     * its conversation would be refused).
     */
    const create = (
      owner: Identity,
      input: {
        readonly model?: string | undefined
        readonly system_prompt?: string | null | undefined
        readonly history?: ReadonlyArray<{ readonly role: "user" | "assistant"; readonly content: string }>
      },
      checked = false
    ) =>
      Effect.gen(function*() {
        const pool = poolFor(topology, input.model, owner.tier)
        if (pool === undefined) return yield* new ModelNotFound({ model: input.model ?? "" })
        const systemPrompt = input.system_prompt ?? null
        const model = models.get(pool.name)
        if (!checked && systemPrompt !== null && model !== undefined) {
          yield* moderate(systemPrompt)
          yield* buildPrompt(model, { systemPrompt, history: [], cache: emptyPromptCache() }, "", MIN_NEW_TOKENS)
        }
        const id = ConversationId.make(`conv_${randomUUID().replaceAll("-", "")}`)
        // Create is idempotent (the id is ours): a call stopped by a shard move is sent again.
        yield* withinDeadline(() =>
          client(id).Create({
            pool: pool.name,
            system_prompt: systemPrompt,
            user_id: owner.user_id,
            org_id: owner.org_id,
            retention_days: retentionDaysFor(topology, owner.tier, owner.org_id),
            ...(input.history === undefined || input.history.length === 0 ? {} : { history: input.history })
          }).pipe(detached)
        ).pipe(dieOnDeliveryFailure)
        owners.set(id, { userId: owner.user_id, pool: pool.name })
        return { id, model: pool.name, region: regionOf(pool.pool) }
      })

    /** Whose memory `user` names for `owner`: their own (`me` or their id), anyone's for an admin key. */
    const memoryOwner = (owner: Identity, user: string): Effect.Effect<UserId, UserNotFound> =>
      user === "me" || user === owner.user_id
        ? Effect.succeed(owner.user_id)
        : owner.admin === true
        ? Effect.succeed(UserIdSchema.make(user))
        : Effect.fail(new UserNotFound({ user_id: user }))
    const modelNames = Object.keys(topology.pools)
    /** Where a pool serves: the region of the runner of its first GPU. */
    const regionOf = (pool: { readonly gpus: ReadonlyArray<{ readonly id: string }> }) =>
      topology.runners.find((r) => r.gpus?.some((g) => g === pool.gpus[0]?.id))?.region ?? topology.runners[0]!.region
    const service: Conversations["Type"] = {
      create,
      models: (owner) => modelNames.filter((name) => poolFor(topology, name, owner.tier) !== undefined),

      complete: (owner, request) =>
        Effect.gen(function*() {
          // The whole request is the client's: its earlier messages are checked before anything
          // is stored (the last one is its turn's, checked as any turn is).
          if (request.system_prompt !== null) yield* moderate(request.system_prompt)
          for (const m of request.history) if (m.role === "user") yield* moderate(m.content)
          // The last one too, before the conversation is stored (its turn checks it again).
          yield* moderate(request.turn.content)
          const made = Effect.gen(function*() {
            const { id: conversationId } = yield* create(owner, { model: request.model, system_prompt: request.system_prompt, history: request.history }, true)
            // Made for this request alone: a turn refused (too long for the pool, overloaded, …)
            // leaves no conversation behind, nor its copied history. Removed in the background:
            // the refusal is not held up by it.
            const stream = yield* service.sendTurn(owner, conversationId, request.turn).pipe(
              Effect.tapError(() => Effect.forkDaemon(Effect.ignoreLogged(service.remove(owner, conversationId))))
            )
            return { conversationId, stream }
          })
          // Whenever its client goes away, the conversation is made whole (its turn taken, its
          // unread stream then cancelled as any) or not at all: never its history alone.
          return yield* Fiber.join(yield* Effect.forkDaemon(made))
        }),

      sendTurn: (owner, id, input, options) =>
        Effect.gen(function*() {
          const startMs = performance.now()
          if (draining) return yield* new ShuttingDown()
          const { pool } = yield* authorize(owner, id)
          const stream = streams.make(topology.generation.client_buffer_tokens)
          // A SendTurn stopped by a shard move is sent again with the same stream and key: if
          // the first attempt had got the turn going (its generation writes into this stream),
          // the retry finds it by the key (DuplicateTurn) and this request streams it. Without
          // a client key the request gets one of its own for that.
          const key = options?.idempotencyKey ?? `auto:${randomUUID()}`
          const call = withinDeadline((attempt) =>
            client(id).SendTurn({
              content: input.content,
              ...(input.max_tokens === undefined ? {} : { max_tokens: input.max_tokens }),
              ...(input.temperature === undefined ? {} : { temperature: input.temperature }),
              ...(input.top_p === undefined ? {} : { top_p: input.top_p }),
              ...(input.stop === undefined ? {} : { stop: input.stop }),
              ...(input.seed === undefined ? {} : { seed: input.seed }),
              tier: owner.tier,
              stream_id: stream.id,
              idempotency_key: key
            }).pipe(
              detached,
              Effect.catchTag("DuplicateTurn", (e) =>
                attempt > 0 ? Effect.succeed({ turn_id: TurnId.make(e.turn_id) }) : Effect.fail(e))
            )
          ).pipe(
            Effect.catchTags(clusterErrors),
            // The entity moderates the message once its prompt fits: its verdict is counted here.
            Effect.tapBoth({
              onFailure: (e) => Effect.sync(() => e._tag === "ContentFiltered" && metrics.moderationVerdict("input", e.category)),
              onSuccess: () => Effect.sync(() => metrics.moderationVerdict("input", "pass"))
            })
          )
          // A client that goes away while its turn is being taken has left mid-stream: the call
          // runs on, and a turn it got going gets the detach grace (a resume, or the turn sent
          // again with its key, keeps it), as once streaming. A turn not taken has nothing
          // writing to its stream.
          const taking = yield* Effect.forkDaemon(call)
          const accepted = yield* Fiber.join(taking).pipe(
            Effect.onExit((joined) =>
              Exit.isSuccess(joined)
                ? Effect.void
                : !Exit.isInterrupted(joined)
                ? Effect.sync(() => stream.cancel())
                : Effect.forkDaemon(Effect.flatMap(Fiber.await(taking), (exit) =>
                  Effect.sync(() => {
                    if (Exit.isFailure(exit)) return stream.cancel()
                    stream.setTurnId(exit.value.turn_id)
                    stream.detach()
                  })))
            )
          )
          stream.setTurnId(accepted.turn_id)
          metrics.observeTurn({ model: pool, tier: owner.tier }, stream, startMs)
          traces.observeTurn({
            conversationId: id,
            model: pool,
            tier: owner.tier,
            userId: owner.user_id,
            maxTokens: input.max_tokens,
            temperature: input.temperature,
            topP: input.top_p,
            seed: input.seed
          }, stream, startMs)
          stream.cancelIfNotAttachedWithin(UNCONSUMED_STREAM_TIMEOUT_MS)
          return stream
        }),

      cancel: (owner, id) =>
        authorize(owner, id).pipe(
          Effect.zipRight(withinDeadline(() => client(id).Cancel().pipe(detached))),
          Effect.asVoid,
          dieOnDeliveryFailure
        ),

      drain: (graceMs) =>
        Effect.gen(function*() {
          draining = true
          yield* Effect.logInfo(`shutting down: ${streams.size()} turns in flight get up to ${graceMs} ms to finish`)
          yield* awaitNoStreams(graceMs)
          const left = streams.all()
          for (const stream of left) stream.shutdown()
          // Each stopped turn is stored (cancelled, with its text so far) before its stream ends.
          yield* awaitNoStreams(STOPPED_TURNS_STORE_MS)
          // One not stored by now (the database away) is ended all the same: its client is told,
          // not cut off, and the next start stores its reply `failed` (start-up reconciliation).
          const unstored = streams.all()
          for (const stream of unstored) stream.fail("shutting_down", "The server stopped before this turn's reply could be stored")
          yield* Effect.logInfo(`shut down: ${left.length} turns were stopped, ${unstored.length} of them not stored`)
        }),

      resume: (owner, id, after) =>
        Effect.gen(function*() {
          yield* authorize(owner, id)
          const turnId = after?.turnId ?? (yield* withinDeadline(() => client(id).InFlight().pipe(detached)).pipe(
            dieOnDeliveryFailure
          ))
          if (turnId === null) return Option.none()
          // A client back after a drop or a reload: the turn it left goes on (when its stream was here).
          streams.keepTurn(turnId)
          const afterIndex = after?.index ?? -1
          const followed = yield* eventLog.follow(turnId, afterIndex).pipe(
            // No log (Redis down): the turn's DecodeSlot replays its own buffer into a stream here.
            Effect.catchTag("TurnEventsUnavailable", (e) => fromSlot(id, turnId, afterIndex, e))
          )
          switch (followed._tag) {
            case "Missing":
              // Without a Last-Event-ID there is just nothing in flight to follow.
              return after === undefined ? Option.none() : yield* new StreamNotFound({ turn_id: turnId })
            case "Ended":
              return Option.none()
            case "Events": {
              // A log that fails midway (Redis went away): the rest comes from the turn's slot.
              let lastIndex = afterIndex
              const events = followed.events.pipe(
                Stream.tap((e) => Effect.sync(() => e.kind === "token" && (lastIndex = e.index))),
                Stream.catchAll((e) => Stream.unwrap(Effect.map(fromSlot(id, turnId, lastIndex, e), (slot) => slot.events)))
              )
              return Option.some({ turnId, events })
            }
          }
        }),

      notReady: Effect.gen(function*() {
        if (draining) return "shutting down"
        const down = workers.all.filter((w) => !w.isEngineUp()).map((w) => w.gpuId)
        if (down.length > 0) return `engine down: ${down.join(", ")}`
        // A database whose network drops packets answers nothing: unready after READY_PING_TIMEOUT
        // (without waiting for the query to stop).
        return yield* timeoutDetached(store.ping, READY_PING_TIMEOUT).pipe(
          Effect.as(undefined),
          Effect.catchAll(() => Effect.succeed("database unreachable"))
        )
      }),

      remove: (owner, id) =>
        Effect.gen(function*() {
          yield* authorize(owner, id)
          yield* retryShardMoves(() => client(id).Delete({}).pipe(detached)).pipe(dieOnDeliveryFailure)
          owners.delete(id)
        }),

      memory: (owner, user) =>
        Effect.gen(function*() {
          const target = yield* memoryOwner(owner, user)
          return new UserMemory({ user_id: target, facts: yield* store.listFacts(target) })
        }),

      updateMemory: (owner, user, update) =>
        Effect.gen(function*() {
          const target = yield* memoryOwner(owner, user)
          yield* store.updateFacts(target, update, yield* embedder.embed(update.add))
          return new UserMemory({ user_id: target, facts: yield* store.listFacts(target) })
        }),

      share: (owner, id) =>
        Effect.gen(function*() {
          yield* authorize(owner, id)
          const last = (yield* store.listTurns(id, { limit: 1 })).at(-1)
          const share = new Share({
            share_id: ShareId.make(`share_${randomUUID().replaceAll("-", "")}`),
            conversation_id: id,
            num_turns: last === undefined ? 0 : last.seq + 1,
            created_at_ms: Date.now()
          })
          // Deleted since it was authorized (a DELETE racing this share).
          if (!(yield* store.createShare(share))) return yield* new ConversationNotFound({ conversation_id: id })
          return share
        }),

      shared: (shareId) =>
        Effect.gen(function*() {
          const found = yield* store.getShare(shareId)
          if (Option.isNone(found)) return yield* new ShareNotFound({ share_id: shareId })
          const { share } = found.value
          const row = yield* store.getConversation(share.conversation_id)
          if (Option.isNone(row)) return yield* new ShareNotFound({ share_id: shareId })
          const turns = share.num_turns === 0 ? [] : yield* store.listTurns(share.conversation_id, { before: share.num_turns, limit: share.num_turns })
          return new SharedConversation({ share_id: shareId, model: row.value.model, system_prompt: row.value.system_prompt, turns })
        }),

      revokeShare: (owner, shareId) =>
        Effect.gen(function*() {
          const found = yield* store.getShare(shareId)
          // Another user's share is not found, as a missing one.
          if (Option.isNone(found) || found.value.user_id !== owner.user_id) return yield* new ShareNotFound({ share_id: shareId })
          yield* store.revokeShare(shareId)
        }),

      list: (owner, { before, limit }) =>
        Effect.map(store.listConversations(owner.user_id, { before, limit: limit + 1 }), (rows) => {
          const page = rows.slice(0, limit)
          const last = page.at(-1)
          return new ConversationList({
            data: page,
            next_cursor: rows.length > limit && last !== undefined ? formatConversationCursor(last) : null
          }, noValidation)
        }),

      history: (owner, id, { before, limit }) =>
        Effect.gen(function*() {
          const row = yield* store.getConversation(id)
          if (Option.isNone(row) || row.value.user_id !== owner.user_id) return yield* new ConversationNotFound({ conversation_id: id })
          const [turns, summary] = yield* Effect.all([store.listTurns(id, { before, limit: limit + 1 }), store.getSummary(id)], { concurrency: 2 })
          const more = turns.length > limit
          const page = more ? turns.slice(1) : turns
          return new HistoryPage({
            turns: page,
            next_cursor: more ? String(page[0]!.seq) : null,
            ...(Option.isSome(summary) ? { summary: summary.value } : {}),
            ...(zeroRetention(topology, row.value.org_id) ? { zero_retention: true } : {})
          })
        })
    }
    // A stream whose turn ended without its end being written is ended from the stored reply.
    yield* Effect.forkScoped(silentStreams.sweepForever({
      streams: streams.all,
      inFlight: (id) => client(id).InFlight().pipe(detached),
      storedTurn: (id, seq) =>
        store.listTurns(id, { before: seq + 1, limit: 1 }).pipe(Effect.map((rows) => Option.fromNullable(rows.find((t) => t.seq === seq))))
    }))
    return Conversations.of(service)
  })
)
