import * as ConversationCache from "../../src/runtime/ConversationCache.js"
import { HttpServer } from "@effect/platform"
import { describe, expect, it } from "@effect/vitest"
import { ConfigProvider, Duration, Effect, Exit, Layer, Scope } from "effect"
import * as Http from "node:http"
import * as Net from "node:net"
import { exportJWK, generateKeyPair, SignJWT } from "jose"
import { mkdtempSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import path from "node:path"
import * as Auth from "../../src/http/Auth.js"
import * as Metrics from "../../src/runtime/Metrics.js"
import * as RunnerStatus from "../../src/runtime/RunnerStatus.js"
import { GpuWorkers } from "../../src/runtime/GpuWorkers.js"
import { Models } from "../../src/runtime/Models.js"
import * as Edge from "../../src/http/Edge.js"
import * as RateLimits from "../../src/http/RateLimits.js"
import { RateLimiter } from "@effect/experimental"
import * as Topology from "../../src/runtime/Topology.js"
import clusterConfig from "../../cluster.config.js"
import * as Server from "../../src/http/Server.js"
import { SseSettings } from "../../src/http/Sse.js"
import * as Fake from "../support/fakeConversations.js"

interface Ctx {
  readonly url: string
  readonly control: Fake.FakeControl
}

interface Options {
  readonly limits?: Server.ConnectionLimits
  readonly keys?: ReadonlyArray<string>
  /** Auth configuration as environment variables (instead of `keys`). */
  readonly env?: Record<string, string>
  readonly corsOrigins?: ReadonlyArray<string>
  readonly keepAlive?: Duration.DurationInput
  readonly fake?: Fake.FakeOptions
}

/** What the operator routes see: one runner with one GPU. */
const opsRunners: ReadonlyArray<RunnerStatus.RunnerState> = [{
  state: "up",
  updated_at_ms: 0,
  status: {
    runner: "local", roles: ["gateway", "gpu"], region: "local", pid: 1, num_shards: 8, num_entities: 2, num_streams: 0, draining: false,
    gpus: [{ gpu_id: "gpu0", engine_up: true, num_running: 1, num_waiting: 0, num_used_blocks: 3, num_blocks: 64 }]
  }
}]
const drainRequests: Array<string> = []

/** Authentication from `env` (API_KEYS, JWT_SECRET, …) and rate limits in memory, with the default topology's tiers. */
const authLayer = (env: Record<string, string>) =>
  RateLimits.layer.pipe(
    Layer.provideMerge(Auth.layerConfig),
    Layer.provideMerge(Metrics.layer),
    // The fake conversations run no GPU: the metrics have no GPU gauges to read.
    Layer.provide(Layer.succeed(GpuWorkers, { get: () => undefined, all: [], drain: () => Effect.succeed(0) })),
    Layer.provide(Layer.succeed(Models, { get: () => undefined })),
    Layer.provide(ConversationCache.layerNone),
    Layer.provide(RateLimiter.layerStoreMemory),
    Layer.provideMerge(Topology.layer(clusterConfig)),
    Layer.provideMerge(RunnerStatus.layerViewMemory(opsRunners, drainRequests)),
    Layer.provide(Layer.setConfigProvider(ConfigProvider.fromMap(new Map(Object.entries(env)))))
  )

/** Runs `body` against a real Node HTTP server on a random port, backed by the fake. */
const withServer = (options: Options, body: (ctx: Ctx) => Promise<void>) =>
  Effect.gen(function*() {
    const server = yield* HttpServer.HttpServer
    const address = server.address
    if (address._tag !== "TcpAddress") throw new Error("expected a TCP address")
    const control = yield* Fake.FakeConversationsControl
    const url = `http://127.0.0.1:${address.port}`
    yield* Effect.promise(() => body({ url, control }))
  }).pipe(
    Effect.provide(
      Server.layerTestWith(options.limits).pipe(
        Layer.provideMerge(Fake.layer(options.fake ?? {})),
        Layer.provide(authLayer(options.env ?? (options.keys === undefined ? {} : { API_KEYS: options.keys.join(",") }))),
        Layer.provide(SseSettings.layer({ keepAliveInterval: options.keepAlive ?? Duration.seconds(15) })),
        Layer.provide(Edge.CorsSettings.layer(options.corsOrigins ?? []))
      )
    )
  )


interface SseEvent {
  readonly event: string | undefined
  readonly id: string | undefined
  readonly data: unknown
}

/** Parses an SSE body: events (data JSON-decoded) and comment lines. */
const parseSse = (body: string) => {
  const events: Array<SseEvent> = []
  const comments: Array<string> = []
  for (const block of body.split("\n\n")) {
    if (block === "") continue
    let event: string | undefined
    let id: string | undefined
    const data: Array<string> = []
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) comments.push(line.slice(1).trim())
      else if (line.startsWith("event: ")) event = line.slice(7)
      else if (line.startsWith("id: ")) id = line.slice(4)
      else if (line.startsWith("data: ")) data.push(line.slice(6))
      else throw new Error(`unexpected SSE line: ${JSON.stringify(line)}`)
    }
    if (event !== undefined || data.length > 0) {
      expect(data.length).toBe(1) // JSON payloads are always one line
      events.push({ event, id, data: JSON.parse(data[0]!) })
    }
  }
  return { events, comments }
}

const json = (url: string, init: { method?: string; body?: unknown; headers?: Record<string, string> } = {}) =>
  fetch(url, {
    method: init.method ?? "POST",
    headers: { "content-type": "application/json", ...init.headers },
    ...(init.body === undefined ? {} : { body: typeof init.body === "string" ? init.body : JSON.stringify(init.body) })
  })

const create = async (url: string, headers: Record<string, string> = {}): Promise<string> => {
  const response = await json(`${url}/v1/conversations`, { body: {}, headers })
  expect(response.status).toBe(201)
  const body = await response.json() as { conversation_id: string }
  return body.conversation_id
}

const expectError = async (response: Response, status: number, code: string) => {
  expect(response.status).toBe(status)
  expect(response.headers.get("content-type")).toMatch(/^application\/json/)
  const body = await response.json() as { error: { code: string; message: string } }
  expect(Object.keys(body)).toEqual(["error"])
  expect(Object.keys(body.error).sort()).toEqual(["code", "message", "param", "type"])
  expect(body.error.code).toBe(code)
  // OpenAI's shape: its clients read `type` and `param` too.
  expect((body.error as any).type).toBe(status === 401 ? "authentication_error" : status === 403 ? "permission_error" : status >= 500 ? "server_error" : status === 429 ? "rate_limit_exceeded" : "invalid_request_error")
  expect((body.error as any).param).toBeNull()
  expect(typeof body.error.message).toBe("string")
  expect(body.error.message.length).toBeGreaterThan(0)
  return body.error
}

/** Reads an SSE response until `predicate` holds on the text received so far. */
const readUntil = async (
  reader: ReadableStreamDefaultReader<Uint8Array>,
  predicate: (text: string) => boolean,
  decoder = new TextDecoder()
): Promise<string> => {
  let text = ""
  while (!predicate(text)) {
    const { done, value } = await reader.read()
    if (done) break
    text += decoder.decode(value, { stream: true })
  }
  return text
}

