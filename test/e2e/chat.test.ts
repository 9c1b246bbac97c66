/**
 * End to end, as a client would: the real service process (real engine, real cluster on the
 * test PostgreSQL, real HTTP/SSE), driven with fetch.
 */
import path from "node:path"
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import * as Tokenizer from "../../src/runtime/Tokenizer.js"
import { databaseUrl, PgLive } from "../support/database.js"
import { assertEngineBuilt, rawRequest } from "../support/engineProcess.js"
import { postJson, readSse, type Service, type SseEvent, startService } from "../support/service.js"

const engineInfo = async (service: Service) =>
  rawRequest(`ipc://${path.join(service.runDir, "engine-gpu-0.sock")}`, { v: 1, type: "info", req_id: 1 })

/** Polls the engine until no sequence holds a KV block; fails after `timeoutMs`. */
const waitForFreeBlocks = async (service: Service, timeoutMs = 2000) => {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const info = await engineInfo(service)
    if (info.num_used_blocks === 0 && info.num_active_seqs === 0) return info
    if (Date.now() > deadline) throw new Error(`KV blocks still in use: ${JSON.stringify(info)}`)
    await new Promise((r) => setTimeout(r, 20))
  }
}

const tokenText = (events: ReadonlyArray<SseEvent>) => events.filter((e) => e.event === "token").map((e) => e.data.text).join("")

/**
 * Prompt tokens of a second turn: system + turn 1 (user and the assistant's reply) + turn 2,
 * where the reply follows the generation prompt and is the ids the model generated (its end-of-sequence token excluded), not a
 * fresh encoding of its text (Tokenizer.rememberAssistant).
 */
const secondPromptTokens = (
  tokenizer: Tokenizer.ModelTokenizer,
  system: string,
  user1: string,
  turn1: ReadonlyArray<SseEvent>,
  user2: string
): number => {
  const reply1 = tokenText(turn1)
  const done1 = turn1.at(-1)!
  const rendered2 = tokenizer.encode(tokenizer.renderChat([
    { role: "system", content: system },
    { role: "user", content: user1 },
    { role: "assistant", content: reply1 },
    { role: "user", content: user2 }
  ]))
  const numGenerated1 = done1.data.usage.completion_tokens - (done1.data.finish_reason === "stop" ? 1 : 0)
  // A reply holding an added token's text is encoded again instead (so is one with a
  // generated U+0000, replaced by U+FFFD: about one reply in 2,000 here, not told apart), and
  // so is one the repetition guard stopped (its ids are not kept: the detokenizer may have
  // held part of a character).
  const reusable = done1.data.finish_reason !== "repetition" && tokenizer.encode(reply1).every((t) => t < 151643)
  // The reply is written as generated: after the generation prompt's empty think block, which
  // Qwen3's template drops from an earlier reply (PromptSegments.reply).
  const thinkBlock = tokenizer.encode("<think>\n\n</think>\n\n").length
  return thinkBlock + (reusable
    ? rendered2.length - tokenizer.encode(`assistant\n${reply1}`).length + tokenizer.encode("assistant\n").length + numGenerated1
    : rendered2.length)
}

