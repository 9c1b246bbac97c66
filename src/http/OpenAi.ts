/**
 * The OpenAI-compatible chat API (https://platform.openai.com/docs/api-reference/chat):
 * `POST /v1/chat/completions`, streaming (`chat.completion.chunk` events, then `data: [DONE]`)
 * or not (`chat.completion`), and `GET /v1/models`. Each completion is a new conversation of
 * the caller holding the request's messages (stored like any other; `x-conversation-id` names
 * it), so auth, limits, pools and the prefix cache are the native API's.
 */
import { HttpServerResponse } from "@effect/platform"
import { Duration, Effect, ParseResult, Schema, Stream } from "effect"
import { type DoneEvent, type FinishReason, StorableText, type TurnEvent, UserTurnInput } from "../runtime/Domain.js"
import type { EngineError, GenerationFailed } from "../runtime/Errors.js"
import type { TurnStream } from "../runtime/TurnStream.js"
import * as ApiError from "./ApiError.js"

const TextPart = Schema.Struct({ type: Schema.Literal("text"), text: StorableText })
const Content = Schema.Union(StorableText.pipe(Schema.maxLength(65_536)), Schema.Array(TextPart).pipe(Schema.maxItems(64)))

const Message = Schema.Struct({
  role: Schema.Literal("system", "developer", "user", "assistant"),
  content: Content,
  name: Schema.optional(Schema.String.pipe(Schema.maxLength(64)))
})

const optionalNullable = <S extends Schema.Schema.Any>(schema: S) => Schema.optional(Schema.NullOr(schema))

/**
 * A field this server cannot honour, whose silent absence would mislead a client (tools it
 * offered that are never called, JSON it asked for, log-probabilities it will read): only its
 * "off" values pass; another is a 400 naming the field.
 */
const onlyOff = <A, I>(schema: Schema.Schema<A, I>, field: string, what: string) =>
  optionalNullable(schema.annotations({ message: () => `${field}: ${what}` }))

/**
 * The request body of `POST /v1/chat/completions`. Fields this server does not use are
 * ignored (sampling penalties, `logit_bias`, `metadata`…), except those of `onlyOff`.
 */
export class ChatCompletionRequest extends Schema.Class<ChatCompletionRequest>("ChatCompletionRequest")({
  model: Schema.String.pipe(Schema.minLength(1), Schema.maxLength(128)),
  messages: Schema.Array(Message).pipe(Schema.minItems(1), Schema.maxItems(2048)),
  max_tokens: optionalNullable(Schema.Int.pipe(Schema.between(1, 4096))),
  max_completion_tokens: optionalNullable(Schema.Int.pipe(Schema.between(1, 4096))),
  temperature: optionalNullable(Schema.Number.pipe(Schema.between(0, 2))),
  top_p: optionalNullable(Schema.Number.pipe(Schema.greaterThan(0), Schema.lessThanOrEqualTo(1))),
  stop: optionalNullable(Schema.Union(Schema.String, Schema.Array(Schema.String).pipe(Schema.maxItems(4)))),
  seed: optionalNullable(Schema.Int),
  n: optionalNullable(Schema.Literal(1).annotations({ message: () => "n must be 1: one choice per request" })),
  stream: optionalNullable(Schema.Boolean),
  stream_options: optionalNullable(Schema.Struct({ include_usage: Schema.optional(Schema.Boolean) })),
  user: Schema.optional(Schema.String.pipe(Schema.maxLength(256))),
  tools: onlyOff(Schema.Tuple(), "tools", "this server does not call tools; send none"),
  tool_choice: onlyOff(Schema.Literal("none"), "tool_choice", "this server does not call tools; only \"none\""),
  response_format: onlyOff(Schema.Struct({ type: Schema.Literal("text") }), "response_format", "only {\"type\":\"text\"}: this server does not constrain replies to JSON"),
  logprobs: onlyOff(Schema.Literal(false), "logprobs", "this server does not return log-probabilities")
}) {}

/** `GET /v1/models/{model}`: a model (pool) the caller's tier may name. */
export class Model extends Schema.Class<Model>("Model")({
  id: Schema.String,
  object: Schema.Literal("model"),
  created: Schema.Int,
  owned_by: Schema.String
}) {}

