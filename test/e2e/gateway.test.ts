/**
 * The gateway as real users meet it: the service process with authentication on (API keys
 * and HS256 JWTs), its own PostgreSQL database and Redis, driven over HTTP.
 */
import { randomUUID } from "node:crypto"
import http from "node:http"
import path from "node:path"
import { SignJWT } from "jose"
import OpenAI from "openai"
import { blocklistClassifier } from "../../src/runtime/Moderation.js"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { freshDatabase, sqlAt } from "../support/database.js"
import { assertEngineBuilt, rawRequest } from "../support/engineProcess.js"
import { postJson, readSse, type Service, startService } from "../support/service.js"

const JWT_SECRET = "gateway-test-secret-of-32-bytes-or-more"

const signJwt = (claims: Record<string, unknown>) =>
  new SignJWT(claims).setProtectedHeader({ alg: "HS256" }).setIssuedAt().setExpirationTime("10m")
    .sign(new TextEncoder().encode(JWT_SECRET))

const bearer = (token: string) => ({ authorization: `Bearer ${token}` })

describe("gateway: identity and ownership", () => {
  let service: Service
  let dbUrl: string

  beforeAll(async () => {
    assertEngineBuilt()
    dbUrl = (await freshDatabase()).url
    service = await startService({
      env: {
        DATABASE_URL: dbUrl,
        CLUSTER_CONFIG: "test/e2e/identity.config.ts",
        API_KEYS: "key-alice=alice:paid:acme,key-bob=bob,key-carol=carol:paid:vault",
        ADMIN_API_KEYS: "key-operator",
        JWT_SECRET
      }
    })
  }, 120_000)

  afterAll(async () => {
    await service?.stop()
  })

  const create = async (headers: Record<string, string>) => {
    const res = await postJson(`${service.url}/v1/conversations`, {}, headers)
    expect(res.status).toBe(201)
    return ((await res.json()) as { conversation_id: string }).conversation_id
  }

  it("a conversation belongs to its creator: another user gets 404 on every route and changes nothing", async () => {
    const alice = bearer("key-alice")
    const id = await create(alice)
    const turn = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Hello", max_tokens: 4 }, alice)
    expect(turn.status).toBe(200)
    expect((await readSse(turn, () => undefined)).at(-1)?.event).toBe("done")
    const rows = await sqlAt("SELECT user_id, org_id FROM chat_conversations WHERE id = $1", [id], dbUrl)
    // Without a model the conversation gets the caller's tier's pool, and says where it runs.
    const created = await (await postJson(`${service.url}/v1/conversations`, {}, alice)).json()
    expect(created).toMatchObject({ model: "mini", region: "local" })
    expect(rows).toEqual([{ user_id: "alice", org_id: "acme" }])

    for (const other of [bearer("key-bob"), bearer(await signJwt({ sub: "mallory" }))]) {
      const routes = [
        () => fetch(`${service.url}/v1/conversations/${id}`, { headers: other }),
        () => postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Mine now" }, other),
        () => postJson(`${service.url}/v1/conversations/${id}/cancel`, {}, other),
        () => fetch(`${service.url}/v1/conversations/${id}/stream`, { headers: other })
      ]
      for (const route of routes) {
        const res = await route()
        expect(res.status).toBe(404)
        expect(((await res.json()) as any).error.code).toBe("conversation_not_found")
      }
    }
    // The same user by JWT reads it.
    const asAlice = bearer(await signJwt({ sub: "alice", tier: "paid" }))
    const history = await fetch(`${service.url}/v1/conversations/${id}`, { headers: asAlice })
    expect(history.status).toBe(200)
    expect(((await history.json()) as any).turns.length).toBe(2)
    expect(await sqlAt("SELECT count(*)::int AS n FROM chat_turns WHERE conversation_id = $1", [id], dbUrl)).toEqual([{ n: 2 }])

    // A message too long for the context (40,000 CJK characters, one pre-token, ~65 k tokens) is
    // refused, and was tokenized on the worker thread, not on the event loop (the counter below).
    let cjk = ""
    for (let i = 0; i < 40_000; i++) cjk += String.fromCodePoint(0x4e00 + ((i * 104_729) % 20_000))
    const tooLong = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: cjk, max_tokens: 4 }, alice)
    expect(tooLong.status).toBe(400)
    expect(((await tooLong.json()) as any).error.code).toBe("prompt_too_long")
    // The turn shows in the Prometheus metrics, labelled by model pool and tier.
    const metrics = await (await fetch(`${service.url}/metrics`)).text()
    const value = (line: string) => Number(metrics.split("\n").find((l) => l.startsWith(line))?.slice(line.length).trim())
    expect(value('time_to_first_token_seconds_count{model="mini",tier="paid"}')).toBeGreaterThanOrEqual(1)
    expect(value('e2e_request_latency_seconds_count{model="mini",tier="paid"}')).toBeGreaterThanOrEqual(1)
    expect(value('generation_tokens_total{model="mini",tier="paid"}')).toBeGreaterThanOrEqual(1)
    expect(value('prompt_tokens_total{model="mini",tier="paid"}')).toBeGreaterThan(1)
    // No long text was tokenized on the event loop (the off-thread path's misses), the refused one included.
    expect(value('tokenizer_long_pieces_on_event_loop_total{model="mini"}')).toBe(0)
    expect(metrics).toMatch(/request_success_total\{model="mini",tier="paid",finished_reason="(stop|length)"\} [1-9]/)
    expect(value('num_requests_running{model="mini",gpu="gpu-0"}')).toBe(0)
    expect(value('kv_cache_usage_perc{model="mini",gpu="gpu-0"}')).toBeGreaterThanOrEqual(0)
    expect(metrics).toMatch(/inter_token_latency_seconds_bucket/)
  }, 60_000)

  it("sharing: a read-only link shows the turns up to the share to anyone; only the owner shares or revokes it", async () => {
    const alice = bearer("key-alice")
    const bob = bearer("key-bob")
    const id = await create(alice)
    const first = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Shared part", max_tokens: 3 }, alice)
    await readSse(first, () => undefined)
    expect((await postJson(`${service.url}/v1/conversations/${id}/share`, {}, bob)).status).toBe(404)
    const shared = await postJson(`${service.url}/v1/conversations/${id}/share`, {}, alice)
    expect(shared.status).toBe(201)
    const share = (await shared.json()) as any
    expect(share).toMatchObject({ conversation_id: id, num_turns: 2 })
    expect(share.share_id).toMatch(/^share_[0-9a-f]{32}$/)
    // A later turn is not in the link.
    await readSse(await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Private part", max_tokens: 3 }, alice), () => undefined)
    const view = await fetch(`${service.url}/v1/shared/${share.share_id}`)
    expect(view.status).toBe(200)
    const body = (await view.json()) as any
    expect(body.turns.map((t: any) => [t.seq, t.role])).toEqual([[0, "user"], [1, "assistant"]])
    expect(body.turns[0].content).toBe("Shared part")
    // Only its owner revokes it; then it is gone.
    const notBobs = await fetch(`${service.url}/v1/shared/${share.share_id}`, { method: "DELETE", headers: bob })
    expect(notBobs.status).toBe(404)
    expect(((await notBobs.json()) as any).error.code).toBe("share_not_found")
    expect((await fetch(`${service.url}/v1/shared/${share.share_id}`, { method: "DELETE", headers: alice })).status).toBe(204)
    const gone = await fetch(`${service.url}/v1/shared/${share.share_id}`)
    expect(gone.status).toBe(404)
    expect(((await gone.json()) as any).error.code).toBe("share_not_found")
    expect((await fetch(`${service.url}/v1/shared/share_nothex`)).status).toBe(400)
  }, 60_000)

  it("DELETE /v1/conversations/{id} stops a running turn and removes the conversation, its turns and shares; only its owner may", async () => {
    const alice = bearer("key-alice")
    const id = await create(alice)
    await readSse(await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Hello", max_tokens: 3 }, alice), () => undefined)
    const share = (await (await postJson(`${service.url}/v1/conversations/${id}/share`, {}, alice)).json()) as any
    // A long turn is streaming when the delete comes.
    const running = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Go on", max_tokens: 3000, temperature: 1 }, alice)
    let seen = 0
    const reading = readSse(running, () => void seen++)
    while (seen < 5) await new Promise((r) => setTimeout(r, 10))
    expect((await fetch(`${service.url}/v1/conversations/${id}`, { method: "DELETE", headers: bearer("key-bob") })).status).toBe(404)
    expect((await fetch(`${service.url}/v1/conversations/${id}`, { method: "DELETE", headers: alice })).status).toBe(204)
    const events = await reading
    expect(events.at(-1)?.data.finish_reason ?? events.at(-1)?.event).toMatch(/cancelled|error/)
    for (const table of ["chat_conversations WHERE id", "chat_turns WHERE conversation_id", "chat_shares WHERE conversation_id"]) {
      expect(await sqlAt(`SELECT count(*)::int AS n FROM ${table} = $1`, [id], dbUrl)).toEqual([{ n: 0 }])
    }
    for (const res of [
      await fetch(`${service.url}/v1/conversations/${id}`, { headers: alice }),
      await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Again" }, alice),
      await fetch(`${service.url}/v1/conversations/${id}`, { method: "DELETE", headers: alice })
    ]) expect(res.status).toBe(404)
    expect((await fetch(`${service.url}/v1/shared/${share.share_id}`)).status).toBe(404)
  }, 60_000)

  it("user memory: PATCH and GET /v1/users/me/memory (deduplicated), only one's own; the best-matching facts go into the prompt", async () => {
    const alice = bearer("key-alice")
    const patch = (who: string, body: unknown, headers: Record<string, string>) =>
      fetch(`${service.url}/v1/users/${who}/memory`, { method: "PATCH", headers: { "content-type": "application/json", ...headers }, body: JSON.stringify(body) })
    const added = await patch("me", { add: ["Prefers metric units", "prefers metric units ", "Lives in Lisbon"] }, alice)
    expect(added.status).toBe(200)
    const memory = (await added.json()) as any
    expect(memory.user_id).toBe("alice")
    expect(memory.facts.map((f: any) => f.content)).toEqual(["Prefers metric units", "Lives in Lisbon"])
    // Each fact is stored with its embedding: the engine's embed of it (the tiny model's 64 dimensions, unit norm).
    const vectors = await sqlAt("SELECT content, embedding FROM chat_user_memory WHERE user_id = 'alice' ORDER BY created_at_ms", [], dbUrl)
    expect(vectors.map((r: any) => r.embedding?.length)).toEqual([64, 64])
    expect(Math.abs(vectors[0].embedding.reduce((n: number, x: number) => n + x * x, 0) - 1)).toBeLessThan(1e-4)
    // Another user's memory does not exist for the caller; bad input changes nothing.
    expect((await fetch(`${service.url}/v1/users/alice/memory`, { headers: bearer("key-bob") })).status).toBe(404)
    expect((await patch("alice", { add: ["x"] }, bearer("key-bob"))).status).toBe(404)
    expect((await patch("me", { add: [""] }, alice)).status).toBe(400)
    expect((await patch("me", { add: [" \n\t "] }, alice)).status).toBe(400)
    expect((await patch("me", { add: ["\u200b\u2060 "] }, alice)).status).toBe(400)
    expect((await patch("me", { remove: ["not-a-fact-id"] }, alice)).status).toBe(400)
    // The facts are in the next prompt: its prompt_tokens count them.
    const id = await create(alice)
    const withFacts = (await readSse(await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "How far is Lisbon in kilometres?", max_tokens: 1 }, alice), () => undefined)).at(-1)!
    const bobId = await create(bearer("key-bob"))
    const withoutFacts = (await readSse(await postJson(`${service.url}/v1/conversations/${bobId}/turns`, { role: "user", content: "How far is Lisbon in kilometres?", max_tokens: 1 }, bearer("key-bob")), () => undefined)).at(-1)!
    expect(withFacts.data.usage.prompt_tokens).toBeGreaterThan(withoutFacts.data.usage.prompt_tokens + 8)
    // Removing a fact by id.
    const lisbon = memory.facts.find((f: any) => f.content === "Lives in Lisbon").fact_id
    const after = (await (await patch("me", { remove: [lisbon] }, alice)).json()) as any
    expect(after.facts.map((f: any) => f.content)).toEqual(["Prefers metric units"])
    expect(((await (await fetch(`${service.url}/v1/users/alice/memory`, { headers: alice })).json()) as any).facts.length).toBe(1)
    // "Remember that …" in a turn adds the fact once the turn is stored.
    const done = (await readSse(await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Remember that my cat is called Tom.", max_tokens: 1 }, alice), () => undefined)).at(-1)!
    expect(done.event).toBe("done")
    let facts: Array<string> = []
    for (let i = 0; i < 50 && !facts.includes("my cat is called Tom"); i++) {
      await new Promise((r) => setTimeout(r, 100))
      facts = ((await (await fetch(`${service.url}/v1/users/me/memory`, { headers: alice })).json()) as any).facts.map((f: any) => f.content)
    }
    expect(facts).toEqual(["Prefers metric units", "my cat is called Tom"])
    // An admin key reads and changes anyone's memory; a user's key only their own.
    const operator = bearer("key-operator")
    expect(((await (await fetch(`${service.url}/v1/users/alice/memory`, { headers: operator })).json()) as any).facts.length).toBe(2)
    const cleared = (await (await patch("bob", { add: ["Set by an operator"] }, operator)).json()) as any
    expect(cleared.user_id).toBe("bob")
    expect(((await (await fetch(`${service.url}/v1/users/me/memory`, { headers: bearer("key-bob") })).json()) as any).facts.map((f: any) => f.content)).toEqual(["Set by an operator"])
    // A user id that cannot be stored (NUL) is bad input, not a storage fault.
    for (const bad of ["x%00", "%00"]) {
      const read = await fetch(`${service.url}/v1/users/${bad}/memory`, { headers: operator })
      expect(read.status).toBe(400)
      expect(((await read.json()) as any).error.code).toBe("invalid_request")
      expect((await patch(bad, { add: ["x"] }, operator)).status).toBe(400)
    }
  }, 60_000)

  it("org data rules: a zero-retention org's turns are served with their context but their text is never stored; a training-eligible org's turns are stamped", async () => {
    const carol = bearer("key-carol")
    const id = await create(carol)
    const send = async (content: string) =>
      (await readSse(await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content, max_tokens: 4 }, carol), () => undefined)).at(-1)!
    const first = await send("My secret code is 4417, keep it in mind for the next question.")
    const second = await send("What is it?")
    expect([first.event, second.event]).toEqual(["done", "done"])
    // The second prompt holds the first exchange (from the runner's memory).
    const alone = await send("x")
    expect(second.data.usage.prompt_tokens).toBeGreaterThan(first.data.usage.prompt_tokens)
    expect(alone.event).toBe("done")
    const rows = await sqlAt("SELECT seq, role, content, status FROM chat_turns WHERE conversation_id = $1 ORDER BY seq", [id], dbUrl)
    expect(rows.map((r: any) => [r.seq, r.role, r.content])).toEqual([0, 1, 2, 3, 4, 5].map((seq) => [seq, seq % 2 === 0 ? "user" : "assistant", ""]))
    const history = (await (await fetch(`${service.url}/v1/conversations/${id}`, { headers: carol })).json()) as any
    expect(history.zero_retention).toBe(true)
    expect(history.turns.every((t: any) => t.content === "")).toBe(true)
    // acme (alice's org) is training-eligible: its turns are stamped; bob's (no org) are not.
    const aliceId = await create(bearer("key-alice"))
    await readSse(await postJson(`${service.url}/v1/conversations/${aliceId}/turns`, { role: "user", content: "hi", max_tokens: 2 }, bearer("key-alice")), () => undefined)
    const bobId = await create(bearer("key-bob"))
    await readSse(await postJson(`${service.url}/v1/conversations/${bobId}/turns`, { role: "user", content: "hi", max_tokens: 2 }, bearer("key-bob")), () => undefined)
    const stamped = await sqlAt("SELECT conversation_id, bool_and(training_eligible) AS t FROM chat_turns WHERE conversation_id IN ($1, $2) GROUP BY conversation_id", [aliceId, bobId], dbUrl)
    expect(Object.fromEntries(stamped.map((r: any) => [r.conversation_id, r.t]))).toEqual({ [aliceId]: true, [bobId]: false })
    // A free user's conversation is kept 30 days after its last turn (the tier's retention); a paid one's indefinitely.
    const retention = await sqlAt("SELECT id, retention_days FROM chat_conversations WHERE id IN ($1, $2)", [aliceId, bobId], dbUrl)
    expect(Object.fromEntries(retention.map((r: any) => [r.id, r.retention_days]))).toEqual({ [aliceId]: null, [bobId]: 30 })
  }, 60_000)

  it("missing, unknown, expired and forged credentials are 401 with WWW-Authenticate, and store nothing", async () => {
    const expired = await new SignJWT({ sub: "alice" }).setProtectedHeader({ alg: "HS256" })
      .setExpirationTime(Math.floor(Date.now() / 1000) - 10).sign(new TextEncoder().encode(JWT_SECRET))
    const forged = await new SignJWT({ sub: "alice" }).setProtectedHeader({ alg: "HS256" }).setExpirationTime("5m")
      .sign(new TextEncoder().encode("not-the-secret-but-32-bytes-long-too"))
    const before = await sqlAt("SELECT count(*)::int AS n FROM chat_conversations", [], dbUrl)
    for (const headers of [{}, bearer("key-nobody"), bearer(expired), bearer(forged), { authorization: "Basic a2V5LWFsaWNl" }]) {
      const res = await postJson(`${service.url}/v1/conversations`, {}, headers)
      expect(res.status).toBe(401)
      expect(res.headers.get("www-authenticate")).toMatch(/^Bearer/)
      expect(((await res.json()) as any).error.code).toBe("unauthorized")
    }
    expect(await sqlAt("SELECT count(*)::int AS n FROM chat_conversations", [], dbUrl)).toEqual(before)
  }, 30_000)
})

