/**
 * Fuzzes the HTTP API of a real service: `npm run fuzz -- --requests N [--url URL]`.
 * Without --url it starts the service (src/main.ts, CPU engine) on a fresh database
 * of the PostgreSQL at DATABASE_URL and reads its RSS from /proc. Prints the status histogram
 * per route, every 5xx, and RSS at start and end; exits 1 if any 5xx was seen. Requests go to
 * loopback only, one at a time, and stop after N.
 */
import { readFileSync } from "node:fs"
import fc from "fast-check"
import { freshDatabase } from "../../test/support/database.js"
import { startService } from "../../test/support/service.js"

const args = process.argv.slice(2)
const flag = (name: string) => {
  const i = args.indexOf(`--${name}`)
  return i < 0 ? undefined : args[i + 1]
}
const numRequests = Number(flag("requests") ?? 2000)

const jsonish = fc.oneof(
  fc.jsonValue({ maxDepth: 5 }).map((v) => JSON.stringify(v)),
  fc.record({
    role: fc.oneof(fc.constant("user"), fc.string({ maxLength: 8 })),
    content: fc.oneof(fc.string({ maxLength: 200 }), fc.integer(), fc.constant("x".repeat(70_000))),
    max_tokens: fc.oneof(fc.integer({ min: -10, max: 10_000 }), fc.string({ maxLength: 4 })),
    temperature: fc.oneof(fc.double({ min: -5, max: 5 }), fc.string({ maxLength: 4 })),
    model: fc.constantFrom("mini", "constructor", "__proto__", "toString", "", "x".repeat(200)),
    system_prompt: fc.oneof(fc.string({ maxLength: 64 }), fc.constant("y".repeat(40_000)))
  }, { requiredKeys: [] }).map((v) => JSON.stringify(v)),
  fc.string({ maxLength: 300 }),
  fc.constantFrom("", "{", "null", "[".repeat(3000) + "]".repeat(3000), "{\"content\":" + "[".repeat(3000) + "]".repeat(3000) + "}")
)
// A turn that is valid or nearly so (one field hostile), so that turns also run and stream.
const turnBody = fc.record({
  role: fc.constant("user"),
  content: fc.string({ minLength: 1, maxLength: 200 }),
  max_tokens: fc.integer({ min: 1, max: 8 }),
  temperature: fc.double({ min: 0, max: 2, noNaN: true })
}).chain((valid) =>
  fc.oneof(
    fc.constant(valid),
    fc.record({ key: fc.constantFrom("role", "content", "max_tokens", "temperature", "top_p", "stop"), value: fc.jsonValue({ maxDepth: 2 }) })
      .map(({ key, value }) => ({ ...valid, [key]: value }))
  )
).map((v) => JSON.stringify(v))
const idArb = fc.oneof(fc.string({ minLength: 1, maxLength: 80 }).map(encodeURIComponent), fc.constantFrom("constructor", "%00", "a".repeat(65)))
const queryArb = fc.record({
  before: fc.oneof(fc.integer().map(String), fc.constantFrom("2147483648", "999999999999999", "-1", "abc")),
  limit: fc.oneof(fc.integer({ min: -5, max: 500 }).map(String), fc.string({ maxLength: 5 }))
}, { requiredKeys: [] }).map((q) => new URLSearchParams(q).toString())

type Req = { route: string; method: string; path: (id: string) => string; body?: string }
const requestArb: fc.Arbitrary<Req> = fc.oneof(
  jsonish.map((body) => ({ route: "POST /v1/conversations", method: "POST", path: () => "/v1/conversations", body })),
  fc.tuple(fc.boolean(), idArb, fc.oneof(jsonish, turnBody)).map(([own, id, body]) => ({
    route: "POST /v1/conversations/{id}/turns",
    method: "POST",
    path: (c: string) => `/v1/conversations/${own ? c : id}/turns`,
    body
  })),
  fc.tuple(fc.boolean(), idArb).map(([own, id]) => ({
    route: "POST /v1/conversations/{id}/cancel",
    method: "POST",
    path: (c: string) => `/v1/conversations/${own ? c : id}/cancel`
  })),
  fc.tuple(fc.boolean(), idArb, queryArb).map(([own, id, q]) => ({
    route: "GET /v1/conversations/{id}",
    method: "GET",
    path: (c: string) => `/v1/conversations/${own ? c : id}?${q}`
  })),
  fc.constantFrom("/healthz", "/readyz", "/nope").map((p) => ({ route: `GET ${p}`, method: "GET", path: () => p }))
)

const rssMb = (pid: number | undefined) => {
  if (pid === undefined) return Number.NaN
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))
  return m === null ? Number.NaN : Number(m[1]) / 1024
}

const main = async () => {
  let url = flag("url")
  let service: Awaited<ReturnType<typeof startService>> | undefined
  if (url === undefined) {
    const db = await freshDatabase()
    service = await startService({ env: { DATABASE_URL: db.url } })
    url = service.url
  }
  const pid = service?.process.pid
  const rssStart = rssMb(pid)
  const conversation = ((await (await fetch(`${url}/v1/conversations`, { method: "POST" })).json()) as any).conversation_id as string
  const histogram = new Map<string, Map<number, number>>()
  const errors: Array<string> = []
  const t0 = Date.now()
  for (const req of fc.sample(requestArb, numRequests)) {
    const path = req.path(conversation)
    const res = await fetch(`${url}${path}`, {
      method: req.method,
      headers: { "content-type": "application/json" },
      ...(req.body === undefined ? {} : { body: req.body })
    }).catch((e) => ({ status: 0, error: String(e) }) as const)
    const byStatus = histogram.get(req.route) ?? new Map<number, number>()
    byStatus.set(res.status, (byStatus.get(res.status) ?? 0) + 1)
    histogram.set(req.route, byStatus)
    if (res instanceof Response) {
      if (res.headers.get("content-type")?.startsWith("text/event-stream")) {
        await res.body?.cancel()
        await fetch(`${url}/v1/conversations/${conversation}/cancel`, { method: "POST" })
      } else await res.arrayBuffer()
    }
    if (res.status >= 500 || res.status === 0) errors.push(`${res.status} ${req.method} ${path.slice(0, 120)} ${(req.body ?? "").slice(0, 120)}`)
  }
  const rssEnd = rssMb(pid)
  console.log(`fuzz: ${numRequests} requests in ${((Date.now() - t0) / 1000).toFixed(1)} s against ${url}`)
  for (const [route, byStatus] of histogram) {
    console.log(`  ${route.padEnd(36)} ${[...byStatus].sort((a, b) => a[0] - b[0]).map(([s, n]) => `${s}×${n}`).join("  ")}`)
  }
  console.log(`5xx (and connection errors): ${errors.length}`)
  for (const e of errors.slice(0, 50)) console.log(`  ${e}`)
  console.log(`service RSS: ${rssStart.toFixed(0)} MB at start, ${rssEnd.toFixed(0)} MB at end`)
  await service?.stop()
  process.exit(errors.length === 0 ? 0 : 1)
}

void main()