describe("HTTP API", () => {
  it.live("healthz and openapi", () =>
    withServer({}, async ({ url }) => {
      const health = await fetch(`${url}/healthz`)
      expect(health.status).toBe(200)
      expect(await health.json()).toEqual({ status: "ok" })
      const spec = await fetch(`${url}/openapi.json`)
      expect(spec.status).toBe(200)
      const doc = await spec.json() as { paths: Record<string, unknown> }
      expect(Object.keys(doc.paths)).toContain("/v1/conversations/{id}/turns")
    }))

  it.live("create → 201 {conversation_id, model, region}; empty body allowed; unknown model → 404", () =>
    withServer({}, async ({ url }) => {
      const response = await json(`${url}/v1/conversations`, { body: { model: "tiny", system_prompt: "be brief" } })
      expect(response.status).toBe(201)
      const body = await response.json() as Record<string, unknown>
      expect(Object.keys(body)).toEqual(["conversation_id", "model", "region"])
      expect(body.conversation_id).toMatch(/^conv_[0-9a-f]{32}$/)
      expect(body.model).toBe("tiny")

      const empty = await fetch(`${url}/v1/conversations`, { method: "POST" })
      expect(empty.status).toBe(201)
      const second = await empty.json() as { conversation_id: string }
      expect(second.conversation_id).not.toBe(body.conversation_id)

      await expectError(await json(`${url}/v1/conversations`, { body: { model: "missing" } }), 404, "model_not_found")
      await expectError(await json(`${url}/v1/conversations`, { body: { model: "" } }), 400, "invalid_request")
    }))

  it.live("turn → SSE token events with ids, done with usage, headers", () =>
    withServer({ fake: { tokens: 5, tokenDelay: 5 } }, async ({ url }) => {
      const id = await create(url)
      const content = "hello there"
      const response = await json(`${url}/v1/conversations/${id}/turns`, { body: { role: "user", content } })
      expect(response.status).toBe(200)
      expect(response.headers.get("content-type")).toBe("text/event-stream; charset=utf-8")
      expect(response.headers.get("cache-control")).toBe("no-cache")
      expect(response.headers.get("x-accel-buffering")).toBe("no")
      expect(response.headers.get("connection")).toBe("keep-alive")
      const text = await response.text()
      const { events } = parseSse(text)
      expect(events.map((e) => e.event)).toEqual(["token", "token", "token", "token", "token", "done"])
      expect(events.map((e) => e.id)).toEqual(["0", "1", "2", "3", "4", "5"])
      expect(events.slice(0, 5).map((e) => e.data)).toEqual([0, 1, 2, 3, 4].map((i) => ({ text: Fake.tokenText(i) })))
      // the newline inside token 1 is JSON-escaped, not raw
      expect(text).toContain(`data: {"text":"multi\\nline \\"quoted\\"\\r\\n"}\n\n`)
      expect(events[5]!.data).toEqual({
        turn_id: `${id}:1`,
        finish_reason: "stop",
        usage: { prompt_tokens: content.length, completion_tokens: 5, prompt_tokens_details: { cached_tokens: 0 } }
      })
      expect(text.endsWith("\n\n")).toBe(true)

      // max_tokens below the fake's count → finish_reason length
      const limited = await json(`${url}/v1/conversations/${id}/turns`, {
        body: { role: "user", content: "again", max_tokens: 2 }
      })
      const limitedEvents = parseSse(await limited.text()).events
      expect(limitedEvents.map((e) => e.event)).toEqual(["token", "token", "done"])
      expect(limitedEvents[2]).toEqual({
        event: "done",
        id: "2",
        data: { turn_id: `${id}:3`, finish_reason: "length", usage: { prompt_tokens: 5, completion_tokens: 2, prompt_tokens_details: { cached_tokens: 0 } } }
      })
    }))

  it.live("unknown conversation → 404 conversation_not_found on every route", () =>
    withServer({}, async ({ url }) => {
      const missing = "conv_does_not_exist"
      await expectError(
        await json(`${url}/v1/conversations/${missing}/turns`, { body: { role: "user", content: "hi" } }),
        404,
        "conversation_not_found"
      )
      await expectError(await json(`${url}/v1/conversations/${missing}/cancel`), 404, "conversation_not_found")
      await expectError(await fetch(`${url}/v1/conversations/${missing}`), 404, "conversation_not_found")
    }))

  it.live("second turn while streaming → 409 turn_in_progress", () =>
    withServer({ fake: { tokens: 50, tokenDelay: 20 } }, async ({ url, control }) => {
      const id = await create(url)
      const first = await json(`${url}/v1/conversations/${id}/turns`, { body: { role: "user", content: "one" } })
      expect(first.status).toBe(200)
      const reader = first.body!.getReader()
      await readUntil(reader, (t) => t.includes("event: token"))
      await expectError(
        await json(`${url}/v1/conversations/${id}/turns`, { body: { role: "user", content: "two" } }),
        409,
        "turn_in_progress"
      )
      await reader.cancel()
      await Effect.runPromise(control.waitForEnd((e) => e.conversation_id === id))
    }))

  it.live("bad requests → 400 invalid_request", () =>
    withServer({}, async ({ url }) => {
      const id = await create(url)
      const turns = `${url}/v1/conversations/${id}/turns`
      const missing = await expectError(await json(turns, { body: { role: "user" } }), 400, "invalid_request")
      expect(missing.message).toBe("Invalid request: content: is missing")
      await expectError(await json(turns, { body: { role: "assistant", content: "x" } }), 400, "invalid_request")
      await expectError(await json(turns, { body: { role: "user", content: "" } }), 400, "invalid_request")
      await expectError(await json(turns, { body: { role: "user", content: "a\u0000b" } }), 400, "invalid_request")
      await expectError(await json(`${url}/v1/conversations`, { body: { system_prompt: "\u0000" } }), 400, "invalid_request")
      await expectError(await json(turns, { body: { role: "user", content: "x", max_tokens: 0 } }), 400, "invalid_request")
      await expectError(await json(turns, { body: { role: "user", content: "x", max_tokens: 1.5 } }), 400, "invalid_request")
      const nonJson = await expectError(await json(turns, { body: "{not json" }), 400, "invalid_request")
      expect(nonJson.message).toMatch(/JSON/)
      await expectError(await json(turns), 400, "invalid_request") // empty body
      const form = await expectError(
        await json(turns, { body: "role=user&content=x", headers: { "content-type": "application/x-www-form-urlencoded" } }),
        400,
        "invalid_request"
      )
      expect(form.message).toMatch(/Content-Type must be application\/json/)
      // A structured +json type is refused at once too (the body decoder waited for ever on it).
      for (const type of ["application/vnd.api+json", "application/merge-patch+json"]) {
        const res = await fetch(turns, { method: "POST", headers: { "content-type": type }, body: '{"role":"user","content":"x"}', signal: AbortSignal.timeout(5000) })
        await expectError(res, 400, "invalid_request")
      }
      const charset = await json(turns, {
        body: { role: "user", content: "x" },
        headers: { "content-type": "application/json; charset=utf-8" }
      })
      expect(charset.status).toBe(200)
      await charset.text()
      await expectError(
        await json(`${url}/v1/conversations/bad%20id!/turns`, { body: { role: "user", content: "x" } }),
        400,
        "invalid_request"
      )
      const history = `${url}/v1/conversations/${id}`
      const limit = await expectError(await fetch(`${history}?limit=0`), 400, "invalid_request")
      expect(limit.message).toMatch(/^Invalid request: limit: /)
      await expectError(await fetch(`${history}?limit=201`), 400, "invalid_request")
      await expectError(await fetch(`${history}?limit=abc`), 400, "invalid_request")
      await expectError(await fetch(`${history}?before=-1`), 400, "invalid_request")
      // the rejected requests stored nothing: only the accepted charset turn is there
      const page = await (await fetch(history)).json() as { turns: Array<{ role: string; content: string }> }
      expect(page.turns.map((t) => [t.role, t.content])).toEqual([["user", "x"], ["assistant", "tok0 multi\nline \"quoted\"\r\ntok2 tok3 tok4 "]])
    }))

  it.live("sendTurn failures before the stream → JSON errors", () =>
    withServer({}, async ({ url }) => {
      const id = await create(url)
      const turns = `${url}/v1/conversations/${id}/turns`
      await expectError(await json(turns, { body: { role: "user", content: "!too_long" } }), 400, "prompt_too_long")
      await expectError(await json(turns, { body: { role: "user", content: "!engine_error" } }), 503, "engine_error")
    }))

  it.live("cancel → 204, and the stream ends with done finish_reason cancelled", () =>
    withServer({ fake: { tokens: 100, tokenDelay: 20 } }, async ({ control, url }) => {
      const id = await create(url)
      const response = await json(`${url}/v1/conversations/${id}/turns`, { body: { role: "user", content: "long" } })
      const reader = response.body!.getReader()
      const decoder = new TextDecoder()
      let text = await readUntil(reader, (t) => (t.match(/event: token/g) ?? []).length >= 2, decoder)
      const cancel = await json(`${url}/v1/conversations/${id}/cancel`)
      expect(cancel.status).toBe(204)
      expect(await cancel.text()).toBe("")
      text += await readUntil(reader, () => false, decoder)
      const { events } = parseSse(text)
      const last = events[events.length - 1]!
      expect(last.event).toBe("done")
      const done = last.data as { finish_reason: string; usage: { completion_tokens: number } }
      expect(done.finish_reason).toBe("cancelled")
      const tokenCount = events.filter((e) => e.event === "token").length
      expect(tokenCount).toBeGreaterThanOrEqual(2)
      expect(tokenCount).toBeLessThan(100)
      expect(done.usage.completion_tokens).toBe(tokenCount)
      expect(last.id).toBe(String(tokenCount))
      expect(await Effect.runPromise(control.cancelCalls)).toEqual([id])
      expect((await Effect.runPromise(control.ends)).map((e) => e.how)).toEqual(["cancelled"])
      // cancel with nothing running is fine
      expect((await json(`${url}/v1/conversations/${id}/cancel`)).status).toBe(204)
    }))

  it.live("client disconnect (fetch abort) interrupts the generation within 1 s", () =>
    withServer({ fake: { tokens: 1000, tokenDelay: 10 } }, async ({ control, url }) => {
      const id = await create(url)
      const abort = new AbortController()
      const response = await fetch(`${url}/v1/conversations/${id}/turns`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ role: "user", content: "go" }),
        signal: abort.signal
      })
      const reader = response.body!.getReader()
      await readUntil(reader, (t) => t.includes("event: token"))
      const abortedAt = Date.now()
      abort.abort()
      const end = await Effect.runPromise(control.waitForEnd((e) => e.conversation_id === id, Duration.seconds(1)))
      expect(end.how).toBe("interrupted")
      expect(end.at_ms - abortedAt).toBeLessThan(1000)
      // @effect/platform-node's `close` listener aborts the response pipe, which destroys the
      // TurnStream, which interrupts the generation
      expect(end.interruptors.length).toBeGreaterThan(0)
      expect(await Effect.runPromise(control.cancelCalls)).toEqual([]) // interruption, not a cancel call
      expect(await Effect.runPromise(control.isActive(id))).toBe(false)
      // the conversation is usable again and the interrupted turn is recorded as cancelled
      const page = await (await fetch(`${url}/v1/conversations/${id}`)).json() as {
        turns: Array<{ role: string; status: string }>
      }
      expect(page.turns.map((t) => [t.role, t.status])).toEqual([["user", "completed"], ["assistant", "cancelled"]])
    }))

  it.live("client disconnect (socket destroyed) interrupts the generation within 1 s", () =>
    withServer({ fake: { tokens: 1000, tokenDelay: 10 } }, async ({ control, url }) => {
      const id = await create(url)
      const destroyedAt = await new Promise<number>((resolve, reject) => {
        const request = Http.request(`${url}/v1/conversations/${id}/turns`, {
          method: "POST",
          headers: { "content-type": "application/json" }
        }, (response) => {
          expect(response.statusCode).toBe(200)
          response.once("data", () => {
            const at = Date.now()
            request.destroy()
            resolve(at)
          })
        })
        request.on("error", (error) => {
          if ((error as NodeJS.ErrnoException).code !== "ECONNRESET") reject(error)
        })
        request.end(JSON.stringify({ role: "user", content: "go" }))
      })
      const end = await Effect.runPromise(control.waitForEnd((e) => e.conversation_id === id, Duration.seconds(1)))
      expect(end.how).toBe("interrupted")
      expect(end.at_ms - destroyedAt).toBeLessThan(1000)
      expect(end.interruptors.length).toBeGreaterThan(0)
    }))

  it.live("server shutdown with a stream open closes it and interrupts the generation", () =>
    Effect.gen(function*() {
      const scope = yield* Scope.make()
      const context = yield* Layer.buildWithScope(
        Server.layerTest.pipe(
          Layer.provideMerge(Fake.layer({ tokens: 1000, tokenDelay: 10 })),
          Layer.provide(authLayer({}))
        ),
        scope
      )
      const address = (yield* Effect.provide(HttpServer.HttpServer, context)).address
      if (address._tag !== "TcpAddress") throw new Error("expected a TCP address")
      const control = yield* Effect.provide(Fake.FakeConversationsControl, context)
      const url = `http://127.0.0.1:${address.port}`
      const id = yield* Effect.promise(() => create(url))
      const reader = yield* Effect.promise(async () => {
        const response = await json(`${url}/v1/conversations/${id}/turns`, { body: { role: "user", content: "x" } })
        const reader = response.body!.getReader()
        await readUntil(reader, (t) => t.includes("event: token"))
        return reader
      })
      const started = Date.now()
      yield* Scope.close(scope, Exit.void).pipe(Effect.timeout(Duration.seconds(2)))
      expect(Date.now() - started).toBeLessThan(2000)
      const end = yield* control.waitForEnd((e) => e.conversation_id === id)
      expect(end.how).toBe("interrupted")
      // the client sees the connection end without a terminal event
      const rest = yield* Effect.promise(() => readUntil(reader, () => false).catch(() => "<reset>"))
      expect(rest).not.toContain("event: done")
    }))

  it.live("a failing generation ends with event: error, never silently", () =>
    withServer({ fake: { tokens: 3, tokenDelay: 2 } }, async ({ url }) => {
      const id = await create(url)
      const turns = `${url}/v1/conversations/${id}/turns`

      const failed = parseSse(await (await json(turns, { body: { role: "user", content: "!fail_stream" } })).text())
      expect(failed.events.map((e) => e.event)).toEqual(["token", "token", "error"])
      expect(failed.events[2]!.id).toBeUndefined()
      expect(failed.events[2]!.data).toEqual({ error: { code: "engine_error", message: "step_failed: engine step failed" } })

      const noDone = parseSse(await (await json(turns, { body: { role: "user", content: "!no_done" } })).text())
      expect(noDone.events.map((e) => e.event)).toEqual(["token", "token", "token", "error"])
      expect((noDone.events[3]!.data as { error: { code: string } }).error.code).toBe("internal")

      const defect = parseSse(await (await json(turns, { body: { role: "user", content: "!defect" } })).text())
      expect(defect.events.map((e) => e.event)).toEqual(["token", "error"])
      expect((defect.events[1]!.data as { error: { code: string } }).error.code).toBe("internal")
    }))

  it.live("keep-alive comments while the stream is idle", () =>
    withServer({ keepAlive: Duration.millis(40), fake: { tokens: 2, tokenDelay: 150 } }, async ({ url }) => {
      const id = await create(url)
      const text = await (await json(`${url}/v1/conversations/${id}/turns`, { body: { role: "user", content: "x" } }))
        .text()
      const { comments, events } = parseSse(text)
      expect(events.map((e) => e.event)).toEqual(["token", "token", "done"])
      // The first comment goes out with the headers, at once; then keep-alives.
      expect(comments[0]).toBe("accepted")
      expect(comments.slice(1).every((c) => c === "keep-alive")).toBe(true)
      // ~300 ms of idle time at 40 ms → several comments, and at least one before the first token
      expect(comments.length).toBeGreaterThanOrEqual(4)
      expect(text.indexOf(": keep-alive\n\n")).toBeLessThan(text.indexOf("event: token"))
    }))

  it.live("no keep-alive comments when tokens flow faster than the interval", () =>
    withServer({ keepAlive: Duration.millis(200), fake: { tokens: 10, tokenDelay: 5 } }, async ({ url }) => {
      const id = await create(url)
      const text = await (await json(`${url}/v1/conversations/${id}/turns`, { body: { role: "user", content: "x" } }))
        .text()
      expect(parseSse(text).comments).toEqual(["accepted"])
    }))

  it.live("history paging with before/limit", () =>
    withServer({ fake: { tokens: 2, tokenDelay: 1 } }, async ({ url }) => {
      const id = await create(url)
      for (const content of ["first", "second"]) {
        const response = await json(`${url}/v1/conversations/${id}/turns`, { body: { role: "user", content } })
        expect(parseSse(await response.text()).events.at(-1)!.event).toBe("done")
      }
      const all = await (await fetch(`${url}/v1/conversations/${id}`)).json() as {
        turns: Array<{ seq: number; role: string; content: string; turn_id: string }>
        next_cursor: string | null
      }
      expect(all.turns.map((t) => t.seq)).toEqual([0, 1, 2, 3])
      expect(all.turns.map((t) => t.role)).toEqual(["user", "assistant", "user", "assistant"])
      expect(all.turns[2]!.content).toBe("second")
      expect(all.turns[1]!.turn_id).toBe(`${id}:1`)
      expect(all.next_cursor).toBeNull()

      const page1 = await (await fetch(`${url}/v1/conversations/${id}?limit=3`)).json() as typeof all
      expect(page1.turns.map((t) => t.seq)).toEqual([1, 2, 3])
      expect(page1.next_cursor).toBe("1")
      const page2 = await (await fetch(`${url}/v1/conversations/${id}?limit=3&before=${page1.next_cursor}`))
        .json() as typeof all
      expect(page2.turns.map((t) => t.seq)).toEqual([0])
      expect(page2.next_cursor).toBeNull()
    }))

  it.live("auth: with API keys, missing or wrong bearer → 401; right bearer → 200", () =>
    withServer({ keys: ["key-one", "key-two"] }, async ({ url }) => {
      const missing = await expectError(await json(`${url}/v1/conversations`, { body: {} }), 401, "unauthorized")
      expect(missing.message).toMatch(/bearer/i)
      await expectError(
        await json(`${url}/v1/conversations`, { body: {}, headers: { authorization: "Bearer nope" } }),
        401,
        "unauthorized"
      )
      await expectError(
        await json(`${url}/v1/conversations`, { body: {}, headers: { authorization: "Basic key-one" } }),
        401,
        "unauthorized"
      )
      // authentication comes before body validation
      await expectError(await json(`${url}/v1/conversations`, { body: "{bad" }), 401, "unauthorized")
      const id = await create(url, { authorization: "Bearer key-two" })
      const history = await fetch(`${url}/v1/conversations/${id}`, { headers: { authorization: "Bearer key-two" } })
      expect(history.status).toBe(200)
      await expectError(await fetch(`${url}/v1/conversations/${id}`), 401, "unauthorized")
      // Each key is its own user: another key's conversation does not exist for it, on every route.
      const other = { authorization: "Bearer key-one" }
      await expectError(await fetch(`${url}/v1/conversations/${id}`, { headers: other }), 404, "conversation_not_found")
      await expectError(await json(`${url}/v1/conversations/${id}/turns`, { body: { role: "user", content: "hi" }, headers: other }), 404, "conversation_not_found")
      await expectError(await json(`${url}/v1/conversations/${id}/cancel`, { body: {}, headers: other }), 404, "conversation_not_found")
      await expectError(await fetch(`${url}/v1/conversations/${id}/stream`, { headers: other }), 404, "conversation_not_found")
      // health checks stay open
      expect((await fetch(`${url}/healthz`)).status).toBe(200)
    }))

  it.live("operator routes: admin keys only (403 otherwise); status lists runners, pools and series; drain of a known runner → 202", () =>
    withServer({ env: { API_KEYS: "user-key", ADMIN_API_KEYS: "admin-key" } }, async ({ url }) => {
      const user = { authorization: "Bearer user-key" }
      const admin = { authorization: "Bearer admin-key" }
      await expectError(await fetch(`${url}/v1/ops/status`), 401, "unauthorized")
      await expectError(await fetch(`${url}/v1/ops/status`, { headers: user }), 403, "forbidden")
      await expectError(await json(`${url}/v1/ops/runners/local/drain`, { headers: user }), 403, "forbidden")
      expect(drainRequests).toEqual([])
      const response = await fetch(`${url}/v1/ops/status`, { headers: admin })
      expect(response.status).toBe(200)
      const status = await response.json() as { runners: Array<{ state: string; status: { runner: string } }>; pools: Record<string, Array<string>>; metrics: Array<{ name: string }>; recent_errors: Array<unknown> }
      expect(status.runners.map((r) => [r.status.runner, r.state])).toEqual([["local", "up"]])
      expect(Object.keys(status.pools).length).toBeGreaterThan(0)
      expect(status.metrics.map((m) => m.name)).toContain("time_to_first_token_seconds")
      expect(status.recent_errors).toEqual([])
      await expectError(await json(`${url}/v1/ops/runners/nope/drain`, { headers: admin }), 404, "runner_not_found")
      await expectError(await json(`${url}/v1/ops/runners/${"x".repeat(70)}/drain`, { headers: admin }), 400, "invalid_request")
      const drained = await json(`${url}/v1/ops/runners/local/drain`, { headers: admin })
      expect(drained.status).toBe(202)
      expect(await drained.json()).toEqual({ runner: "local", drain_requested: true })
      expect(drainRequests).toEqual(["local"])
    }))

  it.live("auth: JWTs (HS256) give user, tier and org; expired, forged, subjectless or unknown-tier tokens → 401", () => {
    const secret = "a-test-secret-of-at-least-32-bytes!!"
    const sign = (claims: Record<string, unknown>, options: { key?: string; exp?: number } = {}) =>
      new SignJWT(claims).setProtectedHeader({ alg: "HS256" }).setIssuedAt().setExpirationTime(options.exp ?? "5m")
        .sign(new TextEncoder().encode(options.key ?? secret))
    return withServer({ env: { JWT_SECRET: secret, API_KEYS: "dev-key=alice:paid" } }, async ({ url }) => {
      const alice = { authorization: `Bearer ${await sign({ sub: "alice", tier: "paid", org: "acme" })}` }
      const id = await create(url, alice)
      expect((await fetch(`${url}/v1/conversations/${id}`, { headers: alice })).status).toBe(200)
      // The API key mapped to alice is the same user.
      expect((await fetch(`${url}/v1/conversations/${id}`, { headers: { authorization: "Bearer dev-key" } })).status).toBe(200)
      const bob = { authorization: `Bearer ${await sign({ sub: "bob" })}` }
      await expectError(await fetch(`${url}/v1/conversations/${id}`, { headers: bob }), 404, "conversation_not_found")
      const expired = await sign({ sub: "alice" }, { exp: Math.floor(Date.now() / 1000) - 60 })
      const e = await expectError(await fetch(`${url}/v1/conversations/${id}`, { headers: { authorization: `Bearer ${expired}` } }), 401, "unauthorized")
      expect(e.message).toMatch(/expired/)
      const forged = await sign({ sub: "alice" }, { key: "another-secret-that-is-32-bytes-long!!" })
      await expectError(await fetch(`${url}/v1/conversations/${id}`, { headers: { authorization: `Bearer ${forged}` } }), 401, "unauthorized")
      // A token with no expiry would be good for ever.
      const noExp = await new SignJWT({ sub: "alice" }).setProtectedHeader({ alg: "HS256" }).sign(new TextEncoder().encode(secret))
      await expectError(await fetch(`${url}/v1/conversations/${id}`, { headers: { authorization: `Bearer ${noExp}` } }), 401, "unauthorized")
      const noSub = await sign({ tier: "paid" })
      await expectError(await fetch(`${url}/v1/conversations/${id}`, { headers: { authorization: `Bearer ${noSub}` } }), 401, "unauthorized")
      const badTier = await sign({ sub: "alice", tier: "platinum" })
      await expectError(await fetch(`${url}/v1/conversations/${id}`, { headers: { authorization: `Bearer ${badTier}` } }), 401, "unauthorized")
      const unsigned = `${Buffer.from('{"alg":"none"}').toString("base64url")}.${Buffer.from('{"sub":"alice"}').toString("base64url")}.`
      await expectError(await fetch(`${url}/v1/conversations/${id}`, { headers: { authorization: `Bearer ${unsigned}` } }), 401, "unauthorized")
    })
  })

  it.live("every response has an x-request-id (the client's own when sane); CORS preflight and headers for configured origins only", () =>
    withServer({ corsOrigins: ["https://app.example"] }, async ({ url }) => {
      const plain = await fetch(`${url}/healthz`)
      expect(plain.headers.get("x-request-id")).toMatch(/^[0-9a-f-]{36}$/)
      expect((await fetch(`${url}/healthz`, { headers: { "x-request-id": "trace-42" } })).headers.get("x-request-id")).toBe("trace-42")
      expect((await fetch(`${url}/healthz`, { headers: { "x-request-id": "bad id\u00e9".repeat(10) } })).headers.get("x-request-id")).not.toMatch(/bad/)
      const notFound = await fetch(`${url}/nope`)
      expect(notFound.headers.get("x-request-id")).toBeTruthy()
      const preflight = await fetch(`${url}/v1/conversations`, {
        method: "OPTIONS",
        headers: { origin: "https://app.example", "access-control-request-method": "POST", "access-control-request-headers": "authorization, content-type" }
      })
      expect(preflight.status).toBe(204)
      expect(preflight.headers.get("access-control-allow-origin")).toBe("https://app.example")
      expect(preflight.headers.get("access-control-allow-headers")).toMatch(/authorization/)
      const created = await fetch(`${url}/v1/conversations`, { method: "POST", headers: { origin: "https://app.example", "content-type": "application/json" }, body: "{}" })
      expect(created.status).toBe(201)
      expect(created.headers.get("access-control-allow-origin")).toBe("https://app.example")
      expect(created.headers.get("access-control-expose-headers")).toMatch(/x-ratelimit-remaining-requests/)
      const otherOrigin = await fetch(`${url}/v1/conversations`, { method: "POST", headers: { origin: "https://evil.example", "content-type": "application/json" }, body: "{}" })
      // A browser on another origin is not allowed: the header never names it.
      expect(otherOrigin.headers.get("access-control-allow-origin")).not.toBe("https://evil.example")
    }))

  it.live("without CORS_ORIGINS no response carries Access-Control headers", () =>
    withServer({}, async ({ url }) => {
      const res = await fetch(`${url}/healthz`, { headers: { origin: "https://app.example" } })
      expect(res.headers.get("access-control-allow-origin")).toBeNull()
    }))

  it.live("auth: RS256 and ES256 JWTs verified with the keys of a JWKS file; a token signed by another key → 401", () =>
    Effect.gen(function*() {
      const rsa = yield* Effect.promise(() => generateKeyPair("RS256"))
      const ec = yield* Effect.promise(() => generateKeyPair("ES256"))
      const stranger = yield* Effect.promise(() => generateKeyPair("RS256"))
      const jwks = { keys: [{ ...(yield* Effect.promise(() => exportJWK(rsa.publicKey))), alg: "RS256", kid: "rsa" }, { ...(yield* Effect.promise(() => exportJWK(ec.publicKey))), alg: "ES256", kid: "ec" }] }
      const file = path.join(mkdtempSync(path.join(tmpdir(), "jwks-")), "jwks.json")
      writeFileSync(file, JSON.stringify(jwks))
      const sign = (alg: string, kid: string, key: Parameters<SignJWT["sign"]>[0], sub: string) =>
        new SignJWT({ tier: "paid" }).setProtectedHeader({ alg, kid }).setSubject(sub).setExpirationTime("5m").sign(key)
      const byRsa = yield* Effect.promise(() => sign("RS256", "rsa", rsa.privateKey, "rita"))
      const byEc = yield* Effect.promise(() => sign("ES256", "ec", ec.privateKey, "rita"))
      const byStranger = yield* Effect.promise(() => sign("RS256", "rsa", stranger.privateKey, "rita"))
      yield* withServer({ env: { JWT_JWKS_FILE: file } }, async ({ url }) => {
        const id = await create(url, { authorization: `Bearer ${byRsa}` })
        expect((await fetch(`${url}/v1/conversations/${id}`, { headers: { authorization: `Bearer ${byEc}` } })).status).toBe(200)
        await expectError(await fetch(`${url}/v1/conversations/${id}`, { headers: { authorization: `Bearer ${byStranger}` } }), 401, "unauthorized")
      })
    }))

  it.live("auth: without API keys everything is allowed", () =>
    withServer({}, async ({ url }) => {
      const id = await create(url)
      expect((await fetch(`${url}/v1/conversations/${id}`)).status).toBe(200)
      expect((await fetch(`${url}/v1/conversations/${id}`, { headers: { authorization: "Bearer anything" } })).status)
        .toBe(200)
    }))

  it.live("unknown route → 404 not_found JSON; a route's path with another method → 405 with Allow; a parameter the router refuses → 400", () =>
    withServer({}, async ({ url }) => {
      await expectError(await fetch(`${url}/nope`), 404, "not_found")
      await expectError(await json(`${url}/v2/conversations`, { body: {} }), 404, "not_found")
      const getOnPost = await fetch(`${url}/v1/conversations/abc/turns`)
      expect(getOnPost.headers.get("allow")).toBe("POST")
      await expectError(getOnPost, 405, "method_not_allowed")
      const putOnList = await fetch(`${url}/v1/conversations`, { method: "PUT", headers: { "content-type": "application/json" }, body: "{}" })
      expect(putOnList.headers.get("allow")).toBe("POST, GET, HEAD")
      await expectError(putOnList, 405, "method_not_allowed")
      const patch = await fetch(`${url}/v1/conversations/abc`, { method: "PATCH" })
      expect(patch.headers.get("allow")?.split(", ").sort()).toEqual(["DELETE", "GET", "HEAD"])
      await expectError(patch, 405, "method_not_allowed")
      await expectError(await fetch(`${url}/healthz`, { method: "POST" }), 405, "method_not_allowed")
      // As the router matches: case-insensitively, a trailing or doubled slash ignored; the web client's pages too.
      for (const path of ["/V1/MODELS", "/v1/conversations/", "//v1//conversations", "/", "/ops", "/assets/app.js"]) {
        await expectError(await fetch(`${url}${path}`, { method: "PUT", headers: { "content-type": "application/json" }, body: "{}" }), 405, "method_not_allowed")
      }
      // Over the router's 100 characters a parameter matched no route: it is the request's fault.
      await expectError(await fetch(`${url}/v1/conversations/${"a".repeat(150)}`), 400, "invalid_request")
      await expectError(await fetch(`${url}/v1/conversations/%FF`), 400, "invalid_request")
      // A path with no parameter that nothing serves under this method is a 404 (a web asset that is not there).
      for (const path of ["/assets/nope.js", "/OPS", "/ops/", "//"]) await expectError(await fetch(`${url}${path}`), 404, "not_found")
      // The absolute form of a request target names the same path.
      const absolute = await rawExchange(url, "DELETE http://x/v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 3000)
      expect(absolute).toMatch(/^HTTP\/1\.1 405/)
    }))
})