export const model = (id: string): Model => new Model({ id, object: "model", created: 0, owned_by: "chat-serve" })

/** `GET /v1/models`: the models the caller's tier may name. */
export class ModelList extends Schema.Class<ModelList>("ModelList")({
  object: Schema.Literal("list"),
  data: Schema.Array(Model)
}) {}

const contentText = (content: typeof Content.Type): string =>
  typeof content === "string" ? content : content.map((part) => part.text).join("")

/**
 * The request as a conversation: system and developer messages form the system prompt, the
 * others its history, and the last (the user's) its turn. Fails with InvalidRequest when the
 * last message is not the user's or a field does not fit the native limits.
 */
export const toConversation = (request: ChatCompletionRequest) =>
  Effect.gen(function*() {
    const system = request.messages.filter((m) => m.role === "system" || m.role === "developer").map((m) => contentText(m.content))
    const rest = request.messages.filter((m) => m.role === "user" || m.role === "assistant")
    const last = rest.at(-1)
    if (last === undefined || last.role !== "user" || request.messages.at(-1)!.role !== "user") {
      return yield* new ApiError.InvalidRequest({ message: "messages: the last message must be the user's" })
    }
    const systemPrompt = system.length === 0 ? null : system.join("\n\n")
    if (systemPrompt !== null && systemPrompt.length > 32_768) {
      return yield* new ApiError.InvalidRequest({ message: "messages: system messages hold more than 32,768 characters" })
    }
    const maxTokens = request.max_completion_tokens ?? request.max_tokens ?? undefined
    const stop = request.stop === undefined || request.stop === null ? undefined : typeof request.stop === "string" ? [request.stop] : request.stop
    const turn = yield* Schema.decodeUnknown(UserTurnInput)({
      role: "user",
      content: contentText(last.content),
      ...(maxTokens === undefined ? {} : { max_tokens: maxTokens }),
      ...(request.temperature == null ? {} : { temperature: request.temperature }),
      ...(request.top_p == null ? {} : { top_p: request.top_p }),
      ...(stop === undefined ? {} : { stop }),
      // OpenAI's seed is any integer; the engine's is 31 bits.
      ...(request.seed == null ? {} : { seed: Math.abs(request.seed) % 2 ** 31 })
    }).pipe(Effect.mapError((e) => new ApiError.InvalidRequest({ message: ApiError.formatIssues(ParseResult.ArrayFormatter.formatErrorSync(e), e.message) })))
    return {
      model: request.model,
      system_prompt: systemPrompt,
      history: rest.slice(0, -1).map((m) => ({ role: m.role as "user" | "assistant", content: contentText(m.content) })),
      turn
    }
  })

/** OpenAI's finish_reason (a loop stopped, a cancel or a failure reads `stop`; failures also come as errors). */
const finishReason = (reason: FinishReason): "stop" | "length" | "content_filter" =>
  reason === "length" ? "length" : reason === "content_filter" ? "content_filter" : "stop"

/** OpenAI's `usage` of a reply's token counts (`cachedTokens` where known). */
export const completionUsage = (numPromptTokens: number, numCompletionTokens: number, cachedTokens?: number): CompletionUsage => ({
  prompt_tokens: numPromptTokens,
  completion_tokens: numCompletionTokens,
  total_tokens: numPromptTokens + numCompletionTokens,
  ...(cachedTokens === undefined ? {} : { prompt_tokens_details: { cached_tokens: cachedTokens } })
})

const usageOf = (done: DoneEvent): CompletionUsage =>
  completionUsage(done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.prompt_tokens_details.cached_tokens)

const failureJson = (e: GenerationFailed | EngineError) =>
  ApiError.errorJson(500, e._tag === "GenerationFailed" ? "generation_failed" : "engine_error", e.message)

/** OpenAI's `usage` of a completion. */
export interface CompletionUsage {
  readonly prompt_tokens: number
  readonly completion_tokens: number
  readonly total_tokens: number
  readonly prompt_tokens_details?: { readonly cached_tokens: number }
}

interface Completion {
  readonly conversationId: string
  readonly model: string
  readonly stream: TurnStream
  /**
   * The usage stored with the reply: a reply stopped by output moderation ends its stream
   * without a done event (it is stored before that end). Undefined where it cannot be read.
   */
  readonly storedUsage: Effect.Effect<CompletionUsage | undefined>
}

