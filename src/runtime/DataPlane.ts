/**
 * The token data plane: how a DecodeSlot's text reaches the TurnStream that holds the client's
 * socket, and how that reader's backpressure and departure reach the slot.
 *
 * A stream's id names its gateway runner (`<runner>.<uuid>`, see TurnStreams). On the same
 * runner the slot writes into the TurnStream directly (a function call per token). Across
 * runners it writes into a `RemoteSink`: its events are batched per destination runner and
 * sent as one ZeroMQ frame after each engine step: the step loop hands a step's tokens to
 * their sinks in slices of 4 ms, so a flush scheduled with `setImmediate` carries the whole
 * step, or, when a step's tokens take longer than a slice (a busy loop, the collector marking),
 * what one slice handed over. The
 * gateway answers with control messages: pause (its reader is full), resume (drained) and
 * cancel (the reader went away, or the stream is unknown there).
 *
 * Wire: each runner binds a PULL socket on its topology `data_port` and connects a PUSH socket
 * to each peer it sends to. A frame is msgpack `[sender, [message, ...]]`; messages:
 * `["t", id, text, index]`, `["d", id, done]`, `["f", id, code, text]`, `["s", id, text, done]`
 * (a stream ended from its turn's stored reply, by the Conversation) towards the gateway and
 * `["p", id]`, `["r", id]`, `["c", id]` towards the slot. PUSH/PULL keeps each pair's order.
 */
import { Context, Effect, Layer } from "effect"
import { Packr } from "msgpackr"
import * as Zmq from "zeromq"
import { DoneEvent, FinishReason, noValidation, TurnId, Usage, type UsageJson, usageJson } from "./Domain.js"
import { runnerNamed, type Topology } from "./Topology.js"
import { TurnEventLog } from "./TurnEventLog.js"
import { type TurnStreamId, type TurnStreamProducer, TurnStreams } from "./TurnStream.js"

/** What a DecodeSlot writes its turn into: a TurnStream, or its remote stand-in. */
export interface TokenSink {
  /** Appends a text delta. @returns false when the reader is full: pause until `onDrain`. */
  readonly token: (text: string) => boolean
  readonly done: (event: DoneEvent) => void
  /** Ends the stream from the turn's stored reply (see `TurnStream.complete`). */
  readonly complete: (text: string, event: DoneEvent) => void
  readonly fail: (code: string, message: string) => void
  readonly setProducer: (producer: TurnStreamProducer) => void
  /**
   * The slot stops writing here without ending the stream (its turn went on in another slot):
   * a remote sink is forgotten; a local TurnStream has nothing to let go of.
   */
  readonly drop?: () => void
}

export class DataPlane extends Context.Tag("chat/DataPlane")<DataPlane, {
  /**
   * The sink of stream `id`, or undefined when no runner of that name can serve it.
   * `firstIndex`: the index of the first token event written to it (0, or where a failover
   * resumes), so that a gateway can drop what it already has.
   */
  readonly sink: (id: TurnStreamId, firstIndex?: number) => TokenSink | undefined
}>() {}

/** The runner named in a stream id. */
export const runnerOfStream = (id: string): string => id.slice(0, Math.max(0, id.indexOf(".")))

/** One process: every stream is local. */
export const layerLocal = Layer.effect(
  DataPlane,
  Effect.map(TurnStreams, (streams) => DataPlane.of({ sink: (id) => streams.get(id) }))
)

type Message =
  | readonly ["t", string, string, number]
  | readonly ["d", string, { turn_id: string; finish_reason: string; usage: UsageJson }]
  | readonly ["f", string, string, string]
  | readonly ["s", string, string, { turn_id: string; finish_reason: string; usage: UsageJson }]
  | readonly ["p" | "r" | "c", string]

const packr = new Packr({ useRecords: false })

const doneEventOf = (d: { turn_id: string; finish_reason: string; usage: UsageJson }): DoneEvent =>
  new DoneEvent({
    turn_id: TurnId.make(d.turn_id),
    finish_reason: d.finish_reason as FinishReason,
    usage: new Usage(d.usage, noValidation)
  }, noValidation)

/**
 * A gateway's record of who feeds one of its streams: the runner, whether it was told to
 * pause, the next token index it expects, the runners it replaced (a failover), whose messages
 * are void, and, while a gap is filled from the turn's log, the messages that wait for it.
 */
interface Feeder {
  readonly from: string
  paused: boolean
  nextIndex: number
  readonly retired: Set<string>
  waiting: Array<readonly [string, Message]> | undefined
}

