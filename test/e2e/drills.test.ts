/**
 * Hardening drills through HTTP against the real service process, the real engine and a
 * PostgreSQL database of their own: hostile input, overload, cancel-then-send, engine crash
 * and hang, database backends terminated, SIGTERM and SIGKILL. Each fault drill ends in a
 * loss audit: every acknowledged user turn has its reply row, and every client's text equals
 * the stored reply.
 */
import { execFileSync } from "node:child_process"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { freshDatabase, sqlAt } from "../support/database.js"
import { assertEngineBuilt } from "../support/engineProcess.js"
import { postJson, readSse, type Service, type SseEvent, startService } from "../support/service.js"
import { type TcpProxy, tcpProxy } from "../support/tcpProxy.js"

interface TurnResult {
  readonly conversationId: string
  readonly status: number
  readonly events: ReadonlyArray<SseEvent>
  readonly text: string
  readonly terminal: SseEvent | undefined
}

const create = async (url: string): Promise<string> =>
  ((await (await postJson(`${url}/v1/conversations`, { system_prompt: "Be brief." })).json()) as any).conversation_id

/** Sends a turn and reads its stream to the end; `onToken` sees each token event. */
const turn = async (
  url: string,
  conversationId: string,
  body: Record<string, unknown>,
  onToken?: (e: SseEvent) => void
): Promise<TurnResult> => {
  const res = await postJson(`${url}/v1/conversations/${conversationId}/turns`, { role: "user", ...body })
  if (res.status !== 200) return { conversationId, status: res.status, events: [], text: "", terminal: undefined }
  const events = await readSse(res, (e) => void (e.event === "token" && onToken?.(e))).catch(() => [] as Array<SseEvent>)
  const text = events.filter((e) => e.event === "token").map((e) => e.data.text).join("")
  const terminal = events.find((e) => e.event === "done" || e.event === "error")
  return { conversationId, status: res.status, events, text, terminal }
}

/**
 * Starts a turn on each conversation. `streaming(n)`: every turn has streamed a token (each
 * was acknowledged) and `n` tokens arrived in all; a drill strikes only after that.
 */
const startTurns = (url: string, ids: ReadonlyArray<string>, body: Record<string, unknown>) => {
  const counts = ids.map(() => 0)
  const running = ids.map((id, i) => turn(url, id, body, () => void counts[i]!++))
  const streaming = (numTokens: number) => counts.every((c) => c > 0) && counts.reduce((a, b) => a + b, 0) >= numTokens
  return { running, streaming }
}

const rowsOf = (dbUrl: string, conversationId: string) =>
  sqlAt("SELECT seq, role, status, content FROM chat_turns WHERE conversation_id = $1 ORDER BY seq", [conversationId], dbUrl)

/** Every acknowledged turn has its reply row, and the client's text equals it. */
const audit = async (dbUrl: string, results: ReadonlyArray<TurnResult>, statuses: ReadonlyArray<string>) => {
  for (const r of results.filter((r) => r.status === 200)) {
    const rows = await rowsOf(dbUrl, r.conversationId)
    const user = [...rows].reverse().find((row: any) => row.role === "user")
    expect(user).toBeDefined()
    const reply = rows.find((row) => row.seq === user.seq + 1)
    expect(reply?.role).toBe("assistant")
    expect(statuses).toContain(reply.status)
    if (reply.status !== "failed") expect(reply.content).toBe(r.text)
  }
}

const enginePid = (service: Service): number =>
  Number(execFileSync("pgrep", ["-f", `llm-engine.*${service.runDir}`]).toString().trim().split("\n")[0])

const waitFor = async (predicate: () => boolean, timeoutMs: number) => {
  const deadline = Date.now() + timeoutMs
  while (!predicate() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10))
}

const exited = (service: Service) =>
  new Promise<number | null>((resolve) =>
    service.process.exitCode !== null ? resolve(service.process.exitCode) : service.process.once("exit", (code) => resolve(code))
  )

/**
 * Runs `drill` against a service whose PostgreSQL (a database of its own) is reached through a
 * TCP proxy the drill controls; the service is stopped and the proxy closed after.
 */
