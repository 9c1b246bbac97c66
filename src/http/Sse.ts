/**
 * Server-Sent Events encoding of one generation.
 *
 * ```text
 * event: token
 * id: conv_…:1:0
 * data: {"text":"Hel"}
 *
 * event: done
 * id: conv_…:1:3
 * data: {"turn_id":"c:1","finish_reason":"stop","usage":{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":0}}}
 *
 * event: error
 * data: {"error":{"code":"engine_error","message":"…"}}
 *
 * : keep-alive
 * ```
 *
 * An event's id is `<turn_id>:<index>`: the turn and the position, which is what a client sends
 * back as `Last-Event-ID` to resume (`GET /v1/conversations/{id}/stream`). Payloads are JSON,
 * so a newline inside token text can never break the framing. Every stream
 * ends with exactly one `done` or `error` event; a generation that ends without its terminal
 * event is reported as an `error` (a stream cut short must never pass for a finished one). The encoding itself is in
 * src/runtime/TurnStream.ts, where tokens are written.
 */
import { HttpServerResponse } from "@effect/platform"
import { Config, Context, Duration, Effect, Layer, Option, Stream } from "effect"
import type { TurnId } from "../runtime/Domain.js"
import type { TurnEventsUnavailable } from "../runtime/Errors.js"
import type { LoggedEvent } from "../runtime/TurnEventLog.js"
import { Sse, type TurnStream } from "../runtime/TurnStream.js"

/** Settings of the SSE responses. */
export class SseSettings extends Context.Reference<SseSettings>()("chat/http/SseSettings", {
  defaultValue: (): { readonly keepAliveInterval: Duration.Duration } => ({
    keepAliveInterval: Duration.seconds(15)
  })
}) {
  static readonly layer = (options: { readonly keepAliveInterval: Duration.DurationInput }) =>
    Layer.succeed(SseSettings, { keepAliveInterval: Duration.decode(options.keepAliveInterval) })

  /** `SSE_KEEPALIVE_INTERVAL` (a duration such as `15 seconds`; default 15 s). */
  static readonly layerConfig = Layer.effect(
    SseSettings,
    Effect.map(
      Config.duration("SSE_KEEPALIVE_INTERVAL").pipe(Config.withDefault(Duration.seconds(15))),
      (keepAliveInterval) => ({ keepAliveInterval })
    )
  )
}

export const contentType = "text/event-stream; charset=utf-8"

export const headers: Readonly<Record<string, string>> = {
  "cache-control": "no-cache",
  "x-accel-buffering": "no",
  connection: "keep-alive"
}

/**
 * The SSE response of one turn: the TurnStream's bytes (events encoded there, keep-alive
 * comments while idle), piped straight into the socket. When the client goes away,
 * @effect/platform-node aborts the pipe, which destroys the stream, which cancels the turn.
 */
export const turnResponse = (
  stream: TurnStream,
  settings: { readonly keepAliveInterval: Duration.DurationInput }
): HttpServerResponse.HttpServerResponse =>
  HttpServerResponse.raw(stream.toSse({ keepAliveMs: Duration.toMillis(Duration.decode(settings.keepAliveInterval)) }), {
    status: 200,
    contentType,
    headers
  })

/** How long an EventSource waits before it reconnects (the `retry:` field, sent once). */
const RETRY_MS = 3000

/**
 * The SSE response of a resumed turn: `retry:` once, then the logged events (ids
 * `<turn_id>:<index>`), keep-alive comments while idle, ending after the terminal event. A log
 * that becomes unreadable midway ends the stream with `event: error` `stream_unavailable`.
 */
export const resumeResponse = (
  turnId: TurnId,
  events: Stream.Stream<LoggedEvent, TurnEventsUnavailable>,
  settings: { readonly keepAliveInterval: Duration.DurationInput }
): HttpServerResponse.HttpServerResponse => {
  const idPrefix = `${turnId}:`
  const encoded = events.pipe(
    Stream.filterMap((e) => {
      switch (e.kind) {
        case "start":
          return Option.none()
        case "token":
          return Option.some(Sse.token(idPrefix, e.index, e.text))
        case "done":
          return Option.some(Sse.done(e.done, idPrefix, e.index))
        case "error":
          return Option.some(Sse.error(e.code, e.message))
      }
    }),
    Stream.catchAll((e) => Stream.make(Sse.error("stream_unavailable", e.message)))
  )
  const keepAlive = Stream.tick(settings.keepAliveInterval).pipe(Stream.drop(1), Stream.as(Sse.keepAlive))
  const body = Stream.concat(Stream.make(`retry: ${RETRY_MS}\n\n`), Stream.merge(encoded, keepAlive, { haltStrategy: "left" }))
  return HttpServerResponse.stream(Stream.encodeText(body), { status: 200, contentType, headers })
}