/** A slot's view of a TurnStream on another runner. */
class RemoteSink implements TokenSink {
  paused = false
  /** The index of the next token event (a failover's slot starts where the lost one ended). */
  nextIndex: number
  producer: TurnStreamProducer | undefined
  ended = false
  constructor(
    readonly id: string,
    private readonly send: (message: Message) => void,
    private readonly forget: () => void,
    firstIndex: number
  ) {
    this.nextIndex = firstIndex
  }
  token(text: string): boolean {
    if (this.ended) return true
    this.send(["t", this.id, text, this.nextIndex++])
    return !this.paused
  }
  done(event: DoneEvent): void {
    if (this.end()) {
      this.send(["d", this.id, { turn_id: event.turn_id, finish_reason: event.finish_reason, usage: usageJson(event.usage) }])
    }
  }
  complete(text: string, event: DoneEvent): void {
    if (this.end()) this.send(["s", this.id, text, { turn_id: event.turn_id, finish_reason: event.finish_reason, usage: usageJson(event.usage) }])
  }
  fail(code: string, message: string): void {
    if (this.end()) this.send(["f", this.id, code, message])
  }
  setProducer(producer: TurnStreamProducer): void {
    this.producer = producer
  }
  drop(): void {
    this.end()
  }
  private end(): boolean {
    if (this.ended) return false
    this.ended = true
    this.forget()
    return true
  }
}

/**
 * Runner `runnerName` of a multi-process topology: binds its `data_port`, serves the
 * TurnStreams of this runner to slots elsewhere, and opens RemoteSinks to other gateways.
 */