const completionId = (conversationId: string) => `chatcmpl-${conversationId}`

/** The streaming response: a role chunk, a chunk per token, the finish chunk, usage if asked, `[DONE]`. */
export const streamResponse = (
  completion: Completion,
  options: { readonly includeUsage: boolean; readonly keepAliveInterval: Duration.DurationInput }
): HttpServerResponse.HttpServerResponse => {
  const base = { id: completionId(completion.conversationId), object: "chat.completion.chunk", created: Math.floor(Date.now() / 1000), model: completion.model }
  const chunk = (delta: Record<string, string>, finish: string | null, extra: Record<string, unknown> = {}) =>
    `data: ${JSON.stringify({ ...base, choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }], ...extra })}\n\n`
  const usageChunk = (usage: CompletionUsage) => `data: ${JSON.stringify({ ...base, choices: [], usage })}\n\n`
  const events = completion.stream.toStream().pipe(
    Stream.mapConcat((e: TurnEvent): Array<string> => {
      if (e._tag === "Token") return e.text === "" ? [] : [chunk({ content: e.text }, null)]
      const out = [chunk({}, finishReason(e.finish_reason))]
      if (options.includeUsage) out.push(usageChunk(usageOf(e)))
      out.push("data: [DONE]\n\n")
      return out
    }),
    // Output moderation ends the stream as OpenAI does: finish_reason content_filter (and the
    // usage, if asked, as stored with the reply).
    Stream.catchAll((e) =>
      e._tag === "EngineError" && e.code === "content_filter"
        ? Stream.fromEffect(options.includeUsage ? completion.storedUsage : Effect.succeed(undefined)).pipe(
          Stream.mapConcat((usage) => [chunk({}, "content_filter"), ...(usage === undefined ? [] : [usageChunk(usage)]), "data: [DONE]\n\n"])
        )
        : Stream.make(`data: ${JSON.stringify(failureJson(e))}\n\n`)
    )
  )
  const keepAlive = Stream.tick(options.keepAliveInterval).pipe(Stream.drop(1), Stream.as(": keep-alive\n\n"))
  const body = Stream.concat(Stream.make(chunk({ role: "assistant", content: "" }, null)), Stream.merge(events, keepAlive, { haltStrategy: "left" }))
  return HttpServerResponse.stream(Stream.encodeText(body), {
    status: 200,
    contentType: "text/event-stream; charset=utf-8",
    headers: { "cache-control": "no-cache", "x-accel-buffering": "no", "x-conversation-id": completion.conversationId }
  })
}

/** The whole completion as one `chat.completion` object (the turn's text, once it is done). */
export const jsonResponse = (completion: Completion) =>
  Effect.gen(function*() {
    let text = ""
    let done: DoneEvent | undefined
    const filtered = yield* completion.stream.toStream().pipe(
      Stream.runForEach((e) => Effect.sync(() => e._tag === "Token" ? (text += e.text) : (done = e))),
      Effect.as(false),
      Effect.catchIf((e) => e._tag === "EngineError" && e.code === "content_filter", () => Effect.succeed(true))
    )
    const end = done
    const usage = end !== undefined ? usageOf(end) : filtered ? yield* completion.storedUsage : undefined
    return HttpServerResponse.unsafeJson({
      id: completionId(completion.conversationId),
      object: "chat.completion",
      created: Math.floor(Date.now() / 1000),
      model: completion.model,
      choices: [{
        index: 0,
        message: { role: "assistant", content: text, refusal: null },
        logprobs: null,
        finish_reason: filtered || end === undefined ? "content_filter" : finishReason(end.finish_reason)
      }],
      ...(usage === undefined ? {} : { usage })
    }, { headers: { "x-conversation-id": completion.conversationId } })
  }).pipe(
    Effect.catchTags({
      GenerationFailed: (e) => Effect.fail(new ApiError.InternalError({ message: `Generation failed: ${e.message}` })),
      EngineError: (e) => Effect.fail(new ApiError.EngineUnavailable({ message: `Engine error (${e.code}): ${e.message}` }))
    })
  )
