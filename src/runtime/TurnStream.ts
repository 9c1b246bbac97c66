/**
 * TurnStream: the token data plane of one generation. The actors (Conversation, DecodeSlot)
 * stay the control plane: they start, cancel and finish a turn with one message each. The
 * text itself goes from the DecodeSlot's sink, called by the GPU step loop, straight into the
 * TurnStream that the gateway registered for the turn, and from there to the client's socket
 * as SSE bytes: no fiber, queue or stream stage per token, and none held by a waiting turn.
 *
 * Producer side: `token`, then exactly one `done` or `fail`. `token` returns false when the
 * reader's buffer is full; the producer then pauses its sequence until `onDrain` (Node's
 * Readable backpressure contract). `onCancel` fires once if the reader goes away first
 * (client disconnect, response never taken), and stops the generation.
 *
 * Consumer side, one of: `toSse` (a Readable of `text/event-stream` bytes for the HTTP
 * response, with keep-alive comments), or `toStream` (an Effect Stream of TurnEvents). What
 * arrives before the consumer attaches is buffered.
 *
 * Runner-local: the registry (`TurnStreams`) lives in the gateway process; the producer finds
 * the stream by id. Both are in the same process in every deployment this runtime has today
 * (a single runner); a remote producer would need a runner-to-runner transport.
 */
import { randomUUID } from "node:crypto"
import { Readable } from "node:stream"
import { Cause, Context, Effect, Fiber, Layer, Option, Runtime, Schema, Stream } from "effect"
import { DoneEvent, type FinishReason, noValidation, TokenEvent, type TurnEvent, type TurnId, type TurnStatus, Usage, type UsageJson, usageJson } from "./Domain.js"
import { EngineError, GenerationFailed } from "./Errors.js"

export const TurnStreamId = Schema.String.pipe(Schema.brand("TurnStreamId"))
export type TurnStreamId = typeof TurnStreamId.Type

/** Callbacks of the producer; set once it has started the generation. */
export interface TurnStreamProducer {
  /** The reader drained its buffer after `token` returned false. */
  readonly onDrain: () => void
  /** The reader went away before the end. */
  readonly onCancel: () => void
}

type Item =
  | { readonly _tag: "Token"; readonly text: string }
  | { readonly _tag: "Done"; readonly event: DoneEvent }
  | { readonly _tag: "Error"; readonly code: string; readonly message: string }

/** SSE framing: payloads are JSON, so newlines cannot break it. Shared with resumed streams (http/Sse.ts). */
export const Sse = {
  keepAlive: ": keep-alive\n\n",
  accepted: ": accepted\n\n",
  // Per token: the JSON object is written out rather than built and stringified.
  token: (idPrefix: string, index: number, text: string): string =>
    `event: token\nid: ${idPrefix}${index}\ndata: {"text":${JSON.stringify(text)}}\n\n`,
  /** `id` ends with the index after the last token event. */
  done: (
    event: { readonly turn_id: string; readonly finish_reason: string; readonly usage: UsageJson },
    idPrefix: string,
    index: number
  ): string =>
    `event: done\nid: ${idPrefix}${index}\ndata: ${
      JSON.stringify({
        turn_id: event.turn_id,
        finish_reason: event.finish_reason,
        usage: usageJson(event.usage)
      })
    }\n\n`,
  error: (code: string, message: string): string => `event: error\ndata: ${JSON.stringify({ error: { code, message } })}\n\n`
}

export interface SseOptions {
  /** Comment line after this long without a write; 0 or Infinity: none. */
  readonly keepAliveMs: number
}

/** Sees a turn's events as they are written (synchronously: keep it cheap). */
export interface TurnObserver {
  /** A token event (one step's text). */
  readonly onToken?: () => void
  readonly onDone?: (event: DoneEvent) => void
  readonly onFail?: (code: string, message: string) => void
}