/** A raw HTTP/1.1 exchange: writes `request`, returns what the server answered before closing. */
const rawExchange = (url: string, request: string, timeoutMs = 10_000): Promise<string> =>
  new Promise((resolve, reject) => {
    const { hostname, port } = new URL(url)
    const socket = Net.connect(Number(port), hostname, () => socket.write(request))
    let answer = ""
    socket.setEncoding("utf8")
    socket.on("data", (d: string) => (answer += d))
    socket.on("close", () => resolve(answer))
    socket.on("error", reject)
    setTimeout(() => {
      socket.destroy()
      resolve(answer)
    }, timeoutMs)
  })

/**
 * POSTs `body` to /v1/conversations with `Host: host` as Python's urllib does: the whole body
 * written before anything is read. Returns the answer, or why the upload failed (a server
 * that closed with the body unread resets the connection under it).
 */
const uploadThenRead = (url: string, host: string, body: string): Promise<string> =>
  new Promise<string>((resolve) => {
    const { hostname, port } = new URL(url)
    let text = ""
    const socket = Net.connect(Number(port), hostname, () => {
      socket.pause()
      socket.write(`POST /v1/conversations HTTP/1.1\r\nHost: ${host}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n`)
      socket.write(body, (error) => {
        if (error !== undefined && error !== null) return resolve(`write failed: ${error.message}`)
        socket.resume()
      })
    })
    socket.setEncoding("utf8")
    socket.on("data", (d: string) => (text += d))
    socket.on("close", () => resolve(text))
    socket.on("error", (e) => resolve(`${text}\nsocket error: ${e.message}`))
  })

