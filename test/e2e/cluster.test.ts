/**
 * The local cluster (examples/cluster-local.config.ts) as separate processes on loopback:
 * gateways gw-1 and gw-2, GPU runners gpu-1 and gpu-2 (simulated GPUs), one PostgreSQL.
 * Clients talk HTTP/SSE to either gateway; tokens cross from the GPU runner to the gateway
 * that holds the client's socket over the ZeroMQ data plane. Each test ends in a loss audit:
 * every acknowledged user turn has its reply row, and every client's text equals it.
 */
import { execFile, execFileSync } from "node:child_process"
import { promisify } from "node:util"
import { readdirSync, readFileSync, readlinkSync } from "node:fs"
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest"
import { type LocalCluster, privateRedis, type RedisProcess, startCluster } from "../support/cluster.js"
import { freshDatabase, sqlAt } from "../support/database.js"
import { assertEngineBuilt } from "../support/engineProcess.js"
import { postJson, readSse, type SseEvent } from "../support/service.js"

interface TurnResult {
  readonly conversationId: string
  readonly events?: ReadonlyArray<SseEvent>
  readonly status: number
  readonly text: string
  readonly terminal: SseEvent | undefined
}

const create = async (url: string): Promise<string> => {
  // A pooled keep-alive socket to a gateway that a drill restarted can be found closed on
  // first use ("other side closed"): a create is safe to send again.
  const res = await postJson(`${url}/v1/conversations`, {}).catch(() => postJson(`${url}/v1/conversations`, {}))
  expect(res.status).toBe(201)
  return ((await res.json()) as any).conversation_id
}

/**
 * `npm run cluster -- ARGS` against the cluster's database, without blocking this process: a
 * synchronous child held the event loop for seconds, past the gateways' 5 s keep-alive, and
 * the next request then went out on a pooled socket the gateway had closed meanwhile.
 */
const clusterCli = async (dbUrl: string, ...args: Array<string>): Promise<string> =>
  (await promisify(execFile)(process.execPath, ["--import", "tsx", "scripts/cluster.ts", ...args], { env: { ...process.env, DATABASE_URL: dbUrl } })).stdout

const turn = async (
  url: string,
  conversationId: string,
  body: Record<string, unknown>,
  signal?: AbortSignal,
  onToken?: () => void
): Promise<TurnResult> => {
  const res = await postJson(`${url}/v1/conversations/${conversationId}/turns`, { role: "user", ...body }, signal)
  if (res.status !== 200) return { conversationId, status: res.status, text: "", terminal: undefined }
  const events = await readSse(res, (e) => void (e.event === "token" && onToken?.()))
  return {
    conversationId,
    status: res.status,
    events,
    text: events.filter((e) => e.event === "token").map((e) => e.data.text).join(""),
    terminal: events.find((e) => e.event === "done" || e.event === "error")
  }
}