describe("gateway: the OpenAI-compatible API, with the official openai client", () => {
  let service: Service
  let dbUrl: string

  beforeAll(async () => {
    assertEngineBuilt()
    dbUrl = (await freshDatabase()).url
    service = await startService({ env: { DATABASE_URL: dbUrl, API_KEYS: "key-carol=carol:paid" } })
  }, 120_000)

  afterAll(async () => {
    await service?.stop()
  })

  const client = (apiKey = "key-carol") => new OpenAI({ apiKey, baseURL: `${service.url}/v1`, maxRetries: 0 })

  it("completes a chat whose messages end with several user messages in a row", async () => {
    const messages = [
      { role: "user" as const, content: "First thought" },
      { role: "user" as const, content: "Second thought" },
      { role: "user" as const, content: "Now answer" }
    ]
    const completion = await client().chat.completions.create({ model: "mini", messages, max_tokens: 4 })
    expect(completion.usage!.completion_tokens).toBeGreaterThan(0)
    const rows = await sqlAt("SELECT seq, role, status FROM chat_turns WHERE conversation_id = $1 ORDER BY seq", [completion.id.replace(/^chatcmpl-/, "")], dbUrl)
    expect(rows.map((r) => [r.seq, r.role, r.status])).toEqual([[0, "user", "completed"], [1, "user", "completed"], [2, "user", "completed"], [3, "assistant", "completed"]])
  })

  it("lists the models, and completes a chat without and with streaming (same seed, same text)", async () => {
    const models = await client().models.list()
    expect(models.data.map((m) => m.id)).toContain("mini")
    const messages = [
      { role: "system" as const, content: "You are terse." },
      { role: "user" as const, content: "Hi" },
      { role: "assistant" as const, content: "Hello." },
      { role: "user" as const, content: "Tell me a story" }
    ]
    const completion = await client().chat.completions.create({ model: "mini", messages, max_tokens: 12, temperature: 0.8, seed: 7 })
    expect(completion.object).toBe("chat.completion")
    expect(completion.choices.length).toBe(1)
    expect(completion.choices[0]!.message.role).toBe("assistant")
    expect(["stop", "length"]).toContain(completion.choices[0]!.finish_reason)
    expect(completion.usage!.completion_tokens).toBeGreaterThan(0)
    expect(completion.usage!.total_tokens).toBe(completion.usage!.prompt_tokens + completion.usage!.completion_tokens)

    const stream = await client().chat.completions.create({
      model: "mini", messages, max_completion_tokens: 12, temperature: 0.8, seed: 7, stream: true, stream_options: { include_usage: true }
    })
    let text = ""
    let finish: string | null = null
    let usage: OpenAI.CompletionUsage | undefined
    for await (const chunk of stream) {
      expect(chunk.object).toBe("chat.completion.chunk")
      const choice = chunk.choices[0]
      if (choice !== undefined) {
        text += choice.delta.content ?? ""
        finish = choice.finish_reason ?? finish
      }
      if (chunk.usage) usage = chunk.usage
    }
    expect(text).toBe(completion.choices[0]!.message.content)
    expect(finish).toBe(completion.choices[0]!.finish_reason)
    expect(usage?.completion_tokens).toBe(completion.usage!.completion_tokens)
    // Each completion is stored as a conversation of its caller: history, then the exchange.
    const rows = await sqlAt(
      "SELECT c.user_id, t.seq, t.role, t.status FROM chat_conversations c JOIN chat_turns t ON t.conversation_id = c.id WHERE c.id = $1 ORDER BY t.seq",
      [completion.id.replace(/^chatcmpl-/, "")],
      dbUrl
    )
    expect(rows.map((r) => [r.user_id, r.seq, r.role, r.status])).toEqual([
      ["carol", 0, "user", "completed"],
      ["carol", 1, "assistant", "completed"],
      ["carol", 2, "user", "completed"],
      ["carol", 3, "assistant", "completed"]
    ])
  }, 60_000)

  it("errors come as the client's error classes: 401, 404 (unknown model), 400 (n > 1, last message not the user's)", async () => {
    await expect(client("wrong-key").models.list()).rejects.toBeInstanceOf(OpenAI.AuthenticationError)
    const missing = await client().chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "Hi" }] })
      .then(() => undefined, (e: unknown) => e)
    expect(missing).toBeInstanceOf(OpenAI.NotFoundError)
    expect((missing as InstanceType<typeof OpenAI.NotFoundError>).code).toBe("model_not_found")
    await expect(client().chat.completions.create({ model: "mini", n: 2, messages: [{ role: "user", content: "Hi" }] }))
      .rejects.toBeInstanceOf(OpenAI.BadRequestError)
    await expect(client().chat.completions.create({ model: "mini", messages: [{ role: "user", content: "Hi" }, { role: "assistant", content: "Yo" }] }))
      .rejects.toBeInstanceOf(OpenAI.BadRequestError)
    const before = await sqlAt("SELECT count(*)::int AS n FROM chat_conversations", [], dbUrl)
    await expect(client().chat.completions.create({ model: "mini", messages: [{ role: "user", content: "Hi" }], max_tokens: 0 }))
      .rejects.toBeInstanceOf(OpenAI.BadRequestError)
    expect(await sqlAt("SELECT count(*)::int AS n FROM chat_conversations", [], dbUrl)).toEqual(before)
  }, 60_000)
})