describe("HTTP API: hostile input (issue 9)", () => {
  it.live("invalid UTF-8 bodies and lone surrogates are 400; a real U+FFFD is text like any other", () =>
    withServer({}, async ({ url }) => {
      const id = await create(url)
      const send = (body: Uint8Array | string) =>
        fetch(`${url}/v1/conversations/${id}/turns`, { method: "POST", headers: { "content-type": "application/json" }, body })
      const invalid = Buffer.concat([Buffer.from('{"role":"user","content":"bad '), Buffer.from([0xff, 0xfe]), Buffer.from('"}')])
      const e1 = await expectError(await send(invalid), 400, "invalid_request")
      expect(e1.message).toMatch(/UTF-8/)
      // A 4-byte sequence cut after its third byte decodes to one U+FFFD of as many bytes.
      const cut = Buffer.concat([Buffer.from('{"role":"user","content":"cut '), Buffer.from([0xf0, 0x9f, 0x98]), Buffer.from('"}')])
      expect((await expectError(await send(cut), 400, "invalid_request")).message).toMatch(/UTF-8/)
      const e2 = await expectError(await send('{"role":"user","content":"half \\ud800 pair"}'), 400, "invalid_request")
      expect(e2.message).toMatch(/surrogate/)
      await expectError(await json(`${url}/v1/conversations`, { body: { system_prompt: "x\udc00" } }), 400, "invalid_request")
      // A stop string of half a pair would cut a character in two: refused too, on both APIs.
      await expectError(await send('{"role":"user","content":"hi","stop":["\\ud83d"]}'), 400, "invalid_request")
      await expectError(await json(`${url}/v1/chat/completions`, { body: { model: "default", messages: [{ role: "user", content: "hi" }], stop: "\ud83d" } }), 400, "invalid_request")
      // A message the native turn refuses is told in one line, not as a schema tree.
      const empty = await expectError(await json(`${url}/v1/chat/completions`, { body: { model: "default", messages: [{ role: "user", content: "" }] } }), 400, "invalid_request")
      expect(empty.message).not.toMatch(/\n|Encoded side|UserTurnInput/)
      expect(empty.message).toMatch(/^Invalid request: content: /)
      const ok = await send(JSON.stringify({ role: "user", content: "a real \uFFFD and a pair \ud83d\ude00" }))
      expect(ok.status).toBe(200)
      await ok.body?.cancel()
      // Sent chunked (no Content-Length), the same: invalid bytes refused and nothing stored.
      const chunked = (body: Uint8Array) =>
        fetch(`${url}/v1/conversations`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: new ReadableStream({ start: (c) => (c.enqueue(body), c.close()) }),
          duplex: "half"
        } as RequestInit)
      const numConversations = async () => ((await (await fetch(`${url}/v1/conversations?limit=100`)).json()) as { data: Array<unknown> }).data.length
      const before = await numConversations()
      const badSystem = Buffer.concat([Buffer.from('{"system_prompt":"'), Buffer.from([0xff, 0xfe]), Buffer.from(' bad"}')])
      expect((await expectError(await chunked(badSystem), 400, "invalid_request")).message).toMatch(/UTF-8/)
      const cutSystem = Buffer.concat([Buffer.from('{"system_prompt":"'), Buffer.from([0xf0, 0x9f, 0x98]), Buffer.from(' cut"}')])
      expect((await expectError(await chunked(cutSystem), 400, "invalid_request")).message).toMatch(/UTF-8/)
      expect(await numConversations()).toBe(before)
      expect((await chunked(Buffer.from(JSON.stringify({ system_prompt: "a real \uFFFD" })))).status).toBe(201)
    }))

  it.live("a malformed or compressed body is a 400 on every route, those without a body included, and changes nothing", () =>
    withServer({}, async ({ url }) => {
      const id = await create(url)
      const post = (path: string, body: string, headers: Record<string, string> = {}) =>
        fetch(`${url}${path}`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body })
      await expectError(await post(`/v1/conversations/${id}/share`, "{bad"), 400, "invalid_request")
      await expectError(await post(`/v1/conversations/${id}/cancel`, "{bad"), 400, "invalid_request")
      const del = await fetch(`${url}/v1/conversations/${id}`, { method: "DELETE", headers: { "content-type": "application/json" }, body: "{bad" })
      await expectError(del, 400, "invalid_request")
      await expectError(await post("/v1/conversations", "{}", { "content-encoding": "gzip" }), 400, "invalid_request")
      // Nothing was deleted; a well-formed (ignored) body, or none, still works.
      expect((await fetch(`${url}/v1/conversations/${id}`)).status).toBe(200)
      expect((await post(`/v1/conversations/${id}/cancel`, "[1,2]")).status).toBe(204)
      expect((await post(`/v1/conversations/${id}/cancel`, "")).status).toBe(204)
      // An empty body is none, whatever type it declares (fetch sends text/plain with "").
      expect((await fetch(`${url}/v1/conversations/${id}/cancel`, { method: "POST", body: "" })).status).toBe(204)
      expect((await post(`/v1/conversations/${id}/cancel`, "", { "content-type": "application/x-www-form-urlencoded" })).status).toBe(204)
      await expectError(await post(`/v1/conversations/${id}/cancel`, "a=1", { "content-type": "application/x-www-form-urlencoded" }), 400, "invalid_request")
      // Even as multipart without a boundary (which the route's decoder would fail on), and chunked.
      for (const type of ["multipart/form-data", "application/x-www-form-urlencoded", "text/plain"]) {
        expect((await post("/v1/conversations", "", { "content-type": type })).status, type).toBe(201)
        await expectError(await post(`/v1/conversations/${id}/turns`, "", { "content-type": type }), 400, "invalid_request")
        const chunked = await rawExchange(url, `POST /v1/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: ${type}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n`, 3000)
        expect(chunked, type).toMatch(/^HTTP\/1\.1 201/)
        const full = await rawExchange(url, `POST /v1/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: ${type}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\na=1\r\n0\r\n\r\n`, 3000)
        expect(full, type).toMatch(/^HTTP\/1\.1 400/)
      }
      expect((await fetch(`${url}/v1/conversations/${id}`)).status).toBe(200)
    }))

  it.live("a turn with a malformed Last-Event-ID is a 400 before anything is sent, as a resume with one is", () =>
    withServer({}, async ({ url }) => {
      const id = await create(url)
      const send = (lastEventId: string) =>
        fetch(`${url}/v1/conversations/${id}/turns`, {
          method: "POST",
          headers: { "content-type": "application/json", "idempotency-key": "k1", "last-event-id": lastEventId },
          body: JSON.stringify({ role: "user", content: "hi" })
        })
      await expectError(await send("junk"), 400, "invalid_request")
      await expectError(await send("conv_other:1:0"), 400, "invalid_request")
      const history = (await (await fetch(`${url}/v1/conversations/${id}`)).json()) as { turns: Array<unknown> }
      expect(history.turns).toEqual([])
    }))

  it.live("a history cursor past int32 is a 400, not a storage error", () =>
    withServer({}, async ({ url }) => {
      const id = await create(url)
      await expectError(await fetch(`${url}/v1/conversations/${id}?before=2147483648`), 400, "invalid_request")
      await expectError(await fetch(`${url}/v1/conversations/${id}?before=999999999999999`), 400, "invalid_request")
      expect((await fetch(`${url}/v1/conversations/${id}?before=2147483647`)).status).toBe(200)
    }))

  it.live("JSON nested thousands of levels deep is a 400 before validation", () =>
    withServer({}, async ({ url }) => {
      const id = await create(url)
      const deep = "[".repeat(5000) + "]".repeat(5000)
      const body = `{"role":"user","content":${deep}}`
      await expectError(await json(`${url}/v1/conversations/${id}/turns`, { body }), 400, "invalid_request")
      await expectError(await json(`${url}/v1/conversations`, { body: `{"system_prompt":${deep}}` }), 400, "invalid_request")
      // Brackets inside strings do not count.
      const ok = await json(`${url}/v1/conversations`, { body: { system_prompt: "[".repeat(5000) } })
      expect(ok.status).toBe(201)
    }))

  it.live("error bodies quote a short prefix of a rejected value, never all of it", () =>
    withServer({}, async ({ url }) => {
      const response = await json(`${url}/v1/conversations`, { body: { system_prompt: "x".repeat(1_000_000) } })
      const text = await response.text()
      expect(response.status).toBe(400)
      expect(text.length).toBeLessThan(2048)
      expect(JSON.parse(text).error.code).toBe("invalid_request")
    }))

  it.live("a body over the limit is a 413, declared or chunked", () =>
    withServer({}, async ({ url }) => {
      const big = JSON.stringify({ system_prompt: "x".repeat(2 * 1024 * 1024) })
      await expectError(await json(`${url}/v1/conversations`, { body: big }), 413, "payload_too_large")
      const chunks = new ReadableStream<Uint8Array>({
        start(controller) {
          const piece = new TextEncoder().encode("x".repeat(64 * 1024))
          controller.enqueue(new TextEncoder().encode('{"system_prompt":"'))
          // 20 MB: more than the sockets buffer, so a server that stopped reading would reset
          // the connection under the upload.
          for (let i = 0; i < 320; i++) controller.enqueue(piece)
          controller.enqueue(new TextEncoder().encode('"}'))
          controller.close()
        }
      })
      const chunked = await fetch(`${url}/v1/conversations`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: chunks,
        duplex: "half"
      } as RequestInit).catch((e: unknown) => String((e as { cause?: unknown }).cause ?? e))
      expect(typeof chunked === "string" ? chunked : chunked.status).toBe(413)
      if (typeof chunked !== "string") await expectError(chunked, 413, "payload_too_large")
      // Under the limit, a chunked body is read whole.
      const small = await fetch(`${url}/v1/conversations`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: new ReadableStream<Uint8Array>({
          start(controller) {
            controller.enqueue(new TextEncoder().encode('{"system_prompt":"'))
            controller.enqueue(new TextEncoder().encode("y".repeat(1000)))
            controller.enqueue(new TextEncoder().encode('"}'))
            controller.close()
          }
        }),
        duplex: "half"
      } as RequestInit)
      expect(small.status).toBe(201)
      expect((await fetch(`${url}/healthz`)).status).toBe(200)
    }))

  it.live("a body of invalid UTF-8 under the byte limit is a 400, though it decodes to 3 bytes of U+FFFD a byte", () =>
    withServer({}, async ({ url }) => {
      const invalid = Buffer.concat([Buffer.from('{"system_prompt":"'), Buffer.alloc(900_000, 0xff), Buffer.from('"}')])
      const declared = await fetch(`${url}/v1/conversations`, { method: "POST", headers: { "content-type": "application/json" }, body: invalid })
        .catch((e: unknown) => String((e as { cause?: unknown }).cause ?? e))
      expect(typeof declared === "string" ? declared : declared.status).toBe(400)
      if (typeof declared !== "string") expect((await expectError(declared, 400, "invalid_request")).message).toMatch(/UTF-8/)
      const chunked = await fetch(`${url}/v1/conversations`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: new ReadableStream<Uint8Array>({
          start(controller) {
            controller.enqueue(invalid)
            controller.close()
          }
        }),
        duplex: "half"
      } as RequestInit).catch((e: unknown) => String((e as { cause?: unknown }).cause ?? e))
      expect(typeof chunked === "string" ? chunked : chunked.status).toBe(400)
      if (typeof chunked !== "string") await expectError(chunked, 400, "invalid_request")
    }))

  it.live("a declared body far over the limit still gets its 413: the server drops the rest instead of resetting the connection", () =>
    withServer({}, async ({ url }) => {
      // 20 MB outruns the sockets' buffers: a server that closed without reading it reset
      // the connection under the client's upload (fetch: EPIPE), and the 413 was lost.
      // The client reads nothing until it has written its whole body, as Python's urllib.
      const big = JSON.stringify({ system_prompt: "x".repeat(20 * 1024 * 1024) })
      const answer = await uploadThenRead(url, "x", big)
      expect(answer.slice(0, 200)).toMatch(/^HTTP\/1\.1 413/)
      expect(answer).toContain('"code":"payload_too_large"')
      expect((await fetch(`${url}/healthz`)).status).toBe(200)
    }))

  it.live("a bad Host on a request with a long body still gets its 400: the server drops the body instead of resetting the connection", () =>
    withServer({}, async ({ url }) => {
      // As with the 413 above: a 400 written before the body was read, then the close, reset
      // the connection under the client's upload, and the client saw EPIPE, not the 400.
      const big = JSON.stringify({ system_prompt: "x".repeat(20 * 1024 * 1024) })
      const answer = await uploadThenRead(url, "a b", big)
      expect(answer.slice(0, 200)).toMatch(/^HTTP\/1\.1 400/)
      expect(answer).toContain('"code":"invalid_request"')
      expect((await fetch(`${url}/healthz`)).status).toBe(200)
    }))

  it.live("a client that sends less than its Content-Length gets 408, not a connection held forever", () =>
    withServer({ limits: { headersTimeoutMs: 500, requestTimeoutMs: 1000, maxConnectionsPerClient: 1024 } }, async ({ url }) => {
      const t0 = Date.now()
      const answer = await rawExchange(
        url,
        "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":",
        8000
      )
      expect(answer).toMatch(/^HTTP\/1\.1 408/)
      expect(Date.now() - t0).toBeLessThan(5000)
      expect(answer).toContain('"code":"request_timeout"')
      const slowHead = await rawExchange(url, "GET /healthz HTTP/1.1\r\nHost: x\r\n", 8000)
      expect(slowHead).toMatch(/^HTTP\/1\.1 408/)
    }))

  it.live("what Node's parser rejects gets a JSON error with a code: malformed HTTP 400, a head over 16 KiB 431", () =>
    withServer({}, async ({ url }) => {
      const bodyOf = (answer: string) => JSON.parse(answer.slice(answer.indexOf("\r\n\r\n") + 4)) as { error: { code: string } }
      for (const garbage of ["GARBAGE\r\n\r\n", "GET / HTTP/9.9\r\n\r\n", "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]) {
        const answer = await rawExchange(url, garbage, 3000)
        expect(answer).toMatch(/^HTTP\/1\.1 400/)
        expect(bodyOf(answer).error.code).toBe("invalid_request")
      }
      const bigHead = await rawExchange(url, `GET /v1/me HTTP/1.1\r\nHost: x\r\nX-Big: ${"a".repeat(40_000)}\r\n\r\n`, 3000)
      expect(bigHead).toMatch(/^HTTP\/1\.1 431/)
      expect(bodyOf(bigHead).error.code).toBe("headers_too_large")
      expect((await fetch(`${url}/healthz`)).status).toBe(200)
    }))

  it.live("a malformed chunked body gets 400 at once, alone or pipelined behind a good request", () =>
    withServer({}, async ({ url }) => {
      const head = "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
      // A bad first size, a bad later size, a chunk longer than its size: the handler waited for
      // the rest of the body, and Node's request timeout was ignored, so none was ever answered.
      for (const chunks of ["ZZ\r\n{}\r\n0\r\n\r\n", "2\r\n{}\r\nXX\r\n", "1\r\n{}\r\n0\r\n\r\n"]) {
        const t0 = Date.now()
        const answer = await rawExchange(url, head + chunks, 5000)
        expect(answer).toMatch(/^HTTP\/1\.1 400/)
        expect(answer).toContain('"code":"invalid_request"')
        expect(Date.now() - t0).toBeLessThan(2000)
      }
      const good = "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
      const pipelined = await rawExchange(url, `${good}${head}2\r\n{}\r\nXX\r\n`, 5000)
      expect(pipelined.match(/HTTP\/1\.1 \d{3}/g)).toEqual(["HTTP/1.1 201", "HTTP/1.1 400"])
      expect((await fetch(`${url}/healthz`)).status).toBe(200)
    }))

  it.live("a missing, doubled or malformed Host or an unsupported Expect gets a JSON error; a bad request pipelined behind a good one is answered after it", () =>
    withServer({}, async ({ url }) => {
      const bodyOf = (answer: string) => JSON.parse(answer.slice(answer.indexOf("\r\n\r\n") + 4)) as { error: { code: string } }
      const noHost = await rawExchange(url, "GET /v1/me HTTP/1.1\r\n\r\n", 3000)
      expect(noHost).toMatch(/^HTTP\/1\.1 400/)
      expect(bodyOf(noHost).error.code).toBe("invalid_request")
      // Two Host lines, or one that is no host[:port], are 400s too (RFC 9112 §3.2).
      for (const hosts of ["Host: a\r\nHost: b", "Host: a b", "Host: user@evil", "Host:", "Host: x:80:80"]) {
        const answer = await rawExchange(url, `GET /v1/me HTTP/1.1\r\n${hosts}\r\nConnection: close\r\n\r\n`, 3000)
        expect(answer, hosts).toMatch(/^HTTP\/1\.1 400/)
        expect(bodyOf(answer).error.code).toBe("invalid_request")
      }
      for (const host of ["example.com:8080", "127.0.0.1", "[::1]:80", "xn--bcher-kva.example"]) {
        expect(await rawExchange(url, `GET /healthz HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`, 3000), host).toMatch(/^HTTP\/1\.1 200/)
      }
      const expectation = await rawExchange(url, "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nExpect: foo\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", 3000)
      expect(expectation).toMatch(/^HTTP\/1\.1 417/)
      expect(bodyOf(expectation).error.code).toBe("expectation_failed")
      const pipelined = await rawExchange(
        url,
        "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}garbage\r\n\r\n",
        3000
      )
      expect(pipelined).toMatch(/^HTTP\/1\.1 201/)
      expect(pipelined).toMatch(/\r\n\r\n[\s\S]*HTTP\/1\.1 400/)
      // Two good ones, then the bad one: both answered, in order, then the 400.
      const good = "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
      const three = await rawExchange(url, `${good}${good}garbage\r\n\r\n`, 3000)
      expect(three.match(/HTTP\/1\.1 \d{3}/g)).toEqual(["HTTP/1.1 201", "HTTP/1.1 201", "HTTP/1.1 400"])
      expect((await fetch(`${url}/healthz`)).status).toBe(200)
    }))

  it.live("connections per client address are bounded", () =>
    withServer({ limits: { ...Server.defaultConnectionLimits, maxConnectionsPerClient: 4 } }, async ({ url }) => {
      const { hostname, port } = new URL(url)
      const sockets = await Promise.all(
        Array.from({ length: 4 }, () =>
          new Promise<Net.Socket>((resolve) => {
            const s = Net.connect(Number(port), hostname, () => resolve(s))
          }))
      )
      const fifth = await rawExchange(url, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 3000)
      expect(fifth).toMatch(/^HTTP\/1\.1 429/)
      for (const s of sockets) s.destroy()
      await new Promise((r) => setTimeout(r, 100))
      expect((await fetch(`${url}/healthz`)).status).toBe(200)
    }))

  it.live("two Authorization, Idempotency-Key, Last-Event-ID or Content-Type headers → 400; a 401 says WWW-Authenticate: Bearer; CONNECT → 405", () =>
    withServer({ keys: ["key-one"] }, async ({ url }) => {
      const twice = await rawExchange(
        url,
        "GET /v1/conversations/abc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-one\r\nAuthorization: Bearer nope\r\nConnection: close\r\n\r\n"
      )
      expect(twice).toMatch(/^HTTP\/1\.1 400/)
      expect(twice).toContain("invalid_request")
      // Node would join the two keys into a third, "k1, k2": a turn sent under neither.
      for (const header of ["Idempotency-Key", "Last-Event-ID", "Content-Type"]) {
        const answer = await rawExchange(
          url,
          `POST /v1/conversations/abc/turns HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-one\r\n${header}: k1\r\n${header}: k2\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}`
        )
        expect(answer).toMatch(/^HTTP\/1\.1 400/)
        expect(answer).toContain(`More than one ${header} header`)
      }
      // Past Node's default of 2,000 headers the rest were dropped unseen, a second
      // Authorization among them.
      const filler = Array.from({ length: 2000 }, (_, i) => `X-${i}: 1\r\n`).join("")
      const hidden = await rawExchange(
        url,
        `GET /v1/conversations/abc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-one\r\n${filler}Authorization: Bearer nope\r\nConnection: close\r\n\r\n`
      )
      expect(hidden).toMatch(/^HTTP\/1\.1 400/)
      expect(hidden).toContain("More than one Authorization header")
      const unauthorized = await fetch(`${url}/v1/conversations/abc`)
      expect(unauthorized.headers.get("www-authenticate")).toBe("Bearer")
      await expectError(unauthorized, 401, "unauthorized")
      const connect = await rawExchange(url, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
      expect(connect).toMatch(/^HTTP\/1\.1 405/)
    }))

  it.live("a request between the port opening and the API serving gets 503 not_ready, not silence", () =>
    Effect.gen(function*() {
      // The listening server alone: the API has not attached its handler yet.
      const server = yield* HttpServer.HttpServer
      const address = server.address as HttpServer.TcpAddress
      const answer = yield* Effect.promise(() =>
        rawExchange(`http://127.0.0.1:${address.port}`, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 3000)
      )
      expect(answer).toMatch(/^HTTP\/1\.1 503/)
      expect(answer.toLowerCase()).toContain("retry-after: 1")
      expect(answer).toContain("not_ready")
    }).pipe(Effect.provide(Server.layerNodeServer({ port: 0, host: "127.0.0.1" }))))

  it.live("a turn's status line and headers arrive at once, before its first token", () =>
    withServer({ fake: { tokens: 2, tokenDelay: Duration.seconds(3) } }, async ({ url }) => {
      const id = await create(url)
      const t0 = Date.now()
      const response = await json(`${url}/v1/conversations/${id}/turns`, { body: { role: "user", content: "hi" } })
      expect(response.status).toBe(200)
      expect(response.headers.get("content-type")).toMatch(/^text\/event-stream/)
      const reader = response.body!.getReader()
      const first = await readUntil(reader, (t) => t.includes("\n\n"))
      expect(first.startsWith(":")).toBe(true)
      expect(Date.now() - t0).toBeLessThan(2000)
      await reader.cancel()
    }))
})