export class TurnStream {
  readonly id: TurnStreamId
  private nextIndex = 0
  /** UTF-16 code units of text handed to `token` (what `complete` does not repeat). */
  private textChars = 0
  /** `<turn_id>:` once the turn is known: event ids then name the turn and the position. */
  private idPrefix = ""
  private ended = false
  private gone = false
  private stopping = false
  private pending: Array<Item> | undefined = []
  private producer: TurnStreamProducer | undefined
  private emit: ((item: Item) => boolean) | undefined
  private wantDrain = false
  private attachTimer: ReturnType<typeof setTimeout> | undefined
  private detachTimer: ReturnType<typeof setTimeout> | undefined
  /** Detached from its SSE reader: events go only to the turn's log. */
  private released = false
  /** A resume claimed it: it runs to its end whatever its reader does. */
  private kept = false
  /** Ends the SSE reader (set by `toSse`). */
  private handOver: (() => void) | undefined
  private readonly onClose: (stream: TurnStream) => void
  private observers: Array<TurnObserver> = []

  /**
   * @param bufferEvents events the reader may hold unread before `token` reports it full
   *   (the topology's `client_buffer_tokens`; a token event carries one step's text).
   */
  constructor(
    id: TurnStreamId,
    onClose: (stream: TurnStream) => void = () => {},
    private readonly bufferEvents: number = 64,
    /** Index of its first token event: 0, or where a resumed reader goes on. */
    readonly firstIndex: number = 0,
    /**
     * How long the turn goes on after its SSE reader disconnects, for the client to resume it
     * from the turn's log (`GET …/stream`); 0: a disconnect cancels it at once.
     */
    private readonly detachGraceMs: number = 0
  ) {
    this.id = id
    this.onClose = onClose
    this.nextIndex = firstIndex
  }

  /** Whether `done` or `fail` was called, or the reader went away. */
  get isClosed(): boolean {
    return this.ended || this.gone
  }

  /** UTF-16 code units of text its producer has written so far (progress, for a watcher). */
  get numTextChars(): number {
    return this.textChars
  }

  /** The turn, once `setTurnId` named it. */
  get turnId(): string | undefined {
    return this.idPrefix === "" ? undefined : this.idPrefix.slice(0, -1)
  }

  /** Names the turn in the event ids (`<turn_id>:<index>`): a client resumes with the last one. */
  setTurnId(turnId: string): void {
    this.idPrefix = `${turnId}:`
  }

  // ---- producer side ------------------------------------------------------------------

  setProducer(producer: TurnStreamProducer): void {
    this.producer = producer
    // Kept before anything wrote to it: kept from now on.
    if (this.kept && this.detachTimer !== undefined) {
      clearTimeout(this.detachTimer)
      this.detachTimer = undefined
    }
    if ((this.gone || this.stopping) && !this.ended) producer.onCancel()
  }

  /** Appends a text delta. @returns false when the reader is full: pause until `onDrain`. */
  token(text: string): boolean {
    if (this.isClosed) return true
    this.textChars += text.length
    for (const o of this.observers) o.onToken?.()
    const ok = this.push({ _tag: "Token", text })
    if (!ok) this.wantDrain = true
    return ok
  }

  /** Adds an observer of this turn's tokens and end (metrics, usage accounting). */
  observe(observer: TurnObserver): void {
    this.observers.push(observer)
  }

  done(event: DoneEvent): void {
    if (this.isClosed) return
    if (this.stopping) return this.fail("shutting_down", "The server is shutting down; the turn was stored as cancelled")
    for (const o of this.observers) o.onDone?.(event)
    this.ended = true
    this.push({ _tag: "Done", event })
    this.finish()
  }

  /**
   * Ends the stream from its turn's stored reply `text`, for a producer that may be gone
   * without writing the end (its GPU runner died once the reply was stored): the part of
   * `text` not yet handed to `token` goes out as one token event, then `done`. A stream that
   * did not carry the turn from its start cannot tell that part: it ends `stream_incomplete`.
   * A no-op once closed.
   */
  complete(text: string, event: DoneEvent): void {
    if (this.isClosed) return
    if (this.firstIndex > 0) return this.fail("stream_incomplete", "the end of this turn was lost with its GPU runner; read it from the history")
    if (text.length > this.textChars) this.token(text.slice(this.textChars))
    this.done(event)
  }