describe("chat service end to end (PostgreSQL at DATABASE_URL)", () => {
  let service: Service
  let tokenizer: Tokenizer.ModelTokenizer

  beforeAll(async () => {
    assertEngineBuilt()
    service = await startService({ env: { DATABASE_URL: databaseUrl } })
    tokenizer = await Effect.runPromise(Tokenizer.load(path.join(service.dataDir, "models", "tiny-qwen3")))
  }, 120_000)

  afterAll(async () => {
    await service?.stop()
  })

  it("streams two turns, carries history, cancels a third, frees every KV block", async () => {
    const created = await postJson(`${service.url}/v1/conversations`, { system_prompt: "You are terse." })
    expect(created.status).toBe(201)
    const { conversation_id: id } = (await created.json()) as { conversation_id: string }

    // Turn 1: a complete stream, with the SSE headers a proxy needs.
    const t0 = performance.now()
    let ttftMs = 0
    const res1 = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Hello, who are you?", max_tokens: 64 })
    expect(res1.status).toBe(200)
    expect(res1.headers.get("content-type")).toContain("text/event-stream")
    expect(res1.headers.get("cache-control")).toBe("no-cache")
    expect(res1.headers.get("x-accel-buffering")).toBe("no")
    const turn1 = await readSse(res1, (e) => {
      if (e.event === "token" && ttftMs === 0) ttftMs = performance.now() - t0
    })
    const totalMs = performance.now() - t0
    const done1 = turn1.at(-1)!
    expect(done1.event).toBe("done")
    expect(["stop", "length"]).toContain(done1.data.finish_reason)
    expect(done1.data.usage.completion_tokens).toBeGreaterThan(0)
    const tokens1 = turn1.filter((e) => e.event === "token")
    // Event ids name the turn and the position: `<turn_id>:<index>`.
    expect(tokens1.map((e) => e.id)).toEqual(tokens1.map((_, i) => `${done1.data.turn_id}:${i}`))
    expect(done1.id).toBe(`${done1.data.turn_id}:${tokens1.length}`)
    console.log(
      `turn 1: TTFT ${ttftMs.toFixed(1)} ms, ${done1.data.usage.completion_tokens} tokens in ${totalMs.toFixed(1)} ms ` +
        `(${((done1.data.usage.completion_tokens - 1) / ((totalMs - ttftMs) / 1000)).toFixed(0)} tokens/s after the first)`
    )
    const expectedPrompt1 = tokenizer.encode(tokenizer.renderChat([
      { role: "system", content: "You are terse." },
      { role: "user", content: "Hello, who are you?" }
    ]))
    expect(done1.data.usage.prompt_tokens).toBe(expectedPrompt1.length)

    // Turn 2: its prompt holds turn 1 (secondPromptTokens).
    const res2 = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Say more.", max_tokens: 16 })
    const turn2 = await readSse(res2, () => undefined)
    const done2 = turn2.at(-1)!
    expect(done2.event).toBe("done")
    expect(done2.data.usage.prompt_tokens).toBe(
      secondPromptTokens(tokenizer, "You are terse.", "Hello, who are you?", turn1, "Say more.")
    )
    expect(done2.data.usage.prompt_tokens).toBeGreaterThan(done1.data.usage.prompt_tokens + 5)
    // Turn 2 builds on turn 1's KV: the full blocks of turn 1's prompt and of its reply (every
    // generated token but the last was fed back) came from the prefix cache.
    expect(done1.data.usage.prompt_tokens_details.cached_tokens).toBe(0)
    const computed1 = done1.data.usage.prompt_tokens + done1.data.usage.completion_tokens - 1
    const replyReusable = tokenizer.encode(tokenText(turn1)).every((t) => t < 151643)
    expect(done2.data.usage.prompt_tokens_details.cached_tokens).toBe(
      Math.floor((replyReusable ? computed1 : done1.data.usage.prompt_tokens) / 16) * 16
    )

    // Turn 3: cancelled mid-stream with POST cancel; a concurrent turn meanwhile gets 409.
    const res3 = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Write a long story.", max_tokens: 3000 })
    let cancelled = false
    const turn3 = await readSse(res3, async (e) => {
      if (e.event === "token" && e.id?.endsWith(":4") && !cancelled) {
        const busy = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Too soon" })
        expect(busy.status).toBe(409)
        expect(((await busy.json()) as any).error.code).toBe("turn_in_progress")
        const cancel = await fetch(`${service.url}/v1/conversations/${id}/cancel`, { method: "POST" })
        expect(cancel.status).toBe(204)
        cancelled = true
      }
    })
    const done3 = turn3.at(-1)!
    expect(done3.event).toBe("done")
    expect(done3.data.finish_reason).toBe("cancelled")
    expect(done3.data.usage.completion_tokens).toBeLessThan(3000)
    const info = await waitForFreeBlocks(service)
    expect(info.num_blocks).toBeGreaterThan(0)

    // History: the newest page first, then the older one through next_cursor.
    const page1 = (await (await fetch(`${service.url}/v1/conversations/${id}?limit=2`)).json()) as any
    expect(page1.turns.map((t: any) => [t.seq, t.role, t.status])).toEqual([[4, "user", "completed"], [5, "assistant", "cancelled"]])
    expect(page1.turns[1].content).toBe(tokenText(turn3))
    expect(page1.next_cursor).toBe("4")
    const page2 = (await (await fetch(`${service.url}/v1/conversations/${id}?before=4&limit=50`)).json()) as any
    expect(page2.turns.map((t: any) => t.seq)).toEqual([0, 1, 2, 3])
    expect(page2.turns[1].content).toBe(tokenText(turn1))
    expect(page2.turns[1].num_completion_tokens).toBe(done1.data.usage.completion_tokens)
    expect(page2.next_cursor).toBeNull()
  })

  it("a conversation whose entity instance was reaped between turns keeps its history", async () => {
    const created = await postJson(`${service.url}/v1/conversations`, { system_prompt: "Be brief." })
    const { conversation_id: id } = (await created.json()) as { conversation_id: string }
    // Conversation instances are dropped 1 s after their last message, on a 5 s period. A turn
    // that streams for longer than that (~1,500 tokens at ~200 tokens/s on the CPU engine)
    // ends at a new instance, which must add the reply to the runner's hot state. Seeded, so
    // the reply is the same every run: an unseeded one may meet the repetition guard or
    // generate U+0000 (token 188), and then keeps no ids (see secondPromptTokens).
    const t0 = performance.now()
    const turn1 = await readSse(await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Hi there", max_tokens: 1500, seed: 1 }), () => undefined)
    expect(turn1.at(-1)!.event).toBe("done")
    console.log(`reaped-instance turn: ${turn1.at(-1)!.data.usage.completion_tokens} tokens (${turn1.at(-1)!.data.finish_reason}) in ${((performance.now() - t0) / 1000).toFixed(1)} s`)
    const turn2 = await readSse(await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "And then?", max_tokens: 4 }), () => undefined)
    const done2 = turn2.at(-1)!
    expect(done2.event).toBe("done")
    expect(done2.data.usage.prompt_tokens).toBe(secondPromptTokens(tokenizer, "Be brief.", "Hi there", turn1, "And then?"))
    const history = (await (await fetch(`${service.url}/v1/conversations/${id}`)).json()) as any
    expect(history.turns.map((t: any) => [t.seq, t.role])).toEqual([[0, "user"], [1, "assistant"], [2, "user"], [3, "assistant"]])
  }, 30_000)

  it("a stop string that straddles two token events ends the reply before it, as sent and as stored", async () => {
    const turn = async (body: Record<string, unknown>) => {
      const created = await postJson(`${service.url}/v1/conversations`, { system_prompt: "Answer at length." })
      const { conversation_id: id } = (await created.json()) as { conversation_id: string }
      const events = await readSse(await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Tell me about rivers.", max_tokens: 48, temperature: 0, seed: 7, ...body }), () => undefined)
      return { id, events }
    }
    const free = await turn({})
    const deltas = free.events.filter((e) => e.event === "token").map((e) => e.data.text as string)
    // The last character of one event and the first of the next, whose first occurrence in
    // the reply is at that boundary: the stop string straddles two events.
    const text = deltas.join("")
    const ends = deltas.map((_, i) => deltas.slice(0, i + 1).join("").length)
    const k = ends.findIndex((end, i) => i >= 2 && i + 1 < deltas.length && text.indexOf(text.slice(end - 1, end + 1)) === end - 1)
    expect(k).toBeGreaterThan(0)
    const stop = text.slice(ends[k]! - 1, ends[k]! + 1)
    const expected = text.slice(0, ends[k]! - 1)

    const stopped = await turn({ stop: [stop, "\u0001never"] })
    const done = stopped.events.at(-1)!
    expect(done.event).toBe("done")
    expect(done.data.finish_reason).toBe("stop")
    expect(tokenText(stopped.events)).toBe(expected)
    const history = (await (await fetch(`${service.url}/v1/conversations/${stopped.id}`)).json()) as any
    expect(history.turns.at(-1).content).toBe(expected)
  }, 30_000)

  it("a user turn that cannot be stored is not acknowledged, stops its generation and leaves no row", async () => {
    // Fault injection in the real database: this one user text fails its INSERT.
    const failing = "e2e: this append fails"
    const sql = (statement: string) =>
      Effect.runPromise(Effect.flatMap(SqlClient.SqlClient, (client) => client.unsafe(statement)).pipe(Effect.provide(PgLive)))
    await sql(`CREATE OR REPLACE FUNCTION chat_e2e_fail_append() RETURNS trigger AS $$
      BEGIN IF NEW.content = '${failing}' THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql`)
    await sql(`CREATE OR REPLACE TRIGGER chat_e2e_fail_append BEFORE INSERT ON chat_turns
      FOR EACH ROW EXECUTE FUNCTION chat_e2e_fail_append()`)
    try {
      const created = await postJson(`${service.url}/v1/conversations`, { system_prompt: "Be brief." })
      const { conversation_id: id } = (await created.json()) as { conversation_id: string }
      const failed = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: failing, max_tokens: 3000 })
      expect(failed.status).toBe(503)
      expect(failed.headers.get("retry-after")).not.toBeNull()
      expect(((await failed.json()) as any).error.code).toBe("storage_unavailable")
      // Its generation was queued while the append ran: it is cancelled, its blocks freed.
      await waitForFreeBlocks(service)
      // The conversation is free again once that generation has ended (within a step or so).
      let next: Response
      for (let i = 0; ; i++) {
        next = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Hello", max_tokens: 4 })
        if (next.status !== 409 || i === 50) break
        await new Promise((r) => setTimeout(r, 20))
      }
      expect(next.status).toBe(200)
      const turn = await readSse(next, () => undefined)
      const done = turn.at(-1)!
      expect(done.event).toBe("done")
      // The failed text is in neither the prompt nor the history, whose seqs have no gap.
      const expectedPrompt = tokenizer.encode(tokenizer.renderChat([
        { role: "system", content: "Be brief." },
        { role: "user", content: "Hello" }
      ]))
      expect(done.data.usage.prompt_tokens).toBe(expectedPrompt.length)
      const history = (await (await fetch(`${service.url}/v1/conversations/${id}`)).json()) as any
      expect(history.turns.map((t: any) => [t.seq, t.role, t.content === failing])).toEqual([[0, "user", false], [1, "assistant", false]])
    } finally {
      await sql("DROP TRIGGER IF EXISTS chat_e2e_fail_append ON chat_turns")
      await sql("DROP FUNCTION IF EXISTS chat_e2e_fail_append()")
    }
  }, 30_000)

  it("a client that disconnects mid-stream cancels the generation and frees its blocks", async () => {
    const { conversation_id: id } = (await (await postJson(`${service.url}/v1/conversations`, {})).json()) as any
    const controller = new AbortController()
    const res = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Go on forever", max_tokens: 3000 }, controller.signal)
    const seen = await readSse(res, (e) => (e.event === "token" && Number(e.id?.split(":").at(-1)) >= 3 ? "stop" : undefined))
    controller.abort()
    expect(seen.filter((e) => e.event === "token").length).toBe(4)
    await waitForFreeBlocks(service)
    // The assistant turn is stored as cancelled once the stream is torn down.
    const deadline = Date.now() + 2000
    let history: any
    do {
      history = await (await fetch(`${service.url}/v1/conversations/${id}`)).json()
      if (history.turns.length === 2) break
      await new Promise((r) => setTimeout(r, 20))
    } while (Date.now() < deadline)
    expect(history.turns.map((t: any) => [t.role, t.status])).toEqual([["user", "completed"], ["assistant", "cancelled"]])
    expect(history.turns[1].num_completion_tokens).toBeGreaterThanOrEqual(4)
  })

  it("GET /stream follows the in-flight turn from its start, and resumes after a Last-Event-ID with every token once", async () => {
    const { conversation_id: id } = (await (await postJson(`${service.url}/v1/conversations`, {})).json()) as any
    expect((await fetch(`${service.url}/v1/conversations/${id}/stream`)).status).toBe(204) // nothing in flight
    const res = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Tell me more", max_tokens: 40 })
    expect(res.status).toBe(200)
    // A second reader (another tab) follows the same turn from its start.
    const follower = fetch(`${service.url}/v1/conversations/${id}/stream`).then((r) => {
      expect(r.headers.get("content-type")).toContain("text/event-stream")
      return readSse(r, () => undefined)
    })
    const original = await readSse(res, () => undefined)
    const followed = await follower
    const tokens = (events: ReadonlyArray<any>) => events.filter((e) => e.event === "token")
    expect(tokens(followed).map((e) => [e.id, e.data.text])).toEqual(tokens(original).map((e) => [e.id, e.data.text]))
    expect(followed.at(-1)!.event).toBe("done")
    // After the end, resuming from the 10th token replays the rest, by header or by query.
    const lastSeen = tokens(original)[9]!.id
    for (const r of [
      await fetch(`${service.url}/v1/conversations/${id}/stream`, { headers: { "last-event-id": lastSeen } }),
      await fetch(`${service.url}/v1/conversations/${id}/stream?last_event_id=${encodeURIComponent(lastSeen)}`)
    ]) {
      expect(r.status).toBe(200)
      const rest = await readSse(r, () => undefined)
      expect(tokens(rest).map((e) => e.id)).toEqual(tokens(original).slice(10).map((e) => e.id))
      expect(rest.at(-1)).toEqual(original.at(-1))
    }
    // Having seen the end, there is nothing more (EventSource stops on 204).
    expect((await fetch(`${service.url}/v1/conversations/${id}/stream`, { headers: { "last-event-id": original.at(-1)!.id! } })).status).toBe(204)
    // Ids of another conversation, or malformed, are 400; a turn never logged is 404.
    expect((await fetch(`${service.url}/v1/conversations/${id}/stream`, { headers: { "last-event-id": "conv_x:1:2" } })).status).toBe(400)
    const missing = await fetch(`${service.url}/v1/conversations/${id}/stream`, { headers: { "last-event-id": `${id}:99:0` } })
    expect(missing.status).toBe(404)
    expect(((await missing.json()) as any).error.code).toBe("stream_not_found")
    // A Last-Event-ID past the live turn's end (an id never sent) gets the turn's end when it
    // comes, not a stream closed without one.
    const live = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "And more", max_tokens: 2000 })
    let beyond: Promise<Array<SseEvent>> | undefined
    await readSse(live, async (e) => {
      if (beyond !== undefined || e.event !== "token") return
      const r = await fetch(`${service.url}/v1/conversations/${id}/stream`, { headers: { "last-event-id": `${e.id!.slice(0, e.id!.lastIndexOf(":"))}:999999` } })
      expect(r.status).toBe(200)
      beyond = readSse(r, () => undefined)
      expect((await fetch(`${service.url}/v1/conversations/${id}/cancel`, { method: "POST" })).status).toBe(204)
    })
    const events = await beyond!
    expect(events.filter((e) => e.event === "token")).toEqual([])
    expect(events.at(-1)!.event).toBe("done")
  })

  it("a turn re-sent with its Idempotency-Key gets that turn's stream back, never a second turn; the key with another message is a 422", async () => {
    const { conversation_id: id } = (await (await postJson(`${service.url}/v1/conversations`, {})).json()) as any
    const send = (headers: Record<string, string>, content = "Once only") =>
      fetch(`${service.url}/v1/conversations/${id}/turns`, {
        method: "POST",
        headers: { "content-type": "application/json", ...headers },
        body: JSON.stringify({ role: "user", content, max_tokens: 40 })
      })
    const first = await send({ "idempotency-key": "k-1" })
    expect(first.status).toBe(200)
    const firstEvents = await readSse(first, () => undefined)
    const tokens = (events: ReadonlyArray<any>) => events.filter((e) => e.event === "token")
    // Re-sent: the same turn, whole, or after a Last-Event-ID.
    const again = await readSse(await send({ "idempotency-key": "k-1" }), () => undefined)
    expect(tokens(again).map((e) => [e.id, e.data.text])).toEqual(tokens(firstEvents).map((e) => [e.id, e.data.text]))
    expect(again.at(-1)).toEqual(firstEvents.at(-1))
    const rest = await readSse(await send({ "idempotency-key": "k-1", "last-event-id": tokens(firstEvents)[4]!.id }), () => undefined)
    expect(tokens(rest).map((e) => e.id)).toEqual(tokens(firstEvents).slice(5).map((e) => e.id))
    // The key with another message is a client's mistake, not a retry: 422, nothing stored.
    const reused = await send({ "idempotency-key": "k-1" }, "Something else")
    expect(reused.status).toBe(422)
    expect(((await reused.json()) as any).error.code).toBe("idempotency_key_reused")
    const history = (await (await fetch(`${service.url}/v1/conversations/${id}`)).json()) as any
    expect(history.turns.map((t: any) => [t.seq, t.role])).toEqual([[0, "user"], [1, "assistant"]])
    // Sent ten times at once, before any copy is stored: one turn, and every copy streams it.
    const parallel = await Promise.all(Array.from({ length: 10 }, () => send({ "idempotency-key": "k-3" }, "At once")))
    expect(parallel.map((r) => r.status)).toEqual(parallel.map(() => 200))
    const streamed = await Promise.all(parallel.map((r) => readSse(r, () => undefined)))
    for (const events of streamed) expect(events.at(-1)).toEqual(streamed[0]!.at(-1))
    // Reused while its turn streams, the key with another message is refused too.
    const busy = await send({ "idempotency-key": "k-4" }, "Long one")
    const whileBusy = await send({ "idempotency-key": "k-4" }, "Not the long one")
    expect(whileBusy.status).toBe(422)
    await whileBusy.body?.cancel()
    expect((await readSse(busy, () => undefined)).at(-1)!.event).toBe("done")
    // Another key is another turn.
    const other = await send({ "idempotency-key": "k-2" })
    expect((await readSse(other, () => undefined)).at(-1)!.event).toBe("done")
    const after = (await (await fetch(`${service.url}/v1/conversations/${id}`)).json()) as any
    expect(after.turns.length).toBe(8)
  })

  it("answers bad requests with JSON errors and changes nothing", async () => {
    const missing = await postJson(`${service.url}/v1/conversations/conv_doesnotexist/turns`, { role: "user", content: "hi" })
    expect(missing.status).toBe(404)
    expect(((await missing.json()) as any).error.code).toBe("conversation_not_found")
    const { conversation_id: id } = (await (await postJson(`${service.url}/v1/conversations`, {})).json()) as any
    for (const body of [{ role: "user" }, { role: "assistant", content: "x" }, { role: "user", content: "x", max_tokens: 0 }]) {
      const bad = await postJson(`${service.url}/v1/conversations/${id}/turns`, body)
      expect(bad.status).toBe(400)
      expect(((await bad.json()) as any).error.code).toBe("invalid_request")
    }
    const unknownModel = await postJson(`${service.url}/v1/conversations`, { model: "no-such-pool" })
    expect(unknownModel.status).toBe(404)
    const history = (await (await fetch(`${service.url}/v1/conversations/${id}`)).json()) as any
    expect(history.turns).toEqual([])
    expect(history.next_cursor).toBeNull()
  })
})

