/**
 * Server-Sent Events encoding of one generation (DESIGN.md, data flow step 5).
 *
 * ```text
 * event: token
 * id: 0
 * data: {"text":"Hel"}
 *
 * event: done
 * id: 3
 * data: {"turn_id":"c:1","finish_reason":"stop","usage":{"prompt_tokens":12,"completion_tokens":3}}
 *
 * event: error
 * data: {"error":{"code":"engine_error","message":"…"}}
 *
 * : keep-alive
 * ```
 *
 * Payloads are JSON, so a newline inside token text can never break the framing. Every stream
 * ends with exactly one `done` or `error` event; a generation that ends without its terminal
 * event is reported as an `error` (DESIGN.md: never infer the end).
 */
import { HttpServerResponse } from "@effect/platform"
import { Cause, Clock, Config, Context, Duration, Effect, Layer, Option, Ref, Stream } from "effect"
import type { DoneEvent, TokenEvent, TurnEvent } from "../runtime/Domain.js"

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

export const keepAlive = ": keep-alive\n\n"

/** One SSE event; `data` is JSON-encoded on a single line. */
export const encodeEvent = (event: {
  readonly event: string
  readonly id?: number | string | undefined
  readonly data: unknown
}): string =>
  `event: ${event.event}\n${event.id === undefined ? "" : `id: ${event.id}\n`}data: ${JSON.stringify(event.data)}\n\n`

export const encodeToken = (event: TokenEvent): string =>
  encodeEvent({ event: "token", id: event.index, data: { text: event.text } })

/** `id` is the index after the last token event (the number of token events when gap-free). */
export const encodeDone = (event: DoneEvent, id: number): string =>
  encodeEvent({
    event: "done",
    id,
    data: {
      turn_id: event.turn_id,
      finish_reason: event.finish_reason,
      usage: { prompt_tokens: event.usage.prompt_tokens, completion_tokens: event.usage.completion_tokens }
    }
  })

export const encodeError = (code: string, message: string): string =>
  encodeEvent({ event: "error", data: { error: { code, message } } })

/** The `event: error` code and message for a failure of the inner stream. */
export const errorFromCause = (cause: Cause.Cause<unknown>): { readonly code: string; readonly message: string } => {
  const failure = Cause.failureOption(cause)
  if (Option.isSome(failure)) {
    const e = failure.value as { readonly _tag?: unknown; readonly message?: unknown; readonly code?: unknown }
    const message = typeof e.message === "string" ? e.message : "Generation failed"
    switch (e._tag) {
      case "EngineError":
        return { code: "engine_error", message: typeof e.code === "string" ? `${e.code}: ${message}` : message }
      case "GenerationFailed":
        return { code: "generation_failed", message }
    }
    return { code: "internal", message }
  }
  if (Cause.isInterruptedOnly(cause)) {
    return { code: "internal", message: "Generation was interrupted" }
  }
  return { code: "internal", message: "Internal error" }
}

/**
 * Encodes the events of one generation. Stops after the first `Done`; a failure becomes an
 * `error` event, and so does an end without `Done`. The result never fails.
 */
export const encodeTurnEvents = <E, R>(events: Stream.Stream<TurnEvent, E, R>): Stream.Stream<string, never, R> =>
  Stream.suspend(() => {
    let nextId = 0
    let terminated = false
    const body = events.pipe(
      Stream.takeUntil((event) => event._tag === "Done"),
      Stream.map((event): string => {
        if (event._tag === "Token") {
          nextId = Math.max(nextId, event.index + 1)
          return encodeToken(event)
        }
        terminated = true
        return encodeDone(event, nextId)
      }),
      Stream.catchAllCause((cause) =>
        Stream.suspend(() => {
          terminated = true
          const { code, message } = errorFromCause(cause)
          return Stream.make(encodeError(code, message)).pipe(
            Stream.tap(() =>
              code === "internal" ? Effect.logError("turn stream failed", cause) : Effect.logWarning("turn stream failed", cause)
            )
          )
        })
      )
    )
    const missingTerminal = Stream.suspend(() =>
      terminated
        ? Stream.empty
        : Stream.make(encodeError("internal", "The generation ended without a terminal event")).pipe(
          Stream.tap(() => Effect.logError("turn stream ended without a Done event"))
        )
    )
    return Stream.concat(body, missingTerminal)
  })

/**
 * Interleaves `: keep-alive` comments whenever nothing was emitted for `interval`. Ends when
 * `self` ends. An interval of zero or infinity disables keep-alives.
 */
export const withKeepAlive = (interval: Duration.DurationInput) =>
<E, R>(self: Stream.Stream<string, E, R>): Stream.Stream<string, E, R> => {
  const millis = Duration.toMillis(Duration.decode(interval))
  if (!(millis > 0) || !Number.isFinite(millis)) {
    return self
  }
  return Stream.unwrap(Effect.gen(function*() {
    const lastEmit = yield* Ref.make(yield* Clock.currentTimeMillis)
    const touch = Effect.flatMap(Clock.currentTimeMillis, (now) => Ref.set(lastEmit, now))
    const nextKeepAlive: Effect.Effect<string> = Effect.gen(function*() {
      while (true) {
        const now = yield* Clock.currentTimeMillis
        const idle = now - (yield* Ref.get(lastEmit))
        if (idle >= millis) {
          yield* Ref.set(lastEmit, now)
          return keepAlive
        }
        yield* Effect.sleep(Duration.millis(millis - idle))
      }
    })
    return Stream.merge(
      self.pipe(Stream.tap(() => touch)),
      Stream.repeatEffect(nextKeepAlive),
      { haltStrategy: "left" }
    )
  }))
}

/** A `text/event-stream` response from already encoded events. */
export const response = <E>(
  events: Stream.Stream<string, E>,
  options?: { readonly status?: number | undefined } | undefined
): HttpServerResponse.HttpServerResponse =>
  HttpServerResponse.stream(Stream.encodeText(events), {
    status: options?.status ?? 200,
    contentType,
    headers
  })

/** The SSE response of one turn: events encoded, keep-alives while idle. */
export const turnResponse = <E>(
  events: Stream.Stream<TurnEvent, E>,
  settings: { readonly keepAliveInterval: Duration.DurationInput }
): HttpServerResponse.HttpServerResponse =>
  response(encodeTurnEvents(events).pipe(withKeepAlive(settings.keepAliveInterval)))