  fail(code: string, message: string): void {
    if (this.isClosed) return
    for (const o of this.observers) o.onFail?.(code, message)
    this.ended = true
    this.push({ _tag: "Error", code, message })
    this.finish()
  }

  /**
   * The server is stopping: the producer is told to stop (as when the reader goes), and the
   * stream then ends with `event: error` code `shutting_down` instead of `done`.
   */
  shutdown(): void {
    if (this.isClosed || this.stopping) return
    this.stopping = true
    this.producer?.onCancel()
  }

  // ---- consumer side ------------------------------------------------------------------

  /** The reader is gone (disconnect): the producer is told to stop. Idempotent. */
  cancel(): void {
    if (this.gone) return
    this.gone = true
    this.clearAttachTimer()
    if (!this.ended) this.producer?.onCancel()
    this.onClose(this)
  }

  /**
   * The SSE reader disconnected. With a detach grace the generation goes on, its events kept
   * only in the turn's log (which the DecodeSlot writes), until the grace ends (then it is
   * cancelled as by `cancel`) unless a resume `keep`s it; without a grace it is cancelled now.
   */
  detach(): void {
    if (this.isClosed || this.released) return
    if (this.detachGraceMs <= 0) return this.cancel()
    this.release()
    if (this.kept) return
    this.detachTimer = setTimeout(() => {
      this.detachTimer = undefined
      this.cancel()
    }, this.detachGraceMs)
  }

  /**
   * A client resumed this turn from its log (with a detach grace; a no-op without): it runs to
   * its end, whenever its SSE reader goes. A resume can come before the old reader's socket is
   * known to be dead; if that reader is holding the producer back, it is ended (its client,
   * if still there, resumes too) so that the resumed reader is not stalled behind it.
   */
  keep(): void {
    if (this.detachGraceMs <= 0 || this.isClosed || this.kept) return
    this.kept = true
    // Nothing writes to it yet, and maybe nothing will (a resume's Attach whose answer came too
    // late, or never): its detach timer runs on until a producer comes (setProducer).
    if (this.producer === undefined) return
    if (this.detachTimer !== undefined) clearTimeout(this.detachTimer)
    this.detachTimer = undefined
    if (!this.released && this.wantDrain) {
      this.handOver?.()
      this.release()
    }
  }

  /** Stops writing to the SSE reader; the producer goes on, never paused by it again. */
  private release(): void {
    this.released = true
    this.emit = () => true
    if (this.wantDrain) {
      this.wantDrain = false
      this.producer?.onDrain()
    }
  }

  /** Cancels the stream if no consumer has attached within `ms`. */
  cancelIfNotAttachedWithin(ms: number): void {
    if (this.pending === undefined || this.isClosed) return
    this.attachTimer = setTimeout(() => this.pending !== undefined && this.cancel(), ms)
  }

  /** The `text/event-stream` body; ends after the `done` or `error` event. Attach once. */
  toSse(options: SseOptions): Readable {
    let lastWriteMs = performance.now()
    let keepAlive: ReturnType<typeof setInterval> | undefined
    const stop = () => keepAlive !== undefined && clearInterval(keepAlive)
    // Object mode: strings go to the socket as they are, and the buffer counts events.
    const readable = new Readable({
      objectMode: true,
      highWaterMark: this.bufferEvents,
      read: () => {
        if (!this.wantDrain) return
        this.wantDrain = false
        this.producer?.onDrain()
      },
      destroy: (error, callback) => {
        stop()
        if (!this.ended) this.detach()
        callback(error)
      }
    })
    this.handOver = () => {
      stop()
      readable.push(null)
    }
    // A first comment at once: the status line and headers go out with it, so a turn that
    // waits for the GPU does not look like a dead connection.
    readable.push(Sse.accepted)
    this.attach((item) => {
      lastWriteMs = performance.now()
      switch (item._tag) {
        case "Token":
          return readable.push(Sse.token(this.idPrefix, this.nextIndex++, item.text))
        case "Done":
          readable.push(Sse.done(item.event, this.idPrefix, this.nextIndex))
          stop()
          return readable.push(null)
        case "Error":
          readable.push(Sse.error(item.code, item.message))
          stop()
          return readable.push(null)
      }
    })
    if (!this.ended && options.keepAliveMs > 0 && Number.isFinite(options.keepAliveMs)) {
      keepAlive = setInterval(() => {
        if (performance.now() - lastWriteMs < options.keepAliveMs) return
        lastWriteMs = performance.now()
        readable.push(Sse.keepAlive)
      }, options.keepAliveMs)
    }
    return readable
  }

