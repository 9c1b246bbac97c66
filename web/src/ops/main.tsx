/**
 * The operator dashboard (`/ops`): needs an admin key (ADMIN_API_KEYS). Polls
 * `GET /v1/ops/status` every 2 s: runners with their health, shards, entities and streams,
 * and per GPU its engine, sequences and KV blocks; per model pool, live charts (uPlot) of
 * running/waiting sequences, KV usage, tokens/s and TTFT p50/p99; the gateway's recent turn
 * errors. A runner can be drained from its row (`POST /v1/ops/runners/:runner/drain`).
 */
import { render } from "preact"
import { useEffect, useRef, useState } from "preact/hooks"
import uPlot from "uplot"
import "uplot/dist/uPlot.min.css"
import { ApiError, makeClient } from "../lib/api.js"
import { opsKey } from "../lib/storage.js"
import { type OpsStatus, type PoolSeries, Series } from "./series.js"
import "./styles.css"

const POLL_MS = 2000

const Chart = ({ title, series, labels, unit, version }: {
  title: string
  series: ReadonlyArray<ReadonlyArray<number | null>>
  labels: ReadonlyArray<string>
  unit: string
  version: number
}) => {
  const el = useRef<HTMLDivElement>(null)
  const plot = useRef<uPlot | undefined>(undefined)
  useEffect(() => {
    if (el.current === null) return
    const colors = ["#2f6feb", "#d4a72c", "#cf222e"]
    plot.current = new uPlot({
      width: 300,
      height: 150,
      legend: { show: true },
      scales: { x: { time: true }, y: { range: (_u, min, max) => [Math.min(0, min ?? 0), Math.max(1, (max ?? 1) * 1.1)] } },
      axes: [{}, { size: 64, values: (_u, ticks) => ticks.map((t) => `${+t.toFixed(1)}${unit}`) }],
      series: [{}, ...labels.map((label, i) => ({ label, stroke: colors[i % colors.length]!, width: 1.5, spanGaps: true }))]
    }, series as uPlot.AlignedData, el.current)
    return () => plot.current?.destroy()
  }, [])
  useEffect(() => {
    plot.current?.setData(series as uPlot.AlignedData)
  }, [version])
  return (
    <figure class="chart" data-points={series[0]?.length ?? 0} data-last={String(series[1]?.at(-1) ?? "")} data-title={title}>
      <figcaption>{title}</figcaption>
      <div ref={el} />
    </figure>
  )
}

const PoolCharts = ({ pool, s, version }: { pool: string; s: PoolSeries; version: number }) => (
  <section class="pool" data-pool={pool}>
    <h3>Pool {pool}</h3>
    <div class="charts">
      <Chart title="Sequences" series={[s.time, s.running, s.waiting]} labels={["running", "waiting"]} unit="" version={version} />
      <Chart title="KV cache usage" series={[s.time, s.kvPercent]} labels={["KV used"]} unit="%" version={version} />
      <Chart title="Output tokens/s" series={[s.time, s.tokPerS]} labels={["tok/s"]} unit="" version={version} />
      <Chart title="TTFT (last 60 s)" series={[s.time, s.ttftP50Ms, s.ttftP99Ms]} labels={["p50", "p99"]} unit=" ms" version={version} />
    </div>
  </section>
)