const withProxiedDatabase = async (
  drill: (context: { readonly dbUrl: string; readonly proxy: TcpProxy; readonly service: Service }) => Promise<void>,
  env: Record<string, string> = {}
) => {
  assertEngineBuilt()
  const dbUrl = (await freshDatabase()).url
  const direct = new URL(dbUrl)
  const proxy = await tcpProxy({ host: direct.hostname, port: Number(direct.port || 5432) })
  try {
    const proxied = new URL(dbUrl)
    proxied.hostname = "127.0.0.1"
    proxied.port = String(proxy.port)
    const service = await startService({ env: { DATABASE_URL: proxied.toString(), ...env } })
    try {
      await drill({ dbUrl, proxy, service })
    } finally {
      await service.stop()
    }
  } finally {
    await proxy.close()
  }
}

describe("drills on a running service (own database)", () => {
  let service: Service
  let dbUrl: string

  beforeAll(async () => {
    assertEngineBuilt()
    dbUrl = (await freshDatabase()).url
    service = await startService({
      env: { DATABASE_URL: dbUrl, CLUSTER_CONFIG: "test/e2e/drill.config.ts", DRILL_MAX_NUM_SEQS: "4", DRILL_NUM_SLOTS: "8" }
    })
  }, 120_000)

  afterAll(async () => {
    await service?.stop()
  })

  it("hostile model names and cursors are 4xx and store nothing", async () => {
    for (const model of ["constructor", "__proto__", "toString", "hasOwnProperty"]) {
      const res = await postJson(`${service.url}/v1/conversations`, { model })
      expect(res.status).toBe(404)
      expect(((await res.json()) as any).error.code).toBe("model_not_found")
    }
    expect((await sqlAt("SELECT count(*)::int AS n FROM chat_conversations", [], dbUrl))[0].n).toBe(0)
    const id = await create(service.url)
    for (const before of ["2147483648", "999999999999999"]) {
      const res = await fetch(`${service.url}/v1/conversations/${id}?before=${before}`)
      expect(res.status).toBe(400)
    }
  })

  it("past the waiting bound a turn is refused with 503 and Retry-After, and stores nothing", async () => {
    const ids = await Promise.all(Array.from({ length: 14 }, () => create(service.url)))
    const controllers = ids.map(() => new AbortController())
    const responses = await Promise.all(ids.map((id, i) =>
      postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Go on", max_tokens: 3000 }, controllers[i]!.signal)
    ))
    const refused = responses.flatMap((res, i) => res.status === 503 ? [i] : [])
    expect(responses.filter((r) => r.status === 200).length).toBeLessThanOrEqual(8)
    expect(refused.length).toBeGreaterThanOrEqual(6)
    for (const i of refused) {
      expect(responses[i]!.headers.get("retry-after")).toMatch(/^[0-9]+$/)
      expect(((await responses[i]!.json()) as any).error.code).toBe("overloaded")
      expect(await rowsOf(dbUrl, ids[i]!)).toEqual([])
    }
    for (const c of controllers) c.abort()
    // Every slot comes back: a later turn is served.
    await new Promise((r) => setTimeout(r, 500))
    const later = await turn(service.url, ids[refused[0]!]!, { content: "Now", max_tokens: 4 })
    expect(later.terminal?.event).toBe("done")
  })

  it("a new turn right after a cancel's 204 is taken (20 tries)", async () => {
    const id = await create(service.url)
    for (let i = 0; i < 20; i++) {
      const res = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: `long ${i}`, max_tokens: 3000 })
      expect(res.status).toBe(200)
      const reading = readSse(res, () => undefined)
      const cancel = await fetch(`${service.url}/v1/conversations/${id}/cancel`, { method: "POST" })
      expect(cancel.status).toBe(204)
      const next = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: `short ${i}`, max_tokens: 2 })
      expect(next.status).toBe(200)
      await readSse(next, () => undefined)
      await reading
    }
    const rows = await rowsOf(dbUrl, id)
    expect(rows.map((r) => r.seq)).toEqual(rows.map((_, i) => i))
  }, 60_000)

  it("an engine killed mid-stream is restarted; its streams pause, then finish, and turns sent meanwhile are served", async () => {
    const ids = await Promise.all(Array.from({ length: 4 }, () => create(service.url)))
    const { running, streaming } = startTurns(service.url, ids, { content: "Tell me a story", max_tokens: 120, temperature: 0 })
    await waitFor(() => streaming(8), 10_000)
    process.kill(enginePid(service), "SIGKILL")
    const during = turn(service.url, await create(service.url), { content: "Meanwhile", max_tokens: 8 })
    const results = [...(await Promise.all(running)), await during]
    for (const r of results) {
      expect(r.status).toBe(200)
      expect(r.terminal?.event).toBe("done")
    }
    await audit(dbUrl, results, ["completed"])
  }, 60_000)

  it("a hung engine (SIGSTOP) is killed after its step deadline and its streams finish", async () => {
    const ids = await Promise.all(Array.from({ length: 3 }, () => create(service.url)))
    const { running, streaming } = startTurns(service.url, ids, { content: "Another story", max_tokens: 80 })
    await waitFor(() => streaming(6), 10_000)
    const pid = enginePid(service)
    process.kill(pid, "SIGSTOP")
    const t0 = Date.now()
    const results = await Promise.all(running)
    expect(Date.now() - t0).toBeLessThan(20_000)
    for (const r of results) expect(r.terminal?.event).toBe("done")
    await audit(dbUrl, results, ["completed"])
    try {
      process.kill(pid, "SIGCONT")
    } catch {
      // killed, as it should be
    }
  }, 60_000)

  it("terminated database backends during traffic: every turn is stored and matches what its client saw", async () => {
    const ids = await Promise.all(Array.from({ length: 4 }, () => create(service.url)))
    const dbName = new URL(dbUrl).pathname.slice(1)
    const running = ids.map((id) => turn(service.url, id, { content: "Keep going", max_tokens: 60 }))
    for (let i = 0; i < 3; i++) {
      await new Promise((r) => setTimeout(r, 150))
      await sqlAt("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", [dbName])
    }
    const results = await Promise.all(running)
    for (const r of results) expect(r.terminal?.event).toBe("done")
    await audit(dbUrl, results, ["completed"])
    // The service recovered by itself.
    const after = await turn(service.url, await create(service.url), { content: "After", max_tokens: 4 })
    expect(after.terminal?.event).toBe("done")
    expect((await fetch(`${service.url}/readyz`)).status).toBe(200)
  }, 60_000)

  /**
   * The fault of the next two drills: every assistant row of conversation `id` is refused with
   * SQLSTATE `errcode`, from now until the returned function drops the trigger.
   */
  const refuseReplies = async (id: string, errcode: string) => {
    await sqlAt(`CREATE OR REPLACE FUNCTION drill_refuse_reply() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'drill: reply refused' USING ERRCODE = TG_ARGV[0]; END $$ LANGUAGE plpgsql`, [], dbUrl)
    await sqlAt(`CREATE TRIGGER drill_refuse_reply BEFORE INSERT ON chat_turns FOR EACH ROW WHEN (NEW.role = 'assistant' AND NEW.conversation_id = '${id}') EXECUTE FUNCTION drill_refuse_reply('${errcode}')`, [], dbUrl)
    return () => sqlAt(`DROP TRIGGER drill_refuse_reply ON chat_turns`, [], dbUrl)
  }

  it("a reply the database refuses to store: its client gets storage_error, and the next turn first stores it failed (no hole in the numbering)", async () => {
    const id = await create(service.url)
    // Not a transient error (P0001, raise_exception): no retry saves it.
    const restore = await refuseReplies(id, "P0001")
    let first: TurnResult
    try {
      first = await turn(service.url, id, { content: "First", max_tokens: 4 })
    } finally {
      await restore()
    }
    expect(first.status).toBe(200)
    expect(first.terminal?.event).toBe("error")
    expect(first.terminal?.data.error.code).toBe("storage_error")
    const second = await turn(service.url, id, { content: "Second", max_tokens: 4 })
    expect(second.terminal?.event).toBe("done")
    const rows = await rowsOf(dbUrl, id)
    expect(rows.map((r: any) => `${r.seq}:${r.role}:${r.status}`)).toEqual(["0:user:completed", "1:assistant:failed", "2:user:completed", "3:assistant:completed"])
    expect(rows[3].content).toBe(second.text)
  }, 60_000)

  it("a database that fails transiently for longer than a statement's retries while a reply is stored: the client waits, then gets done, and the reply is stored", async () => {
    const id = await create(service.url)
    // 08006 (connection_failure), as a database that is down would give, for 9 s: past the
    // ~6 s of retries of one statement.
    const restore = await refuseReplies(id, "08006")
    const faultMs = 9_000
    const restored = new Promise((r) => setTimeout(r, faultMs)).then(restore)
    const t0 = Date.now()
    let r: TurnResult
    try {
      r = await turn(service.url, id, { content: "Go on", max_tokens: 8 })
    } finally {
      await restored
    }
    expect(r.terminal?.event).toBe("done")
    expect(Date.now() - t0).toBeGreaterThanOrEqual(faultMs)
    await audit(dbUrl, [r], ["completed"])
  }, 60_000)
})