describe("OpenAI fields this server cannot honour", () => {
  // Ignored, each would answer as if the client had not asked: tools never called, text where
  // JSON was required, no logprobs where the client reads them.
  it.live("tools, tool_choice, response_format and logprobs are 400 naming the field; their off values pass", () =>
    withServer({}, async ({ url }) => {
      const ask = (extra: Record<string, unknown>) =>
        json(`${url}/v1/chat/completions`, { body: { model: "default", messages: [{ role: "user", content: "hi" }], ...extra } })
      const tool = { type: "function", function: { name: "get_weather", parameters: { type: "object", properties: {} } } }
      for (const [field, extra] of [
        ["tools", { tools: [tool] }],
        ["tool_choice", { tool_choice: "auto" }],
        ["tool_choice", { tool_choice: { type: "function", function: { name: "get_weather" } } }],
        ["response_format", { response_format: { type: "json_object" } }],
        ["response_format", { response_format: { type: "json_schema", json_schema: { name: "x", schema: {} } } }],
        ["logprobs", { logprobs: true }]
      ] as const) {
        const error = await expectError(await ask(extra), 400, "invalid_request")
        expect(error.message, JSON.stringify(extra)).toContain(`${field}: `)
        expect(error.message).not.toMatch(/\n/)
      }
      for (const extra of [{ tools: [] }, { tool_choice: "none" }, { response_format: { type: "text" } }, { logprobs: false }, { tools: null, logprobs: null }]) {
        const response = await ask(extra)
        expect(response.status, JSON.stringify(extra)).toBe(200)
        await response.body?.cancel()
      }
    }))
})

describe("SHUTDOWN_GRACE_MS", () => {
  const read = (value: string | undefined) =>
    Effect.runSync(Effect.either(Server.shutdownGraceMsConfig.pipe(
      Effect.withConfigProvider(ConfigProvider.fromMap(new Map(value === undefined ? [] : [["SHUTDOWN_GRACE_MS", value]])))
    )))

  it("is 10 s unset or empty, and takes an integer of 0 or more", () => {
    expect(read(undefined)).toMatchObject({ _tag: "Right", right: 10_000 })
    expect(read("")).toMatchObject({ _tag: "Right", right: 10_000 })
    expect(read("0")._tag).toBe("Right")
    expect(read("2500")).toMatchObject({ _tag: "Right", right: 2500 })
  })

  // The HTTP layer and the process's stop deadline (main.ts) read it alike: before, main.ts
  // took -5 as 10 s and 1.5 as 1.5 ms, while the layer took -5 and refused 1.5.
  it("refuses a negative, fractional or non-numeric value (a start-up error)", () => {
    for (const bad of ["-5", "1.5", "ten", "1e3", "0x10"]) expect(read(bad)._tag, bad).toBe("Left")
  })
})
