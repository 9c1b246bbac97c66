/**
 * The gateway's sweep of silent streams (src/actors/internal/silentStreams.ts): a stream whose
 * turn is over but whose end was never written is ended from the stored reply; one whose turn
 * is still in flight, or that is making progress, is left alone.
 */
import { describe, expect, it } from "@effect/vitest"
import { Effect, Option } from "effect"
import { type ConversationId, Turn, TurnId } from "../../src/runtime/Domain.js"
import { makeSweep, SILENCE_MS } from "../../src/actors/internal/silentStreams.js"
import { TurnStream, TurnStreamId } from "../../src/runtime/TurnStream.js"

const TURN = "conv_a:3"

const readAll = (readable: NodeJS.ReadableStream) =>
  new Promise<string>((resolve, reject) => {
    let text = ""
    readable.on("data", (chunk: string | Buffer) => (text += String(chunk)))
    readable.on("end", () => resolve(text))
    readable.on("error", reject)
  })

const storedReply = (status: Turn["status"], content: string) =>
  new Turn({
    turn_id: TurnId.make(TURN),
    conversation_id: "conv_a" as ConversationId,
    seq: 3,
    role: "assistant",
    content,
    status,
    num_prompt_tokens: 12,
    num_completion_tokens: 4,
    moderation_verdict: null,
    created_at_ms: 0
  })

/** A sweep over one stream of turn TURN, with the conversation's answers given. */
const setUp = (answers: { inFlight: TurnId | null; reply: Option.Option<Turn> }) => {
  const stream = new TurnStream(TurnStreamId.make("gw.s"))
  stream.setTurnId(TURN)
  const calls = { inFlight: 0, storedTurn: [] as Array<[string, number]> }
  const sweep = makeSweep({
    streams: () => [stream],
    inFlight: () => Effect.sync(() => (calls.inFlight++, answers.inFlight)),
    storedTurn: (id, seq) => Effect.sync(() => (calls.storedTurn.push([id, seq]), answers.reply))
  })
  return { stream, calls, sweep }
}

describe("silent streams", () => {
  it("ends a silent stream whose turn is no longer in flight from its stored reply: the text its reader lacks, then done", async () => {
    const { calls, stream, sweep } = setUp({ inFlight: null, reply: Option.some(storedReply("completed", "Hello there")) })
    const readable = stream.toSse({ keepAliveMs: 0 })
    stream.token("Hel")
    await Effect.runPromise(sweep(0))
    await Effect.runPromise(sweep(SILENCE_MS - 1))
    expect(calls.inFlight).toBe(0)
    await Effect.runPromise(sweep(SILENCE_MS))
    expect(calls.storedTurn).toEqual([["conv_a", 3]])
    const text = await readAll(readable)
    expect(text).toContain("event: token\nid: conv_a:3:1\ndata: {\"text\":\"lo there\"}")
    expect(text).toContain("event: done\nid: conv_a:3:2\ndata: {\"turn_id\":\"conv_a:3\",\"finish_reason\":\"stop\",\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":4")
  })

  it("ends it with an error for a failed reply", async () => {
    const { stream, sweep } = setUp({ inFlight: null, reply: Option.some(storedReply("failed", "")) })
    const readable = stream.toSse({ keepAliveMs: 0 })
    await Effect.runPromise(sweep(0))
    await Effect.runPromise(sweep(SILENCE_MS))
    const text = await readAll(readable)
    expect(text).toContain("event: error\ndata: {\"error\":{\"code\":\"generation_failed\"")
    expect(text).not.toContain("event: done")
  })

  it("leaves a turn still in flight alone, checking it again after twice the silence; a stream making progress is not checked", async () => {
    const { calls, stream, sweep } = setUp({ inFlight: TurnId.make(TURN), reply: Option.none() })
    await Effect.runPromise(sweep(0))
    await Effect.runPromise(sweep(SILENCE_MS))
    expect(calls.inFlight).toBe(1)
    expect(calls.storedTurn).toEqual([])
    expect(stream.isClosed).toBe(false)
    await Effect.runPromise(sweep(2 * SILENCE_MS - 1))
    expect(calls.inFlight).toBe(1)
    await Effect.runPromise(sweep(2 * SILENCE_MS))
    expect(calls.inFlight).toBe(2)
    // Text arrives: the silence starts again from this sweep.
    stream.token("x")
    await Effect.runPromise(sweep(3 * SILENCE_MS))
    await Effect.runPromise(sweep(4 * SILENCE_MS - 1))
    expect(calls.inFlight).toBe(2)
    expect(stream.isClosed).toBe(false)
  })

  it("leaves a stream open while its reply is not stored yet, and checks it again", async () => {
    const answers = { inFlight: null as TurnId | null, reply: Option.none<Turn>() }
    const { calls, stream, sweep } = setUp(answers)
    await Effect.runPromise(sweep(0))
    await Effect.runPromise(sweep(SILENCE_MS))
    expect(stream.isClosed).toBe(false)
    answers.reply = Option.some(storedReply("cancelled", "Hi"))
    const readable = stream.toSse({ keepAliveMs: 0 })
    await Effect.runPromise(sweep(2 * SILENCE_MS))
    expect(calls.storedTurn.length).toBe(2)
    expect(await readAll(readable)).toContain("\"finish_reason\":\"cancelled\"")
  })
})