/** The local ports of process `pid`'s TCP connections to `port` (read from /proc). */
const clientPortsOf = (pid: number, port: number): Set<number> => {
  const inodes = new Set<string>()
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const socket = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`))?.[1]
      if (socket !== undefined) inodes.add(socket)
    } catch {
      // closed meanwhile
    }
  }
  const ports = new Set<number>()
  for (const table of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    for (const line of readFileSync(table, "utf8").split("\n").slice(1)) {
      // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
      const f = line.trim().split(/\s+/)
      if (f.length > 9 && parseInt(f[2]!.split(":")[1]!, 16) === port && inodes.has(f[9]!)) ports.add(parseInt(f[1]!.split(":")[1]!, 16))
    }
  }
  return ports
}

const rowsOf = (dbUrl: string, conversationId: string) =>
  sqlAt("SELECT seq, role, status, content FROM chat_turns WHERE conversation_id = $1 ORDER BY seq", [conversationId], dbUrl)

/** Every acknowledged turn's reply is stored, and equals what its client read. */
const audit = async (dbUrl: string, results: ReadonlyArray<TurnResult>) => {
  for (const r of results.filter((r) => r.status === 200)) {
    const rows = await rowsOf(dbUrl, r.conversationId)
    const user = [...rows].reverse().find((row: any) => row.role === "user")
    const reply = rows.find((row) => row.seq === user.seq + 1)
    expect(reply?.role).toBe("assistant")
    expect(reply.status).toBe("completed")
    expect(reply.content).toBe(r.text)
  }
}

/**
 * One more turn of each conversation through `url`: a turn being taken over or moved is 409
 * `turn_in_progress` for a while (retried each second, up to 30 times), never for good.
 * @returns each conversation's last attempt.
 */
const oneMoreTurn = (url: string, ids: ReadonlyArray<string>, body: Record<string, unknown>) =>
  Promise.all(ids.map(async (id) => {
    for (let attempt = 0; ; attempt++) {
      const r = await turn(url, id, body, AbortSignal.timeout(30_000))
      if (r.status === 200 || attempt === 30) return r
      await new Promise((res) => setTimeout(res, 1000))
    }
  }))

/**
 * The audit of a drill whose conversations all end with a taken turn: each one's last request
 * is a 200, every 200 ends with `done`, each stored history alternates user / completed reply,
 * and the clients' texts are its replies, in order.
 */
const auditTurnsDone = async (dbUrl: string, ids: ReadonlyArray<string>, results: ReadonlyArray<TurnResult>) => {
  for (const id of ids) expect(results.filter((r) => r.conversationId === id).at(-1)?.status, id).toBe(200)
  for (const r of results.filter((r) => r.status === 200)) expect(r.terminal?.event, r.conversationId).toBe("done")
  for (const id of ids) {
    const rows = await rowsOf(dbUrl, id)
    const texts = results.filter((r) => r.conversationId === id && r.status === 200).map((r) => r.text)
    expect(rows.map((r: any) => `${r.seq}:${r.role}:${r.status}`), id).toEqual(
      rows.map((_: any, seq: number) => `${seq}:${seq % 2 === 0 ? "user" : "assistant"}:completed`)
    )
    expect(rows.filter((r: any) => r.role === "assistant").map((r: any) => r.content)).toEqual(texts)
  }
}

describe("local cluster: two gateways, two GPU runners", () => {
  let cluster: LocalCluster
  let dbUrl: string
  // A Redis of this suite's own, so that drill (e) can stop it.
  let redis: RedisProcess
  const stopped = new WeakSet<object>()

  beforeAll(async () => {
    assertEngineBuilt()
    dbUrl = (await freshDatabase()).url
    redis = await privateRedis()
    // 2 GiB of KV per simulated GPU (16k tokens): drill (c) moves eight 1,200-token turns onto
    // one GPU, which must not turn into a preemption drill.
    cluster = await startCluster({ databaseUrl: dbUrl, redisUrl: redis.url, env: { CLUSTER_LOCAL_KV_CACHE_BYTES: String(2 * 1024 * 1024 * 1024) } })
  }, 180_000)

  // Drills (c), (c, starts), (d) and (e, resume) race kills against live traffic and are run again once
  // on failure (timing flakes on a loaded 2-core machine: see the closing notes); afterEach
  // starts the killed runners again in between.
  afterEach(async (ctx) => {
    // A failed test shows what the runners warned of meanwhile.
    if (ctx.task.result?.state === "fail") {
      for (const r of cluster?.runners.values() ?? []) {
        const lines = r.output().split("\n").filter((l) => / (WARN|ERROR) /.test(l) && !l.includes("no authentication"))
        console.log(`${r.name}: last warnings\n${lines.slice(-30).join("\n")}`)
      }
      // ... and what they logged about the conversations its error names.
      const named = new Set((ctx.task.result.errors ?? []).flatMap((e) => String(e?.message).match(/conv_[0-9a-f]{32}/g) ?? []))
      for (const id of named) {
        for (const r of cluster?.runners.values() ?? []) {
          const lines = r.output().split("\n").filter((l) => l.includes(id))
          if (lines.length > 0) console.log(`${r.name} on ${id}:\n${lines.slice(-40).join("\n")}`)
        }
      }
    }
    for (const r of [...(cluster?.runners.values() ?? [])]) {
      // A runner that ended by itself (not killed by a drill) crashed: its last output says why.
      if (r.process.exitCode !== null && r.process.signalCode === null && !stopped.has(r.process)) {
        stopped.add(r.process)
        console.log(`${r.name} exited with ${r.process.exitCode}:\n${r.output().slice(-4000)}`)
      }
      // A drill that failed before starting its victim again must not fail the tests after it.
      if (r.process.exitCode !== null || r.process.signalCode !== null) {
        console.log(`${r.name} is not running after this test: started again`)
        await cluster.restart(r.name)
      }
    }
  }, 180_000)

  afterAll(async () => {
    await cluster?.stop()
    await redis?.kill()
  }, 60_000)

  // The runner's connections to PostgreSQL (client ports), then those of them holding
  // advisory locks: its shard locks' connection, whose refresh must answer within ~1.3 s
  // (and, should it have been rebuilt, an old one not closed yet). Right after a start the
  // locks may still be being taken.
  const lockBackendsOf = async (runner: string): Promise<Array<string>> => {
    for (let i = 0; ; i++) {
      const ports = clientPortsOf(cluster.runners.get(runner)!.process.pid!, Number(new URL(dbUrl).port || 5432))
      const holders = await sqlAt(
        "SELECT DISTINCT a.pid, a.client_port FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid WHERE l.locktype = 'advisory' AND l.granted"
      )
      const pids = holders.filter((h: any) => ports.has(h.client_port)).map((h: any) => String(h.pid))
      if (pids.length > 0) return pids
      expect(i, `${runner} holds no shard lock`).toBeLessThan(40)
      await new Promise((r) => setTimeout(r, 500))
    }
  }

  // First: the shards of a cluster that has just started are still settling between the
  // gateways; calls to entities whose shard moves mid-call are sent again to the new owner.
  it("right after start, a burst of 512 conversations over both gateways: every create and turn succeeds", async () => {
    const failures: Array<string> = []
    const results = await Promise.all(Array.from({ length: 512 }, async (_, i) => {
      const res = await postJson(`${cluster.gateways[i % 2]}/v1/conversations`, {})
      if (res.status !== 201) {
        failures.push(`create ${res.status} ${await res.text()}`)
        return undefined
      }
      const id = ((await res.json()) as any).conversation_id
      const r = await turn(cluster.gateways[(i + 1) % 2]!, id, { content: "burst", max_tokens: 16 })
      if (r.status !== 200 || r.terminal?.event !== "done") failures.push(`turn ${r.status} ${JSON.stringify(r.terminal?.data)}`)
      return r
    }))
    expect(failures).toEqual([])
    await audit(dbUrl, results.filter((r) => r !== undefined))
  }, 120_000)

  it("conversations take turns through either gateway; every client's text is the stored reply", async () => {
    const [gw1, gw2] = cluster.gateways
    const ids = await Promise.all(Array.from({ length: 8 }, (_, i) => create(i % 2 === 0 ? gw1 : gw2)))
    const results: Array<TurnResult> = []
    for (const round of [0, 1]) {
      // Each conversation's turns alternate between the gateways.
      const batch = await Promise.all(ids.map((id, i) => turn((i + round) % 2 === 0 ? gw1 : gw2, id, { content: `hello ${round}`, max_tokens: 24 })))
      for (const r of batch) {
        expect(r.status).toBe(200)
        expect(r.terminal?.event).toBe("done")
      }
      await audit(dbUrl, batch)
      results.push(...batch)
    }
    for (const id of ids) expect((await rowsOf(dbUrl, id)).map((r) => r.seq)).toEqual([0, 1, 2, 3])
    // Both GPU runners served turns (the pool spreads sequences over its GPUs).
    const history = await Promise.all(ids.map((id) => fetch(`${gw2}/v1/conversations/${id}`).then((r) => r.json() as Promise<any>)))
    expect(history.every((h) => h.turns.length === 4)).toBe(true)
  }, 120_000)

  it("two gateways racing on one conversation stream exactly one turn", async () => {
    const [gw1, gw2] = cluster.gateways
    for (let i = 0; i < 5; i++) {
      const id = await create(gw1)
      const results = await Promise.all([gw1, gw2].map((gw) => turn(gw, id, { content: `race ${i}`, max_tokens: 32 })))
      expect(results.map((r) => r.status).sort()).toEqual([200, 409])
      await audit(dbUrl, results)
      expect((await rowsOf(dbUrl, id)).length).toBe(2)
    }
  }, 120_000)

  it("a client that goes away on gw-2 ends its turn as cancelled; the conversation takes the next one", async () => {
    const [gw1, gw2] = cluster.gateways
    const id = await create(gw1)
    const controller = new AbortController()
    const res = await postJson(`${gw2}/v1/conversations/${id}/turns`, { role: "user", content: "long", max_tokens: 3000 }, controller.signal)
    expect(res.status).toBe(200)
    let seen = 0
    await readSse(res, (e) => (e.event === "token" && ++seen >= 5 ? "stop" : undefined)).catch(() => [])
    controller.abort()
    const deadline = Date.now() + 10_000
    let rows: Array<any> = []
    while (Date.now() < deadline) {
      rows = await rowsOf(dbUrl, id)
      if (rows.length === 2) break
      await new Promise((r) => setTimeout(r, 100))
    }
    expect(rows.map((r) => [r.seq, r.role, r.status])).toEqual([[0, "user", "completed"], [1, "assistant", "cancelled"]])
    const next = await turn(gw1, id, { content: "next", max_tokens: 4 })
    expect(next.terminal?.event).toBe("done")
    await audit(dbUrl, [next])
  }, 60_000)

  it("a gateway that joins during traffic takes its share of shards, and no request fails while they move", async () => {
    const [gw1, gw2Url] = cluster.gateways
    const gw2 = cluster.runners.get("gw-2")!
    gw2.process.kill("SIGTERM")
    await gw2.exited
    const gateways = [gw1]
    // Clients keep creating conversations and taking turns on gw-1 while gw-2 comes back:
    // requests in flight on the shards that move to it are sent again to their new owner.
    const results: Array<TurnResult> = []
    const failures: Array<string> = []
    let stop = false
    const client = async () => {
      for (let i = 0; !stop; i++) {
        const gw = gateways[i % gateways.length]!
        const res = await postJson(`${gw}/v1/conversations`, {})
        if (res.status !== 201) {
          failures.push(`create ${res.status} ${await res.text()}`)
          continue
        }
        const id = ((await res.json()) as any).conversation_id
        const r = await turn(gateways[(i + 1) % gateways.length]!, id, { content: "joining", max_tokens: 16 })
        if (r.status !== 200 || r.terminal?.event !== "done") failures.push(`turn ${r.status} ${JSON.stringify(r.terminal?.data)}`)
        results.push(r)
      }
    }
    const clients = Array.from({ length: 32 }, client)
    await new Promise((r) => setTimeout(r, 1000))
    await cluster.restart("gw-2")
    gateways.push(gw2Url) // ready: it serves requests while its shards come to it
    await new Promise((r) => setTimeout(r, 6000)) // the shard moves settle meanwhile
    stop = true
    await Promise.all(clients)
    expect(failures).toEqual([])
    expect(results.length).toBeGreaterThan(32)
    await audit(dbUrl, results)
    const status = await clusterCli(dbUrl, "status")
    // Both gateways hold Conversation shards (16 in the "default" group, split between them).
    const shards = (name: string) => Number(new RegExp(`^${name} +up +\\S+ +\\S+ +(\\d+)`, "m").exec(status)?.[1])
    expect(shards("gw-1")).toBeGreaterThan(0)
    expect(shards("gw-2")).toBeGreaterThan(0)
    expect(shards("gw-1") + shards("gw-2")).toBe(16)
  }, 120_000)

  it("conversations whose gateway stops load on the other one from the shared cache (Redis), with the same prompts", async () => {
    const [gw1] = cluster.gateways
    const ids: Array<string> = []
    for (let i = 0; i < 32; i++) ids.push(await create(gw1))
    // The same turn with the same seed everywhere: every conversation holds the same history.
    const first = await Promise.all(ids.map((id) => turn(gw1, id, { content: "Where is Lyon?", max_tokens: 12, seed: 7 })))
    expect(first.map((r) => r.terminal?.event)).toEqual(ids.map(() => "done"))
    expect(new Set(first.map((r) => r.text)).size).toBe(1)
    const loads = async () => {
      const text = await (await fetch(`${gw1}/metrics`)).text()
      return Number(/conversation_loads_total\{source="shared"\} (\d+)/.exec(text)?.[1] ?? 0)
    }
    const before = await loads()
    // gw-2 stops: its conversations' entities start on gw-1, which never held them.
    const gw2 = cluster.runners.get("gw-2")!
    gw2.process.kill("SIGTERM")
    await gw2.exited
    const second = await Promise.all(ids.map((id) => turn(gw1, id, { content: "And Lisbon?", max_tokens: 4, seed: 7 })))
    expect(second.map((r) => r.status)).toEqual(ids.map(() => 200))
    // Whether the state came from this runner's memory, the shared entry or the store, the prompt is the same.
    expect(new Set(second.map((r) => r.terminal?.data.usage.prompt_tokens)).size).toBe(1)
    expect(await loads()).toBeGreaterThan(before)
    await cluster.restart("gw-2")
  }, 120_000)

  /**
   * Streams a long turn of each conversation through gw-1, SIGKILLs gw-1 once every client
   * has 10 tokens, and waits for the cut streams. @returns each client's token events.
   */
  const streamThenKillGw1 = async (ids: ReadonlyArray<string>, content: string, maxTokens: number) => {
    const [gw1] = cluster.gateways
    const seen = ids.map(() => [] as Array<SseEvent>)
    const first = ids.map((id, i) =>
      postJson(`${gw1}/v1/conversations/${id}/turns`, { role: "user", content, max_tokens: maxTokens }).then((res) => {
        expect(res.status).toBe(200)
        return readSse(res, (e) => void seen[i]!.push(e)).catch(() => [])
      })
    )
    const deadline = Date.now() + 20_000
    while (seen.some((s) => s.filter((e) => e.event === "token").length < 10) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10))
    const gw1Process = cluster.runners.get("gw-1")!
    gw1Process.process.kill("SIGKILL")
    await gw1Process.exited
    await Promise.all(first)
    return seen.map((events) => events.filter((e) => e.event === "token"))
  }

  /**
   * Each client resumes on gw-2 with its last event id; every token comes exactly once, the
   * stream ends with done, and the stored reply is the client's whole text.
   * `onEvent` sees each resumed client's events as they come.
   * @returns how long after `since` the slowest resume was answered (ms).
   */
  const resumeOnGw2 = async (
    ids: ReadonlyArray<string>,
    before: ReadonlyArray<ReadonlyArray<SseEvent>>,
    since: number,
    onEvent: (client: number, e: SseEvent) => void = () => undefined
  ) => {
    const [, gw2] = cluster.gateways
    const resumed = await Promise.all(ids.map(async (id, i) => {
      const res = await fetch(`${gw2}/v1/conversations/${id}/stream`, { headers: { "last-event-id": before[i]!.at(-1)!.id! } })
      expect(res.status).toBe(200)
      const answeredAfterMs = Date.now() - since
      return { id, before: before[i]!, rest: await readSse(res, (e) => onEvent(i, e)), answeredAfterMs }
    }))
    for (const r of resumed) {
      const restTokens = r.rest.filter((e) => e.event === "token")
      // Every token exactly once: positions continue where the client was cut off.
      const indices = [...r.before, ...restTokens].map((e) => Number(e.id!.split(":").at(-1)))
      expect(indices).toEqual(indices.map((_, i) => i))
      expect(r.rest.at(-1)?.event, JSON.stringify(r.rest.at(-1)?.data)).toBe("done")
      // The turn completes and is stored (its Conversation may have lived on gw-1: the shard moves).
      const stored = await waitForRows(dbUrl, r.id, 2)
      expect(stored[1]).toMatchObject({ role: "assistant", status: "completed", content: [...r.before, ...restTokens].map((e) => e.data.text).join("") })
    }
    return Math.max(...resumed.map((r) => r.answeredAfterMs))
  }

  it("drill (a): SIGKILL the gateway that holds streaming clients; they resume on the other one, every token once; turns whose Conversation moved are taken over (409 to a second turn)", async () => {
    const [, gw2] = cluster.gateways
    // Eight conversations: their entities are spread over gw-1 and gw-2 by shard, so some move.
    const ids = await Promise.all(Array.from({ length: 8 }, () => create(gw2)))
    const before = await streamThenKillGw1(ids, "A long story", 1500)
    const killedAt = Date.now()
    // A second turn while the first streams is turn_in_progress, also where the Conversation
    // lived on gw-1: its new owner took the running turn over from the store and the log.
    const second = Promise.all(ids.map(async (id) => {
      const res = await postJson(`${gw2}/v1/conversations/${id}/turns`, { role: "user", content: "second", max_tokens: 4 })
      if (res.status === 200) await res.body?.cancel() // a second turn was accepted: the failure below says so
      return { status: res.status, body: res.status === 200 ? undefined : (await res.json()) as any }
    }))
    const resumedAfterMs = await resumeOnGw2(ids, before, killedAt)
    for (const r of await second) expect(r).toMatchObject({ status: 409, body: { error: { code: "turn_in_progress" } } })
    // The conversations take their next turn once the first has ended.
    const next = await Promise.all(ids.map((id) => turn(gw2, id, { content: "next", max_tokens: 4 })))
    for (const r of next) expect(r.terminal?.event).toBe("done")
    await audit(dbUrl, next)
    for (const id of ids) expect((await rowsOf(dbUrl, id)).map((r) => r.seq)).toEqual([0, 1, 2, 3])
    console.log(`drill (a): resume answered ${resumedAfterMs} ms after the kill (max of ${ids.length})`)
    await cluster.restart("gw-1")
  }, 120_000)

  it("drill (b): SIGKILL an engine of a GPU runner; its GpuWorker restarts it and the streams pause, then finish with the undisturbed text", async () => {
    const [gw1, gw2] = cluster.gateways
    const body = { content: "Another question", max_tokens: 800, temperature: 0 }
    const reference = await turn(gw1, await create(gw1), body)
    expect(reference.terminal?.event).toBe("done")
    const ids = await Promise.all(Array.from({ length: 6 }, (_, i) => create(i % 2 === 0 ? gw1 : gw2)))
    let seen = 0
    const running = ids.map((id, i) => turn(i % 2 === 0 ? gw1 : gw2, id, body, undefined, () => void seen++))
    const deadline = Date.now() + 20_000
    while (seen < 60 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10))
    execFileSync("pkill", ["-9", "-f", "engine-sim-2.sock"])
    const results = await Promise.all(running)
    for (const r of results) {
      expect(r.terminal?.event).toBe("done")
      expect(r.text).toBe(reference.text)
    }
    await audit(dbUrl, results)
  }, 120_000)

  it("drill (d): PostgreSQL backends terminated during traffic; the cluster recovers, no acknowledged turn is lost", async () => {
    const [gw1, gw2] = cluster.gateways
    const dbName = new URL(dbUrl).pathname.slice(1)
    const ids = await Promise.all(Array.from({ length: 6 }, (_, i) => create(i % 2 === 0 ? gw1 : gw2)))
    const running = ids.map((id, i) => turn(i % 2 === 0 ? gw2 : gw1, id, { content: "Keep going", max_tokens: 300 }))
    for (let i = 0; i < 3; i++) {
      await new Promise((r) => setTimeout(r, 200))
      await sqlAt("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", [dbName])
    }
    const results = await Promise.all(running)
    // Acknowledged (200) turns finish and are stored; a turn that could not be made durable was refused (503).
    for (const r of results) expect([200, 503]).toContain(r.status)
    for (const id of ids) expect(results.filter((r) => r.conversationId === id).at(-1)?.status, id).toBe(200)
    for (const r of results.filter((r) => r.status === 200)) expect(r.terminal?.event).toBe("done")
    await audit(dbUrl, results)
    // Recovered by itself: both gateways are ready and serve turns.
    const deadline = Date.now() + 30_000
    for (const gw of [gw1, gw2]) {
      while ((await fetch(`${gw}/readyz`)).status !== 200 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200))
      const after = await turn(gw, await create(gw), { content: "After", max_tokens: 8 })
      expect(after.terminal?.event).toBe("done")
      await audit(dbUrl, [after])
    }
  }, { timeout: 120_000, retry: 1 })

  it("drill (locks): the shard-lock connections of gw-1, then gpu-1, stall past the refresh deadline during traffic; every acknowledged turn ends done and is stored as its client read it", async () => {
    const [gw1, gw2] = cluster.gateways
    const unhealthy = (runner: string) => cluster.runners.get(runner)!.output().split("Shard lock storage is unhealthy").length
    const victims = ["gw-1", "gpu-1"] as const
    const before = victims.map(unhealthy)
    const ids = await Promise.all(Array.from({ length: 96 }, (_, i) => create(i % 2 === 0 ? gw1 : gw2)))
    let stalled = false
    const results: Array<TurnResult> = []
    // Each conversation takes turns back to back (through either gateway) until after the stalls.
    const loops = ids.map(async (id, i) => {
      for (let k = 0; k < 60 && (k < 2 || !stalled); k++) {
        // Bounded: a client left waiting on a turn that will never stream fails the drill.
        const r = await turn((i + k) % 2 === 0 ? gw1 : gw2, id, { content: `Turn ${k}`, max_tokens: 6 }, AbortSignal.timeout(30_000))
        results.push(r)
        // Not taken (the conversation moving between runners): nothing was stored; next one.
        if (r.status !== 200) await new Promise((res) => setTimeout(res, 200))
      }
    })
    // Twice each: every time a runner gives up its shards, whatever its entities are handling
    // then (SendTurn, FinishTurn on a gateway; Start, AcquireSlot, Ping on a GPU runner) is cut.
    // A stall of 4 s outlasts any refresh started in it by more than its 1.33 s deadline
    // (refreshes start every 1.33 s); a 2.5 s one missed when a refresh started late in it.
    // Up to two more stalls if the victim has not given up its shards yet (a stall that came
    // as its lock connection was being rebuilt, say).
    for (const [v, victim] of victims.entries()) {
      for (let i = 0; i < 4 && (i < 2 || unhealthy(victim) === before[v]); i++) {
        const backends = await lockBackendsOf(victim)
        await new Promise((r) => setTimeout(r, 1500))
        execFileSync("kill", ["-STOP", ...backends])
        await new Promise((r) => setTimeout(r, 4000))
        execFileSync("kill", ["-CONT", ...backends])
      }
    }
    stalled = true
    await Promise.all(loops)
    // No conversation is left stuck: each takes one more turn (a turn being taken over is 409
    // turn_in_progress for a while, never for good).
    results.push(...await oneMoreTurn(gw2, ids, { content: "After the stalls", max_tokens: 6 }))
    // The stalls did what the drill is for: each victim gave up its shards mid-traffic.
    expect(victims.map(unhealthy).map((n, i) => n > before[i]!)).toEqual([true, true])
    for (const r of results) expect([200, 503]).toContain(r.status)
    await auditTurnsDone(dbUrl, ids, results)
    // Drill (c), later, needs the gateways' GPU probers alive after gpu-1's shard moves.
  }, 150_000)

  it("drill (e): Redis stopped during traffic; streams go on, resuming is refused meanwhile (503), and works again when Redis is back", async () => {
    const [gw1, gw2] = cluster.gateways
    const ids = await Promise.all(Array.from({ length: 4 }, (_, i) => create(i % 2 === 0 ? gw1 : gw2)))
    let seen = 0
    const running = ids.map((id, i) => turn(i % 2 === 0 ? gw2 : gw1, id, { content: "Go on", max_tokens: 400 }, undefined, () => void seen++))
    const deadline = Date.now() + 20_000
    while (seen < 20 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10))
    await redis.kill()
    const results = await Promise.all(running)
    for (const r of results) expect(r.terminal?.event).toBe("done")
    await audit(dbUrl, results)
    const during = await fetch(`${gw1}/v1/conversations/${ids[0]}/stream`, { headers: { "last-event-id": `${ids[0]}:1:0` } })
    expect(during.status).toBe(503)
    expect(((await during.json()) as any).error.code).toBe("stream_unavailable")
    await redis.start()
    // Back: a new turn is logged again and can be resumed from its middle.
    const recovered = Date.now() + 20_000
    for (;;) {
      const id = await create(gw1)
      const r = await turn(gw2, id, { content: "Again", max_tokens: 30 })
      expect(r.terminal?.event).toBe("done")
      const res = await fetch(`${gw1}/v1/conversations/${id}/stream`, { headers: { "last-event-id": `${id}:1:9` } })
      if (res.status === 200) {
        const rest = await readSse(res, () => undefined)
        // Right after Redis returns a log may lack events: the resume says so, never a hole.
        if (rest.at(-1)?.event === "error") expect(rest.at(-1)!.data.error.code).toBe("stream_incomplete")
        else {
          expect(rest.filter((e) => e.event === "token").map((e) => e.data.text).join("")).toBe(
            r.events!.filter((e) => e.event === "token").slice(10).map((e) => e.data.text).join("")
          )
          break
        }
      }
      expect(Date.now()).toBeLessThan(recovered)
      await new Promise((r) => setTimeout(r, 500))
    }
  }, 120_000)

  it("drill (e, resume): with Redis down, clients of a killed gateway resume on the other one from the GPU runners' own buffers, every token once", async () => {
    const [, gw2] = cluster.gateways
    await redis.kill()
    try {
      const ids = await Promise.all(Array.from({ length: 6 }, () => create(gw2)))
      const before = await streamThenKillGw1(ids, "No log", 1500)
      await resumeOnGw2(ids, before, Date.now())
      await cluster.restart("gw-1")
    } finally {
      await redis.start() // a failed drill's gw-1 is started again by afterEach
    }
    // A resume whose conversation lived on gw-1 reaches the slot only once the shard has moved
    // to gw-2 (~4 s after the kill, more under load); a turn that ended before then is no longer
    // in its slot, and the resume is refused 503 (README, "Redis"). At ~150 tokens/s on 2 cores,
    // 1,500-token turns leave ~6 s; 1,200 left ~4 s and failed twice in a row in one CI run.
  }, { timeout: 120_000, retry: 2 })

  it("drill (e, follow): clients that resumed on gw-2 from the Redis log go on from the GPU runners' buffers when Redis stops, every token once", async () => {
    const [, gw2] = cluster.gateways
    const ids = await Promise.all(Array.from({ length: 4 }, () => create(gw2)))
    const before = await streamThenKillGw1(ids, "Follow me", 1500)
    // Redis stops once every resumed client has read a few tokens from the log.
    const numTokens = ids.map(() => 0)
    let stopped: Promise<void> | undefined
    try {
      await resumeOnGw2(ids, before, Date.now(), (i, e) => {
        if (e.event === "token") numTokens[i]!++
        if (stopped === undefined && numTokens.every((n) => n >= 5)) stopped = redis.kill()
      })
      expect(stopped).toBeDefined()
      await stopped
      await cluster.restart("gw-1")
    } finally {
      await stopped
      await redis.start() // a failed drill's gw-1 is started again by afterEach
    }
    // Failed once in CI (f3da887, turns of 600 tokens): an `error` event instead of `done`. The
    // cause is (e, resume)'s: a turn that ends before the shard move lets the switch reach its
    // slot is refused (stream_unavailable); 400-token turns fail so every time, 1,500 leave ~6 s.
  }, { timeout: 120_000, retry: 2 })

  it("drill (c): SIGKILL a GPU runner and its engine; its turns go on on the other GPU, with the text of an undisturbed run", async () => {
    const [gw1, gw2] = cluster.gateways
    const body = { content: "The same question", max_tokens: 1200, temperature: 0 }
    // At temperature 0 the simulated engine's tokens depend on the position only: an
    // undisturbed turn with the same prompt is the reference.
    const reference = await turn(gw1, await create(gw1), body)
    expect(reference.terminal?.event).toBe("done")
    const ids = await Promise.all(Array.from({ length: 8 }, (_, i) => create(i % 2 === 0 ? gw1 : gw2)))
    const arrivals = ids.map(() => [] as Array<number>)
    const running = ids.map((id, i) => turn(i % 2 === 0 ? gw1 : gw2, id, body, undefined, () => void arrivals[i]!.push(Date.now())))
    const deadline = Date.now() + 20_000
    while (arrivals.some((a) => a.length < 20) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10))
    const gpu1 = cluster.runners.get("gpu-1")!
    gpu1.process.kill("SIGKILL")
    try {
      execFileSync("pkill", ["-9", "-f", "engine-sim-1.sock"])
    } catch {
      // already gone with its runner
    }
    await gpu1.exited
    const results = await Promise.all(running)
    for (const r of results) {
      expect(r.status).toBe(200)
      expect(r.terminal?.event).toBe("done")
      const indices = r.events!.filter((e) => e.event === "token").map((e) => Number(e.id!.split(":").at(-1)))
      expect(indices).toEqual(indices.map((_, i) => i))
      expect(r.text).toBe(reference.text)
    }
    await audit(dbUrl, results)
    const pauses = arrivals.map((a) => Math.max(...a.slice(1).map((t, i) => t - a[i]!)))
    console.log(`drill (c): longest pause per client ${pauses.join(", ")} ms`)
    await cluster.restart("gpu-1")
  }, { timeout: 120_000, retry: 1 })

  it("drill (c, starts): SIGKILL a GPU runner while turns are being started; a turn whose Start it never answered moves too, and no conversation is left stuck", async () => {
    const [gw1, gw2] = cluster.gateways
    /** How often the gateways log `text` from now on. */
    const counter = (text: string) => {
      const counts = [...cluster.runners.values()].filter((r) => r.name.startsWith("gw-")).map((r) => r.counter(text))
      return () => counts.reduce((n, count) => n + count(), 0)
    }
    const lostStarts = counter("was lost before it answered the Start")
    const endedFromReply = counter("was lost once its reply was stored")
    // The kill must hit the window this drill is about (a Start admitted and not answered):
    // most rounds do (2 to 16 such Starts each), and one that does not is run again.
    for (let round = 1; lostStarts() === 0; round++) {
      if (round > 1) await cluster.restart("gpu-1")
      expect(round, "rounds without a Start left unanswered by the kill").toBeLessThanOrEqual(3)
      const ids = await Promise.all(Array.from({ length: 64 }, (_, i) => create(i % 2 === 0 ? gw1 : gw2)))
      let killed = false
      const results: Array<TurnResult> = []
      // Short turns back to back: at any moment some are between their admission on a GPU and
      // the answer to their Start.
      const loops = ids.map(async (id, i) => {
        for (let k = 0; k < 40 && (k < 2 || !killed); k++) {
          // Bounded: a client left waiting on a turn that will never stream fails the drill.
          const r = await turn((i + k) % 2 === 0 ? gw1 : gw2, id, { content: `Turn ${k}`, max_tokens: 4 }, AbortSignal.timeout(30_000)).catch((e) => {
            throw new Error(`turn ${k} of ${id}: ${e}`)
          })
          results.push(r)
          if (r.status !== 200) await new Promise((res) => setTimeout(res, 200))
        }
      })
      await new Promise((r) => setTimeout(r, 3000))
      const gpu1 = cluster.runners.get("gpu-1")!
      gpu1.process.kill("SIGKILL")
      try {
        execFileSync("pkill", ["-9", "-f", "engine-sim-1.sock"])
      } catch {
        // already gone with its runner
      }
      await gpu1.exited
      await new Promise((r) => setTimeout(r, 2000))
      killed = true
      await Promise.all(loops)
      // Each conversation takes one more turn (409 while a turn is being moved, never for good).
      results.push(...await oneMoreTurn(gw2, ids, { content: "After the kill", max_tokens: 4 }))
      console.log(`drill (c, starts), round ${round}: ${results.length} turns; ${lostStarts()} Starts unanswered by the killed runner; ${endedFromReply()} replies stored in the 15 s before the loss was noticed (their streams, if still open, were ended from them)`)
      for (const r of results) expect([200, 409, 503]).toContain(r.status)
      await auditTurnsDone(dbUrl, ids, results)
    }
    await cluster.restart("gpu-1")
  }, { timeout: 300_000, retry: 1 })

  it("drill (c, starts, moved): SIGKILL a GPU runner while the gateway holding the conversations loses its shard locks; a turn whose Start was cut off is taken over by the next owner and moved, and no conversation is left stuck", async () => {
    const [gw1, gw2] = cluster.gateways
    const gateway1 = cluster.runners.get("gw-1")!
    // The window of this drill: a Start to the killed runner, unanswered, cut off as gw-1
    // gives up its shards; the conversation's next owner then finds the turn only in its log.
    const cutOff = gateway1.counter("was cut off (a shard move, or its runner died)")
    const unhealthy = gateway1.counter("Shard lock storage is unhealthy")
    for (let round = 1; cutOff() === 0; round++) {
      if (round > 1) await cluster.restart("gpu-1")
      expect(round, "rounds without a Start cut off by the shard move").toBeLessThanOrEqual(3)
      const ids = await Promise.all(Array.from({ length: 64 }, (_, i) => create(i % 2 === 0 ? gw1 : gw2)))
      let killed = false
      const results: Array<TurnResult> = []
      const loops = ids.map(async (id, i) => {
        for (let k = 0; k < 40 && (k < 2 || !killed); k++) {
          // Bounded: a client left waiting on a turn that will never stream fails the drill.
          const r = await turn((i + k) % 2 === 0 ? gw1 : gw2, id, { content: `Turn ${k}`, max_tokens: 4 }, AbortSignal.timeout(30_000)).catch((e) => {
            throw new Error(`turn ${k} of ${id}: ${e}`)
          })
          results.push(r)
          if (r.status !== 200) await new Promise((res) => setTimeout(res, 200))
        }
      })
      await new Promise((r) => setTimeout(r, 3000))
      // gw-1 gives up its shards ~1.3 s into the stall, before the gateways give gpu-1 up
      // (3 unanswered pings): its Starts then waiting on gpu-1 are cut off by the shard move.
      const backends = await lockBackendsOf("gw-1")
      execFileSync("kill", ["-STOP", ...backends])
      const gpu1 = cluster.runners.get("gpu-1")!
      gpu1.process.kill("SIGKILL")
      try {
        execFileSync("pkill", ["-9", "-f", "engine-sim-1.sock"])
      } catch {
        // already gone with its runner
      }
      await new Promise((r) => setTimeout(r, 4000))
      execFileSync("kill", ["-CONT", ...backends])
      await gpu1.exited
      await new Promise((r) => setTimeout(r, 2000))
      killed = true
      await Promise.all(loops)
      results.push(...await oneMoreTurn(gw2, ids, { content: "After the kill", max_tokens: 4 }))
      console.log(`drill (c, starts, moved), round ${round}: ${results.length} turns; ${cutOff()} Starts cut off on gw-1; gw-1 gave up its shards: ${unhealthy() > 0}`)
      for (const r of results) expect([200, 409, 503]).toContain(r.status)
      await auditTurnsDone(dbUrl, ids, results)
    }
    await cluster.restart("gpu-1")
  }, { timeout: 300_000, retry: 1 })

  it("npm run cluster -- status lists the runners and GPUs; drain NAME stops a GPU runner after its turns, and turns go on elsewhere", async () => {
    const [gw1, gw2] = cluster.gateways
    const cli = (...args: Array<string>) => clusterCli(dbUrl, ...args)
    await new Promise((r) => setTimeout(r, 2500)) // a report from every runner, gpu-1 restarted too
    const status = await cli("status")
    for (const runner of ["gw-1", "gw-2", "gpu-1", "gpu-2"]) expect(status).toMatch(new RegExp(`^${runner} +up `, "m"))
    expect(status).toMatch(/sim-1: engine up, KV \d+\/\d+ blocks/)
    expect(status).toMatch(/sim-2: engine up/)
    // Turns in flight, then a drain of gpu-2: they finish (on gpu-2, or moved), and it exits.
    const ids = await Promise.all(Array.from({ length: 6 }, (_, i) => create(i % 2 === 0 ? gw1 : gw2)))
    const running = ids.map((id, i) => turn(i % 2 === 0 ? gw2 : gw1, id, { content: "Drain me", max_tokens: 300 }))
    await new Promise((r) => setTimeout(r, 300))
    expect(await cli("drain", "gpu-2")).toContain("drain requested for gpu-2")
    const gpu2 = cluster.runners.get("gpu-2")!
    const exitedWithin = await Promise.race([gpu2.exited.then(() => true), new Promise((r) => setTimeout(() => r(false), 30_000))])
    expect(exitedWithin).toBe(true)
    const results = await Promise.all(running)
    for (const r of results) expect(r.terminal?.event).toBe("done")
    await audit(dbUrl, results)
    // The pool goes on with sim-1 alone.
    const after = await Promise.all([gw1, gw2].map(async (gw) => turn(gw, await create(gw), { content: "Still here?", max_tokens: 8 })))
    for (const r of after) expect(r.terminal?.event).toBe("done")
    // The drained conversations take two more turns each, on either gateway: those whose last
    // turn ran on sim-2 ask it first (affinity) and go on to sim-1 once it has not answered. A
    // second such turn hung for good: the timed-out call's interrupt waited for gpu-2's return.
    // Once gpu-2 has been gone a while (its shards unassigned), no call to it fails at once.
    // The user has a remembered fact: each turn embeds its message on a GPU of the pool to rank
    // it, and an embedding asked of sim-2 (inside the turn's uninterruptible part) waited for
    // gpu-2's return: every such conversation was stuck.
    const remembered = await fetch(`${gw1}/v1/users/me/memory`, {
      method: "PATCH",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ add: ["I like green tea"] })
    })
    expect(remembered.status).toBe(200)
    await new Promise((r) => setTimeout(r, 12_000))
    // New conversations too, half of which ask sim-2 first.
    const fresh = await Promise.all(Array.from({ length: 6 }, (_, i) => create(i % 2 === 0 ? gw1 : gw2)))
    for (const round of [1, 2, 3]) {
      const more = await Promise.all([...ids, ...fresh].map((id, i) => turn((i + round) % 2 === 0 ? gw1 : gw2, id, { content: `Round ${round}`, max_tokens: 8 })))
      for (const r of more) expect(r.terminal?.event, JSON.stringify(r.terminal?.data ?? r.status)).toBe("done")
    }
    // Drained: it reads draining until its last report is 10 s old, then down.
    expect(await cli("status")).toMatch(/^gpu-2 +(draining|down) /m)
    await cluster.restart("gpu-2")
  }, 120_000)
})

const waitForRows = async (dbUrl: string, conversationId: string, n: number, timeoutMs = 20_000) => {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const rows = await rowsOf(dbUrl, conversationId)
    if (rows.length >= n || Date.now() > deadline) return rows
    await new Promise((r) => setTimeout(r, 100))
  }
}