  /**
   * The events as an Effect Stream: tokens, then one DoneEvent; an `error` ends it with
   * GenerationFailed (code `generation_failed`) or EngineError. Interrupting it cancels.
   */
  toStream(): Stream.Stream<TurnEvent, GenerationFailed | EngineError> {
    return Stream.asyncPush<TurnEvent, GenerationFailed | EngineError>((emit) =>
      Effect.acquireRelease(
        Effect.sync(() =>
          this.attach((item) => {
            switch (item._tag) {
              case "Token":
                emit.single(new TokenEvent({ index: this.nextIndex++, text: item.text }))
                return true
              case "Done":
                emit.single(item.event)
                emit.end()
                return true
              case "Error":
                emit.fail(
                  item.code === "generation_failed"
                    ? new GenerationFailed({ message: item.message })
                    : new EngineError({ code: item.code, message: item.message })
                )
                return true
            }
          })
        ),
        () => Effect.sync(() => this.ended || this.cancel())
      )
    )
  }

  private attach(emit: (item: Item) => boolean): void {
    if (this.emit !== undefined || this.pending === undefined) throw new Error("TurnStream: consumer already attached")
    this.clearAttachTimer()
    const pending = this.pending
    this.pending = undefined
    this.emit = emit
    for (const item of pending) emit(item)
    if (this.wantDrain) {
      this.wantDrain = false
      this.producer?.onDrain()
    }
  }

  private push(item: Item): boolean {
    if (this.emit !== undefined) return this.emit(item)
    this.pending!.push(item)
    return this.pending!.length < this.bufferEvents
  }

  private finish(): void {
    this.clearAttachTimer()
    if (this.detachTimer !== undefined) clearTimeout(this.detachTimer)
    this.onClose(this)
  }

  private clearAttachTimer(): void {
    if (this.attachTimer !== undefined) clearTimeout(this.attachTimer)
    this.attachTimer = undefined
  }

  /**
   * A TurnStream fed by an Effect Stream of TurnEvents (in-memory facades, tests). The source
   * runs from the moment a consumer attaches; a reader that goes away interrupts it. A
   * failure becomes an `error` event (errorFromCause), an end without DoneEvent an `internal`
   * error.
   */
  static fromStream<E>(events: Stream.Stream<TurnEvent, E>): Effect.Effect<TurnStream> {
    return Effect.map(Effect.runtime<never>(), (runtime) => {
      const stream = new TurnStream(TurnStreamId.make(randomUUID()))
      let fiber: Fiber.RuntimeFiber<void, never> | undefined
      let paused: (() => void) | undefined
      const run = events.pipe(
        Stream.takeUntil((event) => event._tag === "Done"),
        Stream.runForEach((event) =>
          Effect.suspend(() => {
            if (event._tag === "Done") return Effect.sync(() => stream.done(event))
            if (stream.token(event.text)) return Effect.void
            return Effect.async<void>((resume) => void (paused = () => resume(Effect.void)))
          })
        ),
        Effect.matchCause({
          onSuccess: () => stream.fail("internal", "The generation ended without a terminal event"),
          onFailure: (cause) => {
            if (Cause.isInterruptedOnly(cause) && stream.isClosed) return
            const { code, message } = errorFromCause(cause)
            stream.fail(code, message)
          }
        })
      )
      stream.setProducer({
        onDrain: () => {
          const resume = paused
          paused = undefined
          resume?.()
        },
        onCancel: () => void (fiber !== undefined && Runtime.runFork(runtime)(Fiber.interrupt(fiber)))
      })
      // Started on the next tick: the consumer attaches synchronously after this returns.
      setImmediate(() => {
        if (!stream.gone) fiber = Runtime.runFork(runtime)(run)
      })
      return stream
    })
  }
}