describe("stop and crash drills (own database)", () => {
  it("SIGTERM: in-flight turns end with shutting_down, are stored cancelled with their text, and the process exits", async () => {
    assertEngineBuilt()
    const dbUrl = (await freshDatabase()).url
    const service = await startService({ env: { DATABASE_URL: dbUrl, SHUTDOWN_GRACE_MS: "300" } })
    try {
      const ids = await Promise.all(Array.from({ length: 20 }, () => create(service.url)))
      const { running, streaming } = startTurns(service.url, ids, { content: "A very long answer", max_tokens: 3000 })
      await waitFor(() => streaming(40), 20_000)
      const exit = exited(service)
      service.process.kill("SIGTERM")
      const results = await Promise.all(running)
      expect(await exit).toBe(0)
      for (const r of results) {
        expect(r.status).toBe(200)
        expect(r.terminal?.event).toBe("error")
        expect(r.terminal?.data.error.code).toBe("shutting_down")
      }
      await audit(dbUrl, results, ["cancelled"])
    } finally {
      await service.stop()
    }
  }, 90_000)

  it("SIGTERM while the database is unreachable: the clients are told shutting_down, the process exits all the same, and the next start settles their turns", () =>
    withProxiedDatabase(async ({ dbUrl, proxy, service }) => {
      const ids = await Promise.all(Array.from({ length: 4 }, () => create(service.url)))
      const { running, streaming } = startTurns(service.url, ids, { content: "A very long answer", max_tokens: 3000 })
      await waitFor(() => streaming(20), 20_000)
      await proxy.down()
      // Past the shard lock's failed refreshes (~1.5 s in): from there the stop hung for good.
      await new Promise((r) => setTimeout(r, 3000))
      const exit = exited(service)
      const stoppedAtMs = Date.now()
      service.process.kill("SIGTERM")
      const results = await Promise.all(running)
      for (const r of results) {
        expect(r.status).toBe(200)
        expect(r.terminal?.data.error?.code).toBe("shutting_down")
      }
      // Past the drains (2 × 300 ms of grace, 10 s to store the stopped turns) and a 15 s margin.
      expect(await exit).toBe(1)
      expect(Date.now() - stoppedAtMs).toBeLessThan(40_000)
      await proxy.up()
      const restarted = await startService({ env: { DATABASE_URL: dbUrl } })
      try {
        await audit(dbUrl, results, ["cancelled", "failed"])
        for (const id of ids) expect((await turn(restarted.url, id, { content: "Again", max_tokens: 4 })).terminal?.event).toBe("done")
      } finally {
        await restarted.stop()
      }
    }, { SHUTDOWN_GRACE_MS: "300" }), 120_000)

  it("a database unreachable for 3 s while replies stream (connections reset, then refused): the clients wait, get done, and every reply is stored", () =>
    withProxiedDatabase(async ({ dbUrl, proxy, service }) => {
      const ids = await Promise.all(Array.from({ length: 4 }, () => create(service.url)))
      const { running, streaming } = startTurns(service.url, ids, { content: "Tell me more", max_tokens: 60 })
      await waitFor(() => streaming(8), 20_000)
      // A lost connection fails with ECONNRESET or ECONNREFUSED, not a SQLSTATE: it was taken
      // for a permanent error, and the replies ended in storage_error, stored failed.
      await proxy.down()
      await new Promise((r) => setTimeout(r, 3000))
      await proxy.up()
      const results = await Promise.all(running)
      for (const r of results) {
        expect(r.status).toBe(200)
        expect(r.terminal?.event).toBe("done")
      }
      await audit(dbUrl, results, ["completed"])
    }), 90_000)

  it("a database gone for 9 s as a user turn is stored (the INSERT's answer lost): the service serves new conversations and turns once it is back", () =>
    withProxiedDatabase(async ({ dbUrl, proxy, service }) => {
      const within = <A>(promise: Promise<A>, ms: number, what: string) =>
        Promise.race([promise, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms))])
      const id = await create(service.url)
      // The user turn's INSERT gets no answer (it commits), then every connection is reset and
      // refused for 9 s. The shard lock refreshes failed too: the sole runner gave up every
      // shard and waited for their entities to close, and every entity call of the service
      // hung for good once the database was back.
      const key = `drill-${Date.now()}`
      proxy.holdRepliesTo(["INSERT INTO chat_turns", key])
      const pending = postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Store me", max_tokens: 30 }, { "idempotency-key": key })
        .then(async (res) => ({ status: res.status, body: await res.text() }))
      await new Promise((r) => setTimeout(r, 250))
      await proxy.down()
      await new Promise((r) => setTimeout(r, 9000))
      await proxy.up()
      const first = await within(pending, 30_000, "the turn whose INSERT lost its answer")
      expect([200, 503]).toContain(first.status)
      const other = await within(create(service.url), 30_000, "a new conversation")
      const next = await within(turn(service.url, other, { content: "Again", max_tokens: 4 }), 30_000, "a new conversation's turn")
      expect(next.terminal?.event).toBe("done")
      const again = await within(turn(service.url, id, { content: "And again", max_tokens: 4 }), 30_000, "the first conversation's next turn")
      expect(again.terminal?.event).toBe("done")
      await audit(dbUrl, [next, again], ["completed"])
    }), 150_000)

  it("a turn whose user INSERT gets no answer is refused 503 once CONVERSATION_CALL_TIMEOUT passes, and the conversation goes on once the database answers", () =>
    withProxiedDatabase(async ({ proxy, service }) => {
      const id = await create(service.url)
      const key = `held-${Date.now()}`
      proxy.holdRepliesTo(["INSERT INTO chat_turns", key])
      const startMs = Date.now()
      // Without the bound the request waited as long as the statement did: here, for ever.
      const held = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: "Held", max_tokens: 4 }, { "idempotency-key": key })
      expect(held.status).toBe(503)
      expect(((await held.json()) as any).error.code).toBe("storage_unavailable")
      expect(Date.now() - startMs).toBeLessThan(10_000)
      // The held connection is reset: the statement is retried, the turn settles, and the
      // conversation takes its next turn.
      await proxy.down()
      await proxy.up()
      const deadline = Date.now() + 30_000
      let next = await turn(service.url, id, { content: "After", max_tokens: 4 })
      while (next.status === 409 && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 200))
        next = await turn(service.url, id, { content: "After", max_tokens: 4 })
      }
      expect(next.terminal?.event).toBe("done")
    }, { CONVERSATION_CALL_TIMEOUT: "3 seconds" }), 90_000)

  it("a share whose INSERT commits but loses its answer: the retry returns that share, and there is one", () =>
    withProxiedDatabase(async ({ dbUrl, proxy, service }) => {
      const id = await create(service.url)
      proxy.holdRepliesTo(["INSERT INTO chat_shares"])
      const pending = fetch(`${service.url}/v1/conversations/${id}/share`, { method: "POST" })
      await new Promise((r) => setTimeout(r, 500))
      // The retry found its own row (a unique violation) and reported a storage error.
      await proxy.down()
      await new Promise((r) => setTimeout(r, 500))
      await proxy.up()
      const res = await pending
      expect(res.status).toBe(201)
      const share = (await res.json()) as { share_id: string }
      expect((await fetch(`${service.url}/v1/shared/${share.share_id}`)).status).toBe(200)
      const rows = await sqlAt("SELECT share_id FROM chat_shares WHERE conversation_id = $1", [id], dbUrl)
      expect(rows.map((r) => r.share_id)).toEqual([share.share_id])
    }), 60_000)

  it("SIGKILL: on restart every acknowledged turn gets a failed reply and no number is reused", async () => {
    assertEngineBuilt()
    const dbUrl = (await freshDatabase()).url
    const first = await startService({ env: { DATABASE_URL: dbUrl } })
    const ids = await Promise.all(Array.from({ length: 20 }, () => create(first.url)))
    const { running, streaming } = startTurns(first.url, ids, { content: "Crash me", max_tokens: 3000 })
    await waitFor(() => streaming(40), 20_000)
    const exit = exited(first)
    first.process.kill("SIGKILL")
    await exit
    const results = await Promise.all(running)
    const second = await startService({ env: { DATABASE_URL: dbUrl }, dataDir: first.dataDir })
    try {
      await audit(dbUrl, results, ["failed"])
      const next = await turn(second.url, ids[0]!, { content: "Again", max_tokens: 3 })
      expect(next.terminal?.event).toBe("done")
      const rows = await rowsOf(dbUrl, ids[0]!)
      expect(rows.map((r) => [r.seq, r.role, r.status])).toEqual([
        [0, "user", "completed"],
        [1, "assistant", "failed"],
        [2, "user", "completed"],
        [3, "assistant", "completed"]
      ])
    } finally {
      await second.stop()
    }
  }, 120_000)

  it("SIGKILL on the embedded store (PGlite): on restart every acknowledged turn has a failed reply, numbering goes on", async () => {
    assertEngineBuilt()
    const env = { DATABASE_URL: undefined }
    const first = await startService({ env })
    const ids = await Promise.all(Array.from({ length: 5 }, () => create(first.url)))
    const { running, streaming } = startTurns(first.url, ids, { content: "Crash me", max_tokens: 3000 })
    await waitFor(() => streaming(10), 20_000)
    const exit = exited(first)
    first.process.kill("SIGKILL")
    await exit
    const results = await Promise.all(running)
    expect(results.every((r) => r.status === 200)).toBe(true)
    const second = await startService({ env, dataDir: first.dataDir })
    try {
      // The audit through HTTP: the store is inside the service.
      for (const id of ids) {
        const response = await fetch(`${second.url}/v1/conversations/${id}`)
        const history = (await response.json()) as any
        if (response.status !== 200) console.log(second.output().slice(-6000))
        expect({ status: response.status, body: response.status === 200 ? "" : history }).toEqual({ status: 200, body: "" })
        expect(history.turns.map((t: any) => [t.seq, t.role, t.status])).toEqual([[0, "user", "completed"], [1, "assistant", "failed"]])
      }
      const next = await turn(second.url, ids[0]!, { content: "Again", max_tokens: 3 })
      expect({ status: next.status, terminal: next.terminal?.event }).toEqual({ status: 200, terminal: "done" })
      const after = (await (await fetch(`${second.url}/v1/conversations/${ids[0]}`)).json()) as any
      expect(after.turns.map((t: any) => [t.seq, t.role, t.status])).toEqual([
        [0, "user", "completed"],
        [1, "assistant", "failed"],
        [2, "user", "completed"],
        [3, "assistant", "completed"]
      ])
    } finally {
      await second.stop()
    }
  }, 180_000)
})
