/**
 * Property test through HTTP against the real service (own database): random bodies, query
 * strings, path ids and headers on every route (1,000 runs per route). Never a 5xx, and a
 * 4xx never changes a row.
 */
import fc from "fast-check"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { freshDatabase, sqlPool } from "../support/database.js"
import { assertEngineBuilt } from "../support/engineProcess.js"
import { type Service, startService } from "../support/service.js"

const NUM_RUNS = 1000

const body = fc.oneof(
  fc.jsonValue({ maxDepth: 4 }).map((v) => JSON.stringify(v)),
  fc.record({
    role: fc.oneof(fc.constant("user"), fc.string({ maxLength: 8 })),
    content: fc.oneof(fc.string({ maxLength: 64 }), fc.integer(), fc.constant(null), fc.array(fc.string(), { maxLength: 3 })),
    max_tokens: fc.oneof(fc.integer({ min: -10, max: 10_000 }), fc.double(), fc.string({ maxLength: 4 })),
    temperature: fc.oneof(fc.double({ min: -5, max: 5 }), fc.string({ maxLength: 4 })),
    model: fc.oneof(fc.constantFrom("mini", "constructor", "__proto__", "toString", ""), fc.string({ maxLength: 16 })),
    system_prompt: fc.oneof(fc.string({ maxLength: 64 }), fc.integer())
  }, { requiredKeys: [] }).map((v) => JSON.stringify(v)),
  fc.string({ maxLength: 200 }),
  fc.constantFrom("", "{", "[]", "null", "{\"__proto__\":{\"x\":1}}", "\u0000", "[".repeat(100) + "]".repeat(100))
)
/** OpenAI chat requests, mostly malformed; the valid ones are short (max_tokens ≤ 4). */
const chatBody = fc.oneof(
  body,
  fc.record({
    model: fc.oneof(fc.constantFrom("mini", "constructor", "__proto__", ""), fc.string({ maxLength: 16 })),
    messages: fc.oneof(
      fc.array(fc.record({
        role: fc.oneof(fc.constantFrom("system", "developer", "user", "assistant", "tool"), fc.string({ maxLength: 6 })),
        content: fc.oneof(fc.string({ maxLength: 40 }), fc.constant(null), fc.array(fc.record({ type: fc.constantFrom("text", "image_url"), text: fc.string({ maxLength: 10 }) }), { maxLength: 2 }))
      }, { requiredKeys: [] }), { maxLength: 4 }),
      fc.string({ maxLength: 10 })
    ),
    max_tokens: fc.oneof(fc.integer({ min: -2, max: 4 }), fc.constant(5000), fc.string({ maxLength: 3 })),
    n: fc.oneof(fc.integer({ min: -1, max: 3 }), fc.constant(null)),
    stream: fc.oneof(fc.boolean(), fc.string({ maxLength: 3 })),
    temperature: fc.oneof(fc.double({ min: -1, max: 3 }), fc.constant(null)),
    top_p: fc.oneof(fc.double({ min: -1, max: 2 }), fc.constant(0)),
    stop: fc.oneof(fc.string({ maxLength: 4 }), fc.array(fc.string({ maxLength: 4 }), { maxLength: 6 }), fc.integer()),
    seed: fc.oneof(fc.integer(), fc.double(), fc.string({ maxLength: 3 }))
  }, { requiredKeys: ["max_tokens"] }).map((v) => JSON.stringify(v))
)
const pathId = fc.oneof(fc.string({ minLength: 1, maxLength: 80 }), fc.constantFrom("constructor", "__proto__", "..", "%00", "a".repeat(65)))
  .map((s) => encodeURIComponent(s))
const query = fc.record({
  before: fc.oneof(fc.integer().map(String), fc.string({ maxLength: 20 }), fc.constantFrom("2147483648", "-1", "1e9", "0x10")),
  limit: fc.oneof(fc.integer({ min: -5, max: 500 }).map(String), fc.string({ maxLength: 5 }))
}, { requiredKeys: [] }).map((q) => new URLSearchParams(q).toString())
const headers = fc.record({
  "content-type": fc.constantFrom("application/json", "text/plain", "application/x-www-form-urlencoded", "application/json; charset=utf-8", ""),
  authorization: fc.constantFrom("Bearer x", "Basic abc", "", "bearer  "),
  "x-junk": fc.string({ maxLength: 30 }).filter((s) => /^[\x20-\x7e]*$/.test(s))
}, { requiredKeys: [] })