/** A turn's reply as it was stored, for ending its stream without its producer. */
export interface StoredReply {
  readonly turn_id: TurnId
  readonly status: TurnStatus
  readonly text: string
  readonly finish_reason: FinishReason
  readonly num_prompt_tokens: number
  readonly num_completion_tokens: number
}

/**
 * Ends a turn's stream from its stored reply, as its DecodeSlot would have (`done` after the
 * text the reader lacks; `event: error` for a failed or filtered reply): for a stream whose
 * producer is gone without writing the end. A no-op on a stream that has ended.
 */
export const endFromReply = (sink: Pick<TurnStream, "complete" | "fail">, reply: StoredReply): void => {
  if (reply.status === "filtered") return sink.fail("content_filter", "The reply was stopped by content moderation")
  if (reply.status === "failed") return sink.fail("generation_failed", "The generation failed")
  const usage = { prompt_tokens: reply.num_prompt_tokens, completion_tokens: reply.num_completion_tokens, prompt_tokens_details: { cached_tokens: 0 } }
  sink.complete(reply.text, new DoneEvent({ turn_id: reply.turn_id, finish_reason: reply.finish_reason, usage: new Usage(usage, noValidation) }, noValidation))
}

/** The `event: error` code and message for a failure of a generation's event stream. */
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
  if (Cause.isInterruptedOnly(cause)) return { code: "internal", message: "Generation was interrupted" }
  return { code: "internal", message: "Internal error" }
}

/** The runner's open TurnStreams, by id. */
export class TurnStreams extends Context.Tag("chat/TurnStreams")<TurnStreams, {
  /**
   * A new registered stream; it leaves the registry when it ends or its reader goes.
   * @param bufferEvents unread events before backpressure (`client_buffer_tokens`).
   * @param firstIndex index of the first token event it will carry (a resume's: after the
   *   client's Last-Event-ID); 0 for a new turn.
   */
  readonly make: (bufferEvents: number, firstIndex?: number) => TurnStream
  readonly get: (id: TurnStreamId) => TurnStream | undefined
  readonly size: () => number
  /** Every open stream, for a graceful stop. */
  readonly all: () => ReadonlyArray<TurnStream>
  /** A client resumed turn `turnId`: its stream here, if its reader had gone, runs to its end. */
  readonly keepTurn: (turnId: string) => void
}>() {
  /**
   * The registry of runner `runnerName`: stream ids are `<runner>.<uuid>` (the data plane
   * routes by them). `detachGraceMs`: how long a turn outlives its reader's disconnect (see
   * `TurnStream.detach`; 0: a disconnect cancels it).
   */
  static readonly layerFor = (runnerName: string, detachGraceMs = 0) =>
    Layer.sync(TurnStreams, () => {
      const streams = new Map<TurnStreamId, TurnStream>()
      const remove = (stream: TurnStream) => void streams.delete(stream.id)
      return {
        make: (bufferEvents, firstIndex = 0) => {
          const stream = new TurnStream(TurnStreamId.make(`${runnerName}.${randomUUID()}`), remove, bufferEvents, firstIndex, detachGraceMs)
          streams.set(stream.id, stream)
          return stream
        },
        get: (id) => streams.get(id),
        size: () => streams.size,
        all: () => [...streams.values()],
        keepTurn: (turnId) => {
          for (const stream of streams.values()) if (stream.turnId === turnId) stream.keep()
        }
      }
    })
  static readonly layer = TurnStreams.layerFor("local")
}
