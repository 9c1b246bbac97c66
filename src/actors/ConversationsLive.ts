/**
 * The `Conversations` facade (what the HTTP layer calls) implemented with the cluster:
 * every call goes to the Conversation entity of its id; history pages read the store.
 */
import { randomUUID } from "node:crypto"
import { Duration, Effect, Exit, Layer, Option, Scope, Sink, Stream } from "effect"
import { Conversations } from "../runtime/Conversations.js"
import { ConversationId, HistoryPage, type TurnEvent } from "../runtime/Domain.js"
import { ConversationNotFound, EngineError, GenerationFailed, ModelNotFound } from "../runtime/Errors.js"
import { ConversationStore } from "../runtime/Storage.js"
import { poolFor, TopologyService } from "../runtime/Topology.js"
import { Conversation, type ConversationEvent } from "./Conversation.js"

const unavailable = (e: { readonly _tag: string }) =>
  new EngineError({ code: "unavailable", message: `cluster could not deliver the message (${e._tag})` })

/** If the HTTP layer never runs the returned stream, the generation is stopped after this. */
const UNCONSUMED_STREAM_TIMEOUT = Duration.seconds(15)

export const layer = Layer.effect(
  Conversations,
  Effect.gen(function*() {
    const client = yield* Conversation.client
    const store = yield* ConversationStore
    const topology = yield* TopologyService

    return Conversations.of({
      create: (input) =>
        Effect.gen(function*() {
          const pool = poolFor(topology, input.model)
          if (pool === undefined) return yield* new ModelNotFound({ model: input.model ?? "" })
          const id = ConversationId.make(`conv_${randomUUID().replaceAll("-", "")}`)
          yield* client(id).Create({ pool: pool.name, system_prompt: input.system_prompt ?? null }).pipe(
            Effect.catchTags({ MailboxFull: (e) => Effect.die(e), AlreadyProcessingMessage: (e) => Effect.die(e), PersistenceError: (e) => Effect.die(e) })
          )
          return id
        }),

      sendTurn: (id, input) =>
        Effect.gen(function*() {
          // The entity's stream is peeled up to its first event (Accepted: the user turn is
          // durable), so that 404/409/400 surface before any SSE byte; the rest stays open in
          // `scope` until the caller finishes or abandons the returned stream.
          const scope = yield* Scope.make()
          const events = client(id).SendTurn({
            content: input.content,
            ...(input.max_tokens === undefined ? {} : { max_tokens: input.max_tokens }),
            ...(input.temperature === undefined ? {} : { temperature: input.temperature })
          }).pipe(
            Stream.catchTags({
              MailboxFull: (e) => Stream.fail(unavailable(e)),
              AlreadyProcessingMessage: (e) => Stream.fail(unavailable(e)),
              PersistenceError: (e) => Stream.fail(unavailable(e))
            })
          )
          const [first, rest] = yield* Stream.peel(events, Sink.head<ConversationEvent>()).pipe(
            Scope.extend(scope),
            Effect.onExit((exit) => (Exit.isSuccess(exit) ? Effect.void : Scope.close(scope, exit))),
            Effect.catchTag("GenerationFailed", (e) => Effect.fail(new EngineError({ code: "generation_failed", message: e.message })))
          )
          if (Option.isNone(first) || first.value._tag !== "Accepted") {
            yield* Scope.close(scope, Exit.void)
            return yield* new EngineError({ code: "protocol", message: "conversation stream did not start with Accepted" })
          }
          let started = false
          yield* Effect.sleep(UNCONSUMED_STREAM_TIMEOUT).pipe(
            Effect.zipRight(Effect.suspend(() => (started ? Effect.void : Scope.close(scope, Exit.void)))),
            Effect.forkDaemon
          )
          return Stream.suspend(() => {
            started = true
            return rest
          }).pipe(
            Stream.filter((e): e is TurnEvent => e._tag !== "Accepted"),
            // After Accepted only generation errors can occur; anything else is a protocol slip.
            Stream.mapError((e) =>
              e._tag === "EngineError" || e._tag === "GenerationFailed" ? e : new GenerationFailed({ message: e._tag })
            ),
            Stream.ensuring(Scope.close(scope, Exit.void))
          )
        }),

      cancel: (id) =>
        client(id).Cancel().pipe(
          Effect.asVoid,
          Effect.catchTags({ MailboxFull: (e) => Effect.die(e), AlreadyProcessingMessage: (e) => Effect.die(e), PersistenceError: (e) => Effect.die(e) })
        ),

      history: (id, { before, limit }) =>
        Effect.gen(function*() {
          const row = yield* store.getConversation(id)
          if (Option.isNone(row)) return yield* new ConversationNotFound({ conversation_id: id })
          const turns = yield* store.listTurns(id, { before, limit: limit + 1 })
          const more = turns.length > limit
          const page = more ? turns.slice(1) : turns
          return new HistoryPage({ turns: page, next_cursor: more ? String(page[0]!.seq) : null })
        })
    })
  })
)