const App = () => {
  const [key, setKey] = useState(opsKey.get())
  const [draft, setDraft] = useState("")
  const [status, setStatus] = useState<OpsStatus | undefined>()
  const [error, setError] = useState<string | undefined>()
  const [version, setVersion] = useState(0)
  const series = useRef(new Series())

  useEffect(() => {
    if (key === undefined) return
    const client = makeClient(key)
    let stopped = false
    let timer: ReturnType<typeof setTimeout> | undefined
    const poll = () =>
      client.request<OpsStatus>("GET", "/v1/ops/status").then((s) => {
        if (stopped) return
        series.current.add(s)
        setStatus(s)
        setError(undefined)
        setVersion((v) => v + 1)
      }).catch((e) => {
        if (stopped) return
        if (e instanceof ApiError && (e.status === 401 || e.status === 403)) {
          opsKey.set(undefined)
          setKey(undefined)
          setError(e.status === 403 ? "This key is not an operator key (ADMIN_API_KEYS)." : "The key was not accepted.")
          return
        }
        setError(e instanceof ApiError ? e.message : "The service cannot be reached.")
      }).finally(() => {
        if (!stopped) timer = setTimeout(poll, POLL_MS)
      })
    void poll()
    return () => {
      stopped = true
      clearTimeout(timer)
    }
  }, [key])

  if (key === undefined) {
    return (
      <main class="signin">
        <form onSubmit={(e) => { e.preventDefault(); if (draft.trim() !== "") { opsKey.set(draft.trim()); setKey(draft.trim()) } }}>
          <h1>Operations</h1>
          <p>An operator key (ADMIN_API_KEYS) is needed.</p>
          {error !== undefined && <div class="banner error" role="alert">{error}</div>}
          <input type="password" autocomplete="off" value={draft} placeholder="Admin key" aria-label="Admin key" onInput={(e) => setDraft((e.target as HTMLInputElement).value)} />
          <button type="submit">Open</button>
        </form>
      </main>
    )
  }

  const drain = (runner: string) => {
    if (!confirm(`Drain runner ${runner}? It admits nothing new, lets its turns finish, hands its shards over and exits.`)) return
    makeClient(key).request("POST", `/v1/ops/runners/${encodeURIComponent(runner)}/drain`, {}).catch((e) =>
      setError(e instanceof ApiError ? e.message : String(e)))
  }

  return (
    <main class="ops">
      <header>
        <h1>Operations</h1>
        <span class="updated">{status === undefined ? "Loading…" : `Updated ${new Date(status.now_ms).toLocaleTimeString()}`}</span>
        <a href="/">Chat</a>
        <button type="button" class="ghost" onClick={() => { opsKey.set(undefined); setKey(undefined) }}>Sign out</button>
      </header>
      {error !== undefined && <div class="banner error" role="alert">{error}</div>}
      <h2>Runners</h2>
      <table class="runners">
        <thead>
          <tr><th>Runner</th><th>State</th><th>Roles</th><th>Region</th><th>Shards</th><th>Entities</th><th>Streams</th><th>GPUs</th><th /></tr>
        </thead>
        <tbody>
          {(status?.runners ?? []).map((r) => (
            <tr key={r.status.runner} data-runner={r.status.runner} data-state={r.state}>
              <td>{r.status.runner}</td>
              <td><span class={`state ${r.state}`}>{r.state}</span></td>
              <td>{r.status.roles.join(", ")}</td>
              <td>{r.status.region}</td>
              <td>{r.status.num_shards}</td>
              <td>{r.status.num_entities}</td>
              <td>{r.status.num_streams}</td>
              <td class="gpus">
                {r.status.gpus.map((g) => (
                  <div key={g.gpu_id}>
                    {g.gpu_id}: engine {g.engine_up ? "up" : <b class="down">down</b>}, {g.num_running} running, {g.num_waiting} waiting, KV {g.num_used_blocks}/{g.num_blocks}
                  </div>
                ))}
              </td>
              <td>{r.state === "up" && <button type="button" onClick={() => drain(r.status.runner)}>Drain</button>}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <h2>Model pools</h2>
      <p class="hint">Sequences and KV usage from every runner's report; tokens/s and TTFT as seen by the gateway serving this page.</p>
      {[...series.current.pools.entries()].map(([pool, s]) => <PoolCharts key={pool} pool={pool} s={s} version={version} />)}
      <h2>Recent errors</h2>
      {(status?.recent_errors.length ?? 0) === 0 ? <p class="hint">None.</p> : (
        <table class="errors">
          <thead><tr><th>Time</th><th>Model</th><th>Tier</th><th>Code</th><th>Message</th></tr></thead>
          <tbody>
            {status!.recent_errors.map((e, i) => (
              <tr key={i}><td>{new Date(e.at_ms).toLocaleTimeString()}</td><td>{e.model}</td><td>{e.tier}</td><td>{e.code}</td><td>{e.message}</td></tr>
            ))}
          </tbody>
        </table>
      )}
    </main>
  )
}

render(<App />, document.getElementById("app")!)