describe("every route, random input (1,000 runs each)", () => {
  let service: Service
  let dbUrl: string
  let conversationId: string
  let db: ReturnType<typeof sqlPool>

  const counts = async () =>
    (await db.query("SELECT (SELECT count(*) FROM chat_conversations)::int AS c, (SELECT count(*) FROM chat_turns)::int AS t"))[0]

  /** Sends one request; asserts no 5xx and, on a 4xx, no changed row. */
  const probe = async (method: string, path: string, init: { body?: string; headers?: Record<string, string> }) => {
    const before = await counts()
    const res = await fetch(`${service.url}${path}`, {
      method,
      headers: init.headers ?? {},
      ...(init.body === undefined || method === "GET" ? {} : { body: init.body })
    })
    expect(res.status, `${method} ${path} ${init.body?.slice(0, 100)}`).toBeLessThan(500)
    if (res.headers.get("content-type")?.startsWith("text/event-stream")) {
      await res.body?.cancel()
      // A started turn is stopped and settles before the next baseline (a completion's ends with its connection).
      if (path.startsWith("/v1/conversations/")) await fetch(`${service.url}/v1/conversations/${path.split("/")[3]}/cancel`, { method: "POST" })
      return
    }
    await res.arrayBuffer()
    if (res.status >= 400) expect(await counts()).toEqual(before)
  }

  beforeAll(async () => {
    assertEngineBuilt()
    dbUrl = (await freshDatabase()).url
    db = sqlPool(dbUrl)
    service = await startService({ env: { DATABASE_URL: dbUrl } })
    conversationId = ((await (await fetch(`${service.url}/v1/conversations`, { method: "POST" })).json()) as any).conversation_id
  }, 120_000)

  afterAll(async () => {
    await service?.stop()
    await db?.close()
  })

  it("POST /v1/conversations", async () => {
    await fc.assert(fc.asyncProperty(body, headers, (b, h) => probe("POST", "/v1/conversations", { body: b, headers: h })), {
      numRuns: NUM_RUNS
    })
  }, 300_000)

  it("POST /v1/conversations/{id}/turns", async () => {
    await fc.assert(
      fc.asyncProperty(fc.oneof(fc.constant(conversationId), pathId), body, headers, (id, b, h) =>
        probe("POST", `/v1/conversations/${id}/turns`, { body: b, headers: h })),
      { numRuns: NUM_RUNS }
    )
  }, 300_000)

  it("POST /v1/conversations/{id}/cancel", async () => {
    await fc.assert(
      fc.asyncProperty(fc.oneof(fc.constant(conversationId), pathId), body, headers, (id, b, h) =>
        probe("POST", `/v1/conversations/${id}/cancel`, { body: b, headers: h })),
      { numRuns: NUM_RUNS }
    )
  }, 300_000)

  it("GET /v1/conversations/{id}", async () => {
    await fc.assert(
      fc.asyncProperty(fc.oneof(fc.constant(conversationId), pathId), query, headers, (id, q, h) =>
        probe("GET", `/v1/conversations/${id}?${q}`, { headers: h })),
      { numRuns: NUM_RUNS }
    )
  }, 300_000)

  it("POST /v1/chat/completions", async () => {
    await fc.assert(fc.asyncProperty(chatBody, headers, (b, h) => probe("POST", "/v1/chat/completions", { body: b, headers: h })), {
      numRuns: NUM_RUNS
    })
  }, 300_000)

  it("sharing, deleting, memory: POST …/share, GET and DELETE /v1/shared/{share_id}, DELETE /v1/conversations/{id}, GET and PATCH /v1/users/{id}/memory", async () => {
    const shareId = fc.oneof(
      fc.hexaString({ minLength: 32, maxLength: 32 }).map((h) => `share_${h}`),
      fc.string({ minLength: 1, maxLength: 80 }).map((s) => encodeURIComponent(s)),
      fc.constantFrom("share_", "constructor", "__proto__")
    )
    const request = fc.oneof(
      fc.tuple(fc.constant("POST"), fc.oneof(fc.constant(conversationId), pathId).map((id) => `/v1/conversations/${id}/share`)),
      fc.tuple(fc.constantFrom("GET", "DELETE"), shareId.map((id) => `/v1/shared/${id}`)),
      // Random ids only: the test conversation itself is never deleted.
      fc.tuple(fc.constant("DELETE"), pathId.map((id) => `/v1/conversations/${id}`)),
      // Memory of another user (404) or malformed updates of one's own (400); the valid ones write facts, not turns.
      fc.tuple(fc.constantFrom("GET", "PATCH"), fc.oneof(fc.constant("me"), pathId).map((u) => `/v1/users/${u}/memory`))
    )
    await fc.assert(
      fc.asyncProperty(request, body, headers, async ([method, path], b, h) => {
        // A share of the test conversation is a 201 that writes a share row, not a turn.
        const before = await counts()
        const res = await fetch(`${service.url}${path}`, { method, headers: h, ...(method === "GET" ? {} : { body: b }) })
        expect(res.status, `${method} ${path}`).toBeLessThan(500)
        await res.arrayBuffer()
        if (res.status >= 400) expect(await counts()).toEqual(before)
      }),
      { numRuns: NUM_RUNS }
    )
  }, 300_000)

  it("GET /healthz, /readyz and unknown routes", async () => {
    await fc.assert(
      // Without a query too: `GET /healthz` alone is answered ahead of the API (Server.ts).
      fc.asyncProperty(fc.constantFrom("/healthz", "/readyz", "/nope", "/v1", "/openapi.json"), fc.option(query), headers, (p, q, h) =>
        probe("GET", q === null ? p : `${p}?${q}`, { headers: h })),
      { numRuns: NUM_RUNS }
    )
  }, 300_000)
})