describe("gateway: RPM and TPM limits in Redis, one limit across two gateway processes", () => {
  let gateways: Array<Service> = []
  let dbUrls: Array<string> = []

  beforeAll(async () => {
    assertEngineBuilt()
    // Two single-process services stand in for two gateways: their own databases, one Redis prefix.
    const prefix = `test-${randomUUID()}:`
    dbUrls = [(await freshDatabase()).url, (await freshDatabase()).url]
    gateways = await Promise.all(dbUrls.map((dbUrl) =>
      startService({
        env: {
          DATABASE_URL: dbUrl,
          API_KEYS: "key-dave=dave:free,key-erin=erin:free,key-fay=fay:paid,key-gil=gil:free",
          CLUSTER_CONFIG: "test/e2e/gateway.config.ts",
          RATE_LIMIT_STORE: "redis",
          REDIS_KEY_PREFIX: prefix
        }
      })
    ))
  }, 180_000)

  afterAll(async () => {
    await Promise.all(gateways.map((g) => g.stop()))
  })

  it("the 6th request in a minute is 429 with OpenAI's headers, counted across both gateways; other users are not affected", async () => {
    const dave = bearer("key-dave")
    const statuses: Array<number> = []
    let last: Response | undefined
    for (let i = 0; i < 6; i++) {
      last = await postJson(`${gateways[i % 2]!.url}/v1/conversations`, {}, dave)
      statuses.push(last.status)
      if (i === 0) {
        expect(last.headers.get("x-ratelimit-limit-requests")).toBe("5")
        expect(last.headers.get("x-ratelimit-remaining-requests")).toBe("4")
        expect(last.headers.get("x-ratelimit-reset-requests")).toMatch(/^\d+(m\d+)?s$/)
      }
      if (last.status !== 429) await last.arrayBuffer()
    }
    expect(statuses).toEqual([201, 201, 201, 201, 201, 429])
    expect(Number(last!.headers.get("retry-after"))).toBeGreaterThan(0)
    expect(last!.headers.get("x-ratelimit-remaining-requests")).toBe("0")
    expect(await last!.json()).toEqual({
      error: { message: expect.stringMatching(/5 requests per minute/), type: "rate_limit_exceeded", param: null, code: "rate_limit_exceeded" }
    })
    // The refused request stored nothing: five conversations in all.
    const counts = await Promise.all(dbUrls.map((u) => sqlAt("SELECT count(*)::int AS n FROM chat_conversations WHERE user_id = 'dave'", [], u)))
    expect(counts[0]![0].n + counts[1]![0].n).toBe(5)
    // Another user has a limit of their own; the openai client gets its RateLimitError class.
    expect((await postJson(`${gateways[0]!.url}/v1/conversations`, {}, bearer("key-erin"))).status).toBe(201)
    const openai = new OpenAI({ apiKey: "key-dave", baseURL: `${gateways[1]!.url}/v1`, maxRetries: 0 })
    await expect(openai.models.list()).rejects.toBeInstanceOf(OpenAI.RateLimitError)
    const metrics = await (await fetch(`${gateways[1]!.url}/metrics`)).text()
    expect(metrics).toMatch(/rate_limit_rejections_total\{tier="free",limit="requests"\} [1-9]/)
  }, 60_000)

  it("tiers route to their pools, two engines side by side: free → mini (CPU), paid → frontier (simulated GPU)", async () => {
    const fay = bearer("key-fay")
    const models = await (await fetch(`${gateways[0]!.url}/v1/models`, { headers: fay })).json() as any
    expect(models.data.map((m: any) => m.id).sort()).toEqual(["frontier", "mini"])
    const created = await (await postJson(`${gateways[0]!.url}/v1/conversations`, {}, fay)).json() as any
    expect(created).toMatchObject({ model: "frontier", region: "local" })
    const turn = await postJson(`${gateways[0]!.url}/v1/conversations/${created.conversation_id}/turns`, { role: "user", content: "Hello", max_tokens: 8 }, fay)
    expect((await readSse(turn, () => undefined)).at(-1)?.event).toBe("done")
    const metrics = await (await fetch(`${gateways[0]!.url}/metrics`)).text()
    expect(metrics).toMatch(/generation_tokens_total\{model="frontier",tier="paid"\} [1-9]/)
    expect(metrics).toMatch(/num_requests_running\{model="frontier",gpu="gpu-1"\} 0/)
    // A free user's conversation is on mini; their tier is pinned there (frontier does not exist for them).
    const free = await (await postJson(`${gateways[1]!.url}/v1/conversations`, { model: "mini" }, bearer("key-erin"))).json() as any
    expect(free.model).toBe("mini")
    const pinned = await postJson(`${gateways[1]!.url}/v1/conversations`, { model: "frontier" }, bearer("key-gil"))
    expect(pinned.status).toBe(404)
    expect(((await pinned.json()) as any).error.code).toBe("model_not_found")
    // The OpenAI client sees only the models their tier may name, as a list or one by one.
    const gil = new OpenAI({ apiKey: "key-gil", baseURL: `${gateways[1]!.url}/v1`, maxRetries: 0 })
    expect((await gil.models.list()).data.map((m) => m.id)).toEqual(["mini"])
    expect(await gil.models.retrieve("mini")).toEqual({ id: "mini", object: "model", created: 0, owned_by: "chat-serve" })
    await expect(gil.models.retrieve("frontier")).rejects.toBeInstanceOf(OpenAI.NotFoundError)
    // (fay, paid: any pool) may name mini too.
    expect((await postJson(`${gateways[1]!.url}/v1/conversations`, { model: "mini" }, fay)).status).toBe(201)
  }, 60_000)

  it("a turn is charged prompt + max_tokens up front (TPM), and refused when that would pass the limit", async () => {
    const erin = bearer("key-erin")
    const id = ((await (await postJson(`${gateways[0]!.url}/v1/conversations`, {}, erin)).json()) as any).conversation_id
    // 600 tokens a minute: a turn asking for 500 more than is left is refused before anything is stored.
    const first = await postJson(`${gateways[0]!.url}/v1/conversations/${id}/turns`, { role: "user", content: "Hi", max_tokens: 300 }, erin)
    expect(first.status).toBe(200)
    expect(Number(first.headers.get("x-ratelimit-remaining-tokens"))).toBeLessThanOrEqual(300)
    await readSse(first, () => undefined)
    const second = await postJson(`${gateways[1]!.url}/v1/conversations/${id}/turns`, { role: "user", content: "More", max_tokens: 500 }, erin)
    expect(second.status).toBe(429)
    expect(((await second.json()) as any).error.message).toMatch(/tokens per minute/)
    expect(second.headers.get("x-ratelimit-limit-tokens")).toBe("600")
    const rows = await sqlAt("SELECT count(*)::int AS n FROM chat_turns WHERE conversation_id = $1", [id], dbUrls[0]!)
    expect(rows[0].n).toBe(2)
  }, 60_000)

  it("a prompt within the model's context but past the pool's KV cache is 400 prompt_too_long and stores nothing (native and OpenAI routes)", async () => {
    const fay = bearer("key-fay")
    const url = gateways[0]!.url
    // frontier's 256 MiB cache holds 1,536 tokens of the default model, whose context is 4,096.
    const content = Array.from({ length: 900 }, (_, i) => `item${i}`).join(" ")
    const count = async (table: string) => (await sqlAt(`SELECT count(*)::int AS n FROM ${table}`, [], dbUrls[0]!))[0].n as number
    const id = ((await (await postJson(`${url}/v1/conversations`, {}, fay)).json()) as any).conversation_id
    const [conversations, turns] = [await count("chat_conversations"), await count("chat_turns")]
    const native = await postJson(`${url}/v1/conversations/${id}/turns`, { role: "user", content, max_tokens: 8 }, fay)
    expect(native.status).toBe(400)
    const error = ((await native.json()) as any).error
    expect(error.code).toBe("prompt_too_long")
    expect(error.message).toMatch(/at most 1536/)
    const completion = await fetch(`${url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", ...fay },
      body: JSON.stringify({ model: "frontier", messages: [{ role: "user", content: "Earlier" }, { role: "assistant", content: "Yes" }, { role: "user", content }], max_tokens: 8 })
    })
    expect(completion.status).toBe(400)
    expect(((await completion.json()) as any).error.code).toBe("prompt_too_long")
    // The completion's conversation is removed once the refusal is out.
    const deadline = Date.now() + 5000
    while ((await count("chat_conversations")) !== conversations && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50))
    expect([await count("chat_conversations"), await count("chat_turns")]).toEqual([conversations, turns])
    // The conversation takes a turn that fits.
    const fits = await postJson(`${url}/v1/conversations/${id}/turns`, { role: "user", content: "Short", max_tokens: 4 }, fay)
    expect((await readSse(fits, () => undefined)).at(-1)?.event).toBe("done")
  }, 60_000)
})

const GREEDY_PROMPT = "Tell me a long story"

describe("gateway: moderation", () => {
  let service: Service
  let dbUrl: string

  /** A word of the model's greedy reply to GREEDY_PROMPT: blocklisted, output moderation fires mid-stream. */
  let word: string
  /** The greedy reply's first 200 tokens, and the model's data directory. */
  let longTokens: Array<string>
  let dataDir: string

  beforeAll(async () => {
    assertEngineBuilt()
    dbUrl = (await freshDatabase()).url
    // The tiny model is generated per data directory: its greedy reply is learnt first, then
    // the service restarts on the same model with a word of that reply blocklisted.
    const probe = await startService({ env: { DATABASE_URL: dbUrl } })
    const id = ((await (await postJson(`${probe.url}/v1/conversations`, {})).json()) as any).conversation_id
    const reply = await postJson(`${probe.url}/v1/conversations/${id}/turns`, { role: "user", content: GREEDY_PROMPT, max_tokens: 40, temperature: 0 })
    const tokens = (await readSse(reply, () => undefined)).filter((e) => e.event === "token").map((e) => e.data.text as string)
    const longId = ((await (await postJson(`${probe.url}/v1/conversations`, {})).json()) as any).conversation_id
    const longReply = await postJson(`${probe.url}/v1/conversations/${longId}/turns`, { role: "user", content: GREEDY_PROMPT, max_tokens: 200, temperature: 0 })
    longTokens = (await readSse(longReply, () => undefined)).filter((e) => e.event === "token").map((e) => e.data.text as string)
    await probe.stop()
    const text = tokens.join("")
    word = tokens.slice(3).map((t) => t.trim()).find((t) => /^\p{L}{3,}$/u.test(t) && blocklistClassifier([t]).classify(text).flagged)!
    expect(word).toBeDefined()
    dataDir = probe.dataDir
    service = await startService({ env: { DATABASE_URL: dbUrl, MODERATION_BLOCKLIST: `forbidden topic,${word}` }, dataDir: probe.dataDir })
  }, 180_000)

  afterAll(async () => {
    await service?.stop()
  })

  const create = async () => ((await (await postJson(`${service.url}/v1/conversations`, {})).json()) as any).conversation_id as string

  it("a flagged or repetitive user message is 400 content_filter and stores nothing (native and OpenAI routes)", async () => {
    const id = await create()
    for (const content of ["Tell me about the FORBIDDEN topic please", "poem ".repeat(100)]) {
      const res = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content })
      expect(res.status).toBe(400)
      expect(((await res.json()) as any).error.code).toBe("content_filter")
    }
    // A prompt past the context is told so (with its token count) before moderation looks at it.
    const long = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: " hello".repeat(10_000) })
    expect(long.status).toBe(400)
    const longError = ((await long.json()) as any).error
    expect(longError.code).toBe("prompt_too_long")
    expect(longError.message).toMatch(/10[0-9]{3} tokens/)
    expect(await sqlAt("SELECT count(*)::int AS n FROM chat_turns WHERE conversation_id = $1", [id], dbUrl)).toEqual([{ n: 0 }])
    const openai = new OpenAI({ apiKey: "none", baseURL: `${service.url}/v1`, maxRetries: 0 })
    const before = await sqlAt("SELECT count(*)::int AS n FROM chat_conversations", [], dbUrl)
    const refused = await openai.chat.completions.create({
      model: "mini",
      messages: [{ role: "user", content: "a forbidden topic" }, { role: "assistant", content: "no" }, { role: "user", content: "ok" }]
    }).then(() => undefined, (e: unknown) => e)
    expect(refused).toBeInstanceOf(OpenAI.BadRequestError)
    expect((refused as InstanceType<typeof OpenAI.BadRequestError>).code).toBe("content_filter")
    expect(await sqlAt("SELECT count(*)::int AS n FROM chat_conversations", [], dbUrl)).toEqual(before)
  }, 60_000)

  it("a conversation whose system prompt is flagged, or leaves no room for a turn in the context, is refused and not stored", async () => {
    const before = await sqlAt("SELECT count(*)::int AS n FROM chat_conversations", [], dbUrl)
    const flagged = await postJson(`${service.url}/v1/conversations`, { system_prompt: "You discuss the FORBIDDEN\n  topic." })
    expect(flagged.status).toBe(400)
    expect(((await flagged.json()) as any).error.code).toBe("content_filter")
    const varied = Array.from({ length: 4500 }, (_, i) => `w${(i * 7919) % 10007}`).join(" ")
    const long = await postJson(`${service.url}/v1/conversations`, { system_prompt: varied })
    expect(long.status).toBe(400)
    expect(((await long.json()) as any).error.code).toBe("prompt_too_long")
    expect(await sqlAt("SELECT count(*)::int AS n FROM chat_conversations", [], dbUrl)).toEqual(before)
    expect((await postJson(`${service.url}/v1/conversations`, { system_prompt: "You are terse." })).status).toBe(201)
  }, 60_000)

  it("flagged output ends the stream with content_filter, frees the sequence, and is stored filtered with its verdict", async () => {
    const id = await create()
    const res = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: GREEDY_PROMPT, max_tokens: 40, temperature: 0 })
    expect(res.status).toBe(200)
    const events = await readSse(res, () => undefined)
    const last = events.at(-1)!
    expect(last.event).toBe("error")
    expect(last.data.error.code).toBe("content_filter")
    const text = events.filter((e) => e.event === "token").map((e) => e.data.text).join("")
    expect(blocklistClassifier([word]).classify(text).flagged).toBe(false)
    const rows = await sqlAt("SELECT seq, role, status, content, moderation_verdict FROM chat_turns WHERE conversation_id = $1 ORDER BY seq", [id], dbUrl)
    expect(rows.map((r) => [r.seq, r.role, r.status])).toEqual([[0, "user", "completed"], [1, "assistant", "filtered"]])
    expect(rows[1].content).toBe(text)
    expect(JSON.parse(rows[1].moderation_verdict)).toEqual({ category: "blocklist" })
    // The sequence was stopped: the engine holds no sequence and no KV block.
    const info = await rawRequest(`ipc://${path.join(service.runDir, "engine-gpu-0.sock")}`, { v: 1, type: "info", req_id: 1 })
    expect({ seqs: info.num_active_seqs, blocks: info.num_used_blocks }).toEqual({ seqs: 0, blocks: 0 })
    // The conversation goes on; the filtered reply is not in later prompts.
    const next = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Hi", max_tokens: 2 })
    expect((await readSse(next, () => undefined)).at(-1)?.event).toBe("done")
    // The OpenAI route reports it as finish_reason content_filter.
    const openai = new OpenAI({ apiKey: "none", baseURL: `${service.url}/v1`, maxRetries: 0 })
    const completion = await openai.chat.completions.create({ model: "mini", messages: [{ role: "user", content: GREEDY_PROMPT }], max_tokens: 40, temperature: 0 })
    expect(completion.choices[0]!.finish_reason).toBe("content_filter")
    // With the usage stored with the filtered reply, streamed (include_usage) or not.
    expect(completion.usage?.prompt_tokens).toBeGreaterThan(0)
    expect(completion.usage?.completion_tokens).toBeGreaterThan(0)
    const chunks = []
    const streamed = await openai.chat.completions.create({
      model: "mini", messages: [{ role: "user", content: GREEDY_PROMPT }], max_tokens: 40, temperature: 0, stream: true, stream_options: { include_usage: true }
    })
    for await (const chunk of streamed) chunks.push(chunk)
    expect(chunks.some((c) => c.choices[0]?.finish_reason === "content_filter")).toBe(true)
    expect(chunks.at(-1)?.usage).toEqual(completion.usage)
    const metrics = await (await fetch(`${service.url}/metrics`)).text()
    expect(metrics).toMatch(/request_success_total\{model="mini",tier="free",finished_reason="content_filter"\} [1-9]/)
    expect(metrics).toMatch(/moderation_verdicts_total\{stage="input",verdict="blocklist"\} [1-9]/)
  }, 60_000)

  it("a token that ends with a blocked word's letters, continued by the next into a longer word, is held back and then sent: the reply is whole", async () => {
    // " hell" then "ish": a blocklisted "hell" is no finding, but that shows only with "ish".
    const text = longTokens.join("")
    const at = longTokens.findIndex((t, i) =>
      /^ \p{L}{3,}$/u.test(t) && /^\p{L}/u.test(longTokens[i + 1] ?? "") &&
      !blocklistClassifier([t.trim()]).classify(`${GREEDY_PROMPT} ${text}`).flagged
    )
    expect(at).toBeGreaterThanOrEqual(0)
    // Its own database: two services on one would contend for the same shards.
    const ownDbUrl = (await freshDatabase()).url
    const prefixed = await startService({ env: { DATABASE_URL: ownDbUrl, MODERATION_BLOCKLIST: longTokens[at]!.trim() }, dataDir })
    try {
      const id = ((await (await postJson(`${prefixed.url}/v1/conversations`, {})).json()) as any).conversation_id
      const res = await postJson(`${prefixed.url}/v1/conversations/${id}/turns`, { role: "user", content: GREEDY_PROMPT, max_tokens: 200, temperature: 0 })
      expect(res.status).toBe(200)
      const events = await readSse(res, () => undefined)
      expect(events.at(-1)?.event).toBe("done")
      const tokens = events.filter((e) => e.event === "token").map((e) => e.data.text as string)
      expect(tokens.join("")).toBe(text)
      // The held token went out with the next one, in one event.
      expect(tokens).toContain(longTokens[at]! + longTokens[at + 1]!)
      const rows = await sqlAt("SELECT status, content FROM chat_turns WHERE conversation_id = $1 AND role = 'assistant'", [id], ownDbUrl)
      expect(rows).toEqual([{ status: "completed", content: text }])
    } finally {
      await prefixed.stop()
    }
  }, 90_000)
})

describe("gateway: a generation caught in a loop stops", () => {
  let service: Service

  beforeAll(async () => {
    assertEngineBuilt()
    service = await startService({ env: { DATABASE_URL: (await freshDatabase()).url } })
  }, 120_000)

  afterAll(async () => {
    await service?.stop()
  })

  it("the tiny model's greedy loop ends with finish_reason repetition long before max_tokens", async () => {
    const id = ((await (await postJson(`${service.url}/v1/conversations`, {})).json()) as any).conversation_id
    const res = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Tell me a long story", max_tokens: 2000, temperature: 0 })
    const events = await readSse(res, () => undefined)
    const done = events.at(-1)!
    expect(done.event).toBe("done")
    expect(done.data.finish_reason).toBe("repetition")
    expect(done.data.usage.completion_tokens).toBeLessThan(2000)
  }, 60_000)
})

describe("gateway: a trace span per turn, exported over OTLP", () => {
  let service: Service
  let collector: http.Server
  const received: Array<any> = []

  beforeAll(async () => {
    assertEngineBuilt()
    // A stand-in OTLP/HTTP collector: it keeps every JSON body posted to /v1/traces.
    collector = http.createServer((req, res) => {
      let body = ""
      req.on("data", (d) => (body += d))
      req.on("end", () => {
        if (req.url === "/v1/traces") received.push(JSON.parse(body))
        res.writeHead(200, { "content-type": "application/json" }).end("{}")
      })
    })
    await new Promise<void>((resolve) => collector.listen(0, "127.0.0.1", resolve))
    const port = (collector.address() as { port: number }).port
    service = await startService({
      env: {
        DATABASE_URL: (await freshDatabase()).url,
        OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${port}`,
        OTEL_SERVICE_NAME: "chat-test",
        OTEL_BSP_SCHEDULE_DELAY: "300"
      }
    })
  }, 120_000)

  afterAll(async () => {
    await service?.stop()
    collector?.close()
  })

  it("a turn's span carries the GenAI attributes: model, conversation, sampling, usage, finish reason", async () => {
    const id = ((await (await postJson(`${service.url}/v1/conversations`, {})).json()) as any).conversation_id
    const res = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Hi", max_tokens: 5, temperature: 0.5, seed: 3 })
    const done = (await readSse(res, () => undefined)).at(-1)!
    expect(done.event).toBe("done")
    const value = (v: any) => v.stringValue ?? (v.intValue === undefined ? undefined : Number(v.intValue)) ?? v.doubleValue ?? v.arrayValue?.values.map(value)
    const deadline = Date.now() + 15_000
    let span: any
    while (span === undefined && Date.now() < deadline) {
      span = received.flatMap((r) => r.resourceSpans.flatMap((rs: any) => rs.scopeSpans.flatMap((ss: any) => ss.spans)))
        .find((s: any) => s.name === "chat mini")
      if (span === undefined) await new Promise((r) => setTimeout(r, 200))
    }
    expect(span).toBeDefined()
    const attributes = Object.fromEntries(span.attributes.map((a: any) => [a.key, value(a.value)]))
    expect(attributes).toMatchObject({
      "gen_ai.operation.name": "chat",
      "gen_ai.request.model": "mini",
      "gen_ai.conversation.id": id,
      "gen_ai.request.max_tokens": 5,
      "gen_ai.request.temperature": 0.5,
      "gen_ai.request.seed": 3,
      "gen_ai.response.id": done.data.turn_id,
      "gen_ai.response.finish_reasons": [done.data.finish_reason],
      "gen_ai.usage.input_tokens": done.data.usage.prompt_tokens,
      "gen_ai.usage.output_tokens": done.data.usage.completion_tokens,
      "enduser.id": "local",
      "chat.tier": "free"
    })
    expect(Number(span.endTimeUnixNano) - Number(span.startTimeUnixNano)).toBeGreaterThan(0)
    const resource = received[0].resourceSpans[0].resource.attributes
    expect(resource.find((a: any) => a.key === "service.name")?.value.stringValue).toBe("chat-test")
  }, 60_000)
})
