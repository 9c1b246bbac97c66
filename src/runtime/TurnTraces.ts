/**
 * One trace span per turn, `chat {model}`, named and attributed after the OpenTelemetry GenAI
 * semantic conventions (https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/),
 * exported over OTLP/HTTP (JSON) when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, with
 * `@effect/opentelemetry`'s OtlpTracer. `OTEL_SERVICE_NAME` names the service (default
 * `chat-serve`).
 *
 * The span runs from the turn's request to its last event:
 * - at its start it carries the operation, model, conversation, sampling parameters, tier and
 *   user;
 * - at its end, the turn id, finish reason, token usage and time to first token.
 *
 * Only these spans are made. The runtime's other spans (per request, RPC and SQL statement)
 * stay off: they would cost CPU on every token path.
 */
import * as OtlpSerialization from "@effect/opentelemetry/OtlpSerialization"
import * as OtlpTracer from "@effect/opentelemetry/OtlpTracer"
import { FetchHttpClient } from "@effect/platform"
import { Config, Context, Duration, Effect, Exit, Layer, Option } from "effect"
import type { TurnStream } from "./TurnStream.js"

/** What a turn's span says about its request. */
export interface TurnTraceInfo {
  readonly conversationId: string
  readonly model: string
  readonly tier: string
  readonly userId: string
  readonly maxTokens: number | undefined
  readonly temperature: number | undefined
  readonly topP: number | undefined
  readonly seed: number | undefined
}

export class TurnTraces extends Context.Tag("chat/TurnTraces")<TurnTraces, {
  /** Starts the turn's span at `startMs` (`performance.now()`); it ends with the stream. */
  readonly observeTurn: (info: TurnTraceInfo, stream: TurnStream, startMs: number) => void
}>() {}

const nanosAt = (ms: number): bigint => BigInt(Math.round((performance.timeOrigin + ms) * 1e6))

const defined = (attributes: Record<string, unknown>): Record<string, unknown> =>
  Object.fromEntries(Object.entries(attributes).filter(([, v]) => v !== undefined))

/** No tracing. */
export const layerNone: Layer.Layer<TurnTraces> = Layer.succeed(TurnTraces, { observeTurn: () => {} })

/** Exports to `url` (the collector's `/v1/traces`). */
export const layer = (options: { readonly url: string; readonly serviceName: string; readonly exportInterval?: Duration.DurationInput }) =>
  Layer.scoped(
    TurnTraces,
    Effect.gen(function*() {
      const tracer = yield* OtlpTracer.make({
        url: options.url,
        resource: { serviceName: options.serviceName },
        exportInterval: options.exportInterval ?? Duration.seconds(5)
      })
      return {
        observeTurn: (info, stream, startMs) => {
          const span = tracer.span(`chat ${info.model}`, Option.none(), Context.empty(), [], nanosAt(startMs), "server")
          for (
            const [key, value] of Object.entries(defined({
              "gen_ai.operation.name": "chat",
              "gen_ai.provider.name": "chat-serve",
              "gen_ai.request.model": info.model,
              "gen_ai.conversation.id": info.conversationId,
              "gen_ai.request.max_tokens": info.maxTokens,
              "gen_ai.request.temperature": info.temperature,
              "gen_ai.request.top_p": info.topP,
              "gen_ai.request.seed": info.seed,
              "chat.tier": info.tier,
              "enduser.id": info.userId
            }))
          ) span.attribute(key, value)
          let firstTokenMs: number | undefined
          stream.observe({
            onToken: () => {
              if (firstTokenMs === undefined) {
                firstTokenMs = performance.now()
                span.attribute("chat.time_to_first_token_ms", Math.round(firstTokenMs - startMs))
              }
            },
            onDone: (e) => {
              span.attribute("gen_ai.response.id", e.turn_id)
              span.attribute("gen_ai.response.model", info.model)
              span.attribute("gen_ai.response.finish_reasons", [e.finish_reason])
              span.attribute("gen_ai.usage.input_tokens", e.usage.prompt_tokens)
              span.attribute("gen_ai.usage.output_tokens", e.usage.completion_tokens)
              span.attribute("gen_ai.usage.cache_read.input_tokens", e.usage.prompt_tokens_details.cached_tokens)
              span.end(nanosAt(performance.now()), Exit.void)
            },
            onFail: (code) => {
              span.attribute("error.type", code)
              span.end(nanosAt(performance.now()), Exit.fail(code))
            }
          })
        }
      }
    })
  ).pipe(Layer.provide(OtlpSerialization.layerJson), Layer.provide(FetchHttpClient.layer))

/** From `OTEL_EXPORTER_OTLP_ENDPOINT` (e.g. `http://collector:4318`) and `OTEL_SERVICE_NAME`; unset: none. */
export const layerConfig: Layer.Layer<TurnTraces> = Layer.unwrapEffect(
  Effect.gen(function*() {
    const endpoint = yield* Config.option(Config.string("OTEL_EXPORTER_OTLP_ENDPOINT")).pipe(Effect.orElseSucceed(() => Option.none()))
    if (Option.isNone(endpoint)) return layerNone
    const serviceName = yield* Config.string("OTEL_SERVICE_NAME").pipe(Config.withDefault("chat-serve"), Effect.orElseSucceed(() => "chat-serve"))
    const exportIntervalMs = yield* Config.integer("OTEL_BSP_SCHEDULE_DELAY").pipe(Config.withDefault(5000), Effect.orElseSucceed(() => 5000))
    yield* Effect.logInfo(`exporting a trace span per turn to ${endpoint.value}`)
    return layer({
      url: `${endpoint.value.replace(/\/+$/, "")}/v1/traces`,
      serviceName,
      exportInterval: Duration.millis(exportIntervalMs)
    })
  })
)