describe("embedded default (PGlite) keeps its data across restarts", () => {
  it("serves a turn, restarts on the same data directory, and still has the history", async () => {
    assertEngineBuilt()
    const env = { DATABASE_URL: undefined }
    let service = await startService({ env })
    let id: string
    try {
      id = ((await (await postJson(`${service.url}/v1/conversations`, {})).json()) as any).conversation_id
      const events = await readSse(await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Remember me", max_tokens: 8 }), () => undefined)
      expect(events.at(-1)!.event).toBe("done")
    } finally {
      await service.stop()
    }
    service = await startService({ env, dataDir: service.dataDir })
    try {
      const history = (await (await fetch(`${service.url}/v1/conversations/${id}`)).json()) as any
      expect(history.turns.map((t: any) => [t.role, t.content.length > 0])).toEqual([["user", true], ["assistant", true]])
      expect(history.turns[0].content).toBe("Remember me")
      // The restarted runner loads the conversation from the store: the next turn continues
      // its numbering (seq 2 and 3, no gap).
      const next = await readSse(await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Still there?", max_tokens: 4 }), () => undefined)
      expect(next.at(-1)!.event).toBe("done")
      const after = (await (await fetch(`${service.url}/v1/conversations/${id}`)).json()) as any
      expect(after.turns.map((t: any) => [t.seq, t.role])).toEqual([[0, "user"], [1, "assistant"], [2, "user"], [3, "assistant"]])
    } finally {
      await service.stop()
    }
  }, 180_000)
})