export const layerZmq = (topology: Topology, runnerName: string) =>
  Layer.scoped(
    DataPlane,
    Effect.gen(function*() {
      const streams = yield* TurnStreams
      const eventLog = yield* TurnEventLog
      const self = runnerNamed(topology, runnerName)!
      const pull = new Zmq.Pull({ linger: 0 })
      yield* Effect.promise(() => pull.bind(`tcp://0.0.0.0:${self.data_port}`))

      /** Batched outgoing messages, one PUSH socket and queue per peer runner. */
      const peers = new Map<string, { socket: Zmq.Push; outbox: Array<Message>; sending: boolean; flushScheduled: boolean }>()
      const peer = (name: string) => {
        let p = peers.get(name)
        if (p === undefined) {
          const runner = runnerNamed(topology, name)!
          // A peer that is gone must not hold messages forever: drop after the linger.
          const socket = new Zmq.Push({ linger: 1000, sendHighWaterMark: 100_000, sendTimeout: 5000 })
          socket.connect(`tcp://${runner.host ?? "127.0.0.1"}:${runner.data_port}`)
          p = { socket, outbox: [], sending: false, flushScheduled: false }
          peers.set(name, p)
        }
        return p
      }
      let closed = false
      const flush = (p: NonNullable<ReturnType<typeof peers.get>>) => {
        p.flushScheduled = false
        if (closed || p.sending || p.outbox.length === 0) return
        const batch = p.outbox
        p.outbox = []
        p.sending = true
        p.socket.send(packr.pack([runnerName, batch])).then(
          () => {
            p.sending = false
            flush(p)
          },
          () => {
            // The peer is unreachable: its streams are lost with it (their turns are ended by
            // the Conversation's own recovery); keep sending later messages.
            p.sending = false
            flush(p)
          }
        )
      }
      const send = (to: string, message: Message) => {
        if (closed) return
        const p = peer(to)
        p.outbox.push(message)
        if (!p.flushScheduled) {
          p.flushScheduled = true
          setImmediate(() => flush(p))
        }
      }

      /** Slot side: the remote sinks of this runner's slots, by stream id. */
      const sinks = new Map<string, RemoteSink>()
      /**
       * Gateway side: which runner feeds each stream, whether it was told to pause, the next
       * token index it expects, and the runners it replaced (a failover), whose messages are void.
       */
      const feeders = new Map<string, Feeder>()

      const onGatewayMessage = (from: string, message: Message) => {
        const id = message[1] as TurnStreamId
        const stream = streams.get(id)
        if (stream === undefined) {
          // Gone (its reader left, or it ended): the slot is told to stop.
          feeders.delete(id)
          if (message[0] === "t") send(from, ["c", id])
          return
        }
        let feeder = feeders.get(id)
        if (feeder?.retired.has(from)) return
        // A gap is being filled: everything after it waits, in order.
        if (feeder?.waiting !== undefined) return void feeder.waiting.push([from, message])
        // A new feeder: the first message, or the turn moved to another GPU runner (failover).
        if (feeder === undefined || feeder.from !== from) {
          const retired = feeder?.retired ?? new Set<string>()
          if (feeder !== undefined) retired.add(feeder.from)
          const f: Feeder = { from, paused: false, nextIndex: feeder?.nextIndex ?? stream.firstIndex, retired, waiting: undefined }
          feeders.set(id, feeder = f)
          stream.setProducer({
            onDrain: () => {
              if (!f.paused) return
              f.paused = false
              send(from, ["r", id])
            },
            onCancel: () => send(from, ["c", id])
          })
        }
        switch (message[0]) {
          case "t":
            // What the client has already had (a failover resumes from the log, which may be behind).
            if (message[3] < feeder.nextIndex) break
            // Ahead of what the client has (a failover resumed from a log that had frames the
            // lost runner never sent): the missing events come from the log first.
            if (message[3] > feeder.nextIndex && stream.turnId !== undefined) {
              feeder.waiting = [[from, message]]
              void fillGap(id, stream.turnId, feeder, message[3])
              break
            }
            feeder.nextIndex = message[3] + 1
            if (!stream.token(message[2]) && !feeder.paused) {
              feeder.paused = true
              send(from, ["p", id])
            }
            break
          case "d":
            feeders.delete(id)
            stream.done(doneEventOf(message[2]))
            break
          case "f":
            feeders.delete(id)
            stream.fail(message[2], message[3])
            break
          case "s": {
            const d = message[3]
            feeders.delete(id)
            stream.complete(message[2], doneEventOf(d))
            break
          }
        }
      }

      /** Delivers the log's token events [feeder.nextIndex, upTo), then the messages that waited. */
      const fillGap = async (id: TurnStreamId, turnId: string, feeder: Feeder, upTo: number) => {
        const events = await Effect.runPromise(Effect.either(eventLog.read(TurnId.make(turnId))))
        const stream = streams.get(id)
        const waiting = feeder.waiting ?? []
        feeder.waiting = undefined
        if (stream === undefined) return
        for (const e of events._tag === "Right" ? events.right : []) {
          if (e.kind !== "token" || e.index !== feeder.nextIndex || e.index >= upTo) continue
          feeder.nextIndex++
          stream.token(e.text)
        }
        if (feeder.nextIndex < upTo) {
          feeders.delete(id)
          return stream.fail("stream_incomplete", `events ${feeder.nextIndex} to ${upTo - 1} of this turn were lost with its GPU runner; read the turn from the history`)
        }
        for (const [from, message] of waiting) onGatewayMessage(from, message)
      }

      const onSlotMessage = (message: Message) => {
        const sink = sinks.get(message[1])
        if (sink === undefined) return
        switch (message[0]) {
          case "p":
            sink.paused = true
            break
          case "r":
            sink.paused = false
            sink.producer?.onDrain()
            break
          case "c":
            sink.producer?.onCancel()
            break
        }
      }

      void (async () => {
        try {
          for await (const [frame] of pull) {
            let decoded: unknown
            try {
              decoded = packr.unpack(frame!)
            } catch {
              continue
            }
            if (!Array.isArray(decoded) || typeof decoded[0] !== "string" || !Array.isArray(decoded[1])) continue
            const from = decoded[0]
            for (const message of decoded[1] as Array<Message>) {
              if (message[0] === "t" || message[0] === "d" || message[0] === "f" || message[0] === "s") onGatewayMessage(from, message)
              else onSlotMessage(message)
            }
          }
        } catch {
          // closed
        }
      })()
      yield* Effect.addFinalizer(() =>
        Effect.sync(() => {
          closed = true
          pull.close()
          for (const p of peers.values()) p.socket.close()
        })
      )

      return DataPlane.of({
        sink: (id, firstIndex = 0) => {
          const local = streams.get(id)
          if (local !== undefined) return local
          const gateway = runnerOfStream(id)
          if (gateway === runnerName || runnerNamed(topology, gateway) === undefined) return undefined
          // Forgotten only while it is the stream's sink here (a later slot's may replace it).
          const sink: RemoteSink = new RemoteSink(id, (m) => send(gateway, m), () => sinks.get(id) === sink && sinks.delete(id), firstIndex)
          sinks.set(id, sink)
          return sink
        }
      })
    })
  )
