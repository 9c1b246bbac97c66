/**
 * `npm run bench -- --cluster` (or `node --import tsx bench/serve/cluster.ts [--streams 512]
 * [--warmup 10] [--duration 20]`): the local cluster (examples/cluster-local.config.ts: two
 * gateways, two GPU runners with one simulated H100 each, as four processes) against the
 * one-process server (bench/serve/sim.config.ts with two simulated H100s), both compiled (dist/),
 * each simulated GPU with the same engine settings (2,048 running sequences, 8 GiB of KV),
 * at the same closed-loop load of N streams of the ShareGPT-like workload. Against the cluster
 * half the streams go to each gateway. Reports output tok/s, TTFT and ITL per system and the
 * cluster's ratios to the one-process figures; writes bench/results/cluster.json with machine,
 * date, commit and command.
 *
 * `--rounds K` measures both K times, in turn (the cluster first in even rounds), each on a
 * fresh database and fresh processes: on a 2-core machine one pair's ratio varies by ±0.1
 * from run to run. The record then gives every round, and the median ratio and TTFT p99
 * delta; `one_process` and `cluster` are the round whose ratio is the median.
 *
 * `--only cluster` (or `--only one-process`) measures that system alone, K times, and prints
 * each run's figures without writing a record: for A/B runs of one system (a node flag through
 * BENCH_SERVICE_NODE_ARGS, a change), where the pair's ratio would add the other's noise.
 */
import { execFileSync } from "node:child_process"
import { mkdtempSync, writeFileSync } from "node:fs"
import os from "node:os"
import path from "node:path"
import { startCluster } from "../../test/support/cluster.js"
import { makeAgent, type Target } from "./client.js"
import { createPrivateDatabase } from "./database.js"
import { type PointResult, runPoint } from "./loadgen.js"
import { REPO_ROOT, startService } from "./processes.js"
import { Progress } from "./progress.js"
import { round, summarize as percentiles } from "./stats.js"
import { SHAREGPT_LIKE } from "./workload.js"
import { listArg, numberArg, provenance } from "./provenance.js"

const numStreams = numberArg("streams", 512)
const warmupMs = numberArg("warmup", 10) * 1000
const durationMs = numberArg("duration", 20) * 1000
const numRounds = numberArg("rounds", 1)
const only = listArg("only", [])[0]
if (only !== undefined && only !== "cluster" && only !== "one-process") {
  console.error(`--only ${only}: expected cluster or one-process`)
  process.exit(2)
}
const serverUrl = process.env["DATABASE_URL"] ?? "postgres://postgres@127.0.0.1:5432/test"
const progress = new Progress()

/** The largest of the figures that exist (a run with no samples has NaN). */
const worst = (xs: ReadonlyArray<number>) => Math.max(...xs.filter((x) => Number.isFinite(x)))

const summarize = (r: ReadonlyArray<PointResult>) => ({
  output_tok_per_s: round(r.reduce((n, p) => n + p.outputTokPerS, 0), 1),
  // Per gateway, the worst: percentiles of separate runs cannot be merged exactly.
  ttft_ms: { p50: round(worst(r.map((p) => p.ttftMs.p50)), 1), p99: round(worst(r.map((p) => p.ttftMs.p99)), 1) },
  itl_ms: { p50: round(worst(r.map((p) => p.itlMs.p50)), 2), p99: round(worst(r.map((p) => p.itlMs.p99)), 2) },
  completed: r.reduce((n, p) => n + p.requests.completedInWindow, 0),
  // Cores each process used in the window (the runs against both gateways measure the same processes).
  cpu_cores: r[0]!.cpuCores,
  errors: r.reduce((n, p) => n + p.errors.total, 0),
  error_samples: r.flatMap((p) => p.errors.samples).slice(0, 5)
})

/** Where the gateways' Conversation entities found their state (conversation_loads_total), summed. */
const conversationLoads = async (urls: ReadonlyArray<string>) => {
  const loads: Record<string, number> = { process: 0, checked: 0, shared: 0, store: 0 }
  for (const url of urls) {
    const text = await (await fetch(`${url}/metrics`)).text()
    for (const m of text.matchAll(/^conversation_loads_total\{source="(\w+)"\} (\d+)/gm)) loads[m[1]!] = (loads[m[1]!] ?? 0) + Number(m[2])
  }
  const total = loads["process"]! + loads["checked"]! + loads["shared"]! + loads["store"]!
  const hits = loads["process"]! + loads["checked"]! + loads["shared"]!
  return {
    ...loads,
    hot_cache_hit_rate: total === 0 ? null : round(hits / total, 4),
    // A hit's PostgreSQL reads: one row for a checked or shared one, none for a process one.
    store_reads_per_hit: hits === 0 ? null : round((loads["checked"]! + loads["shared"]!) / hits, 4)
  }
}

const load = (targets: ReadonlyArray<Target>, label: string, pids: () => Record<string, number>) =>
  Promise.all(targets.map((target, i) =>
    runPoint(target, { kind: "closed", concurrency: numStreams / targets.length }, {
      label: `${label}${targets.length > 1 ? ` gw-${i + 1}` : ""}`,
      warmupMs,
      durationMs,
      workload: SHAREGPT_LIKE,
      maxInFlight: numStreams,
      progress,
      cpuPids: pids
    })
  ))

const env = { MAX_CONNECTIONS_PER_CLIENT: "16384", SHUTDOWN_GRACE_MS: "2000", STREAM_DETACH_GRACE_MS: "0" }
type Measured = ReturnType<typeof summarize> & {
  conversation_loads?: Awaited<ReturnType<typeof conversationLoads>>
  /**
   * Times a runner gave up all its shards because a shard lock refresh missed its deadline
   * (its "Shard lock storage is unhealthy" error), from start to stop: a round with one is
   * disturbed (its conversations moved mid-turn), which the record should show.
   */
  shard_lock_lapses?: number
}

const measureOneProcess = async (): Promise<Measured> => {
  const db = await createPrivateDatabase(serverUrl)
  // The same two simulated GPUs as the cluster's, in the one process.
  const single = await startService({ env: { DATABASE_URL: db.url, BENCH_NUM_GPUS: "2", ...env }, dataDir: mkdtempSync(path.join(os.tmpdir(), "bench-cluster-")) })
  try {
    const measured: Measured = summarize(await load([{ host: single.host, port: single.port, agent: makeAgent() }], "one process", () => single.pids()))
    measured.conversation_loads = await conversationLoads([`http://${single.host}:${single.port}`])
    return measured
  } finally {
    await single.stop()
    await db.drop()
  }
}

const measureCluster = async (): Promise<Measured> => {
  const db = await createPrivateDatabase(serverUrl)
  // Each simulated GPU gets the one-process bench's engine settings (bench/serve/sim.config.ts).
  const cluster = await startCluster({
    databaseUrl: db.url,
    entry: [path.join(REPO_ROOT, "dist/src/main.js")],
    env: {
      ...env,
      CLUSTER_LOCAL_MAX_NUM_SEQS: "2048",
      CLUSTER_LOCAL_NUM_SLOTS: "4096",
      CLUSTER_LOCAL_KV_CACHE_BYTES: String(8 * 1024 * 1024 * 1024)
    }
  })
  const lapses = [...cluster.runners.values()].map((r) => r.counter("Shard lock storage is unhealthy"))
  try {
    const targets = cluster.gateways.map((url) => {
      const u = new URL(url)
      return { host: u.hostname, port: Number(u.port), agent: makeAgent() }
    })
    const pids = () => Object.fromEntries([...cluster.runners].map(([name, r]) => [name, r.process.pid!]))
    const measured: Measured = summarize(await load(targets, "cluster", pids))
    measured.conversation_loads = await conversationLoads(cluster.gateways)
    measured.shard_lock_lapses = lapses.reduce((n, count) => n + count(), 0)
    return measured
  } finally {
    await cluster.stop()
    await db.drop()
    // The runners' warnings and errors, for looking into a run's errors (not committed).
    // A logged cause follows its line, indented.
    const lines = [...cluster.runners].flatMap(([name, r]) => {
      let keep = false
      return r.output().split("\n").filter((l) => (keep = / (WARN|ERROR) /.test(l) || (keep && /^\s/.test(l)))).map((l) => `${name} ${l}`)
    })
    writeFileSync(path.join(REPO_ROOT, "bench/results/scratch-cluster-runners.log"), lines.join("\n") + "\n", { flag: "a" })
  }
}

/** The lower median (nearest-rank p50): always one of `xs`, so its round can be found. */
const median = (xs: ReadonlyArray<number>) => percentiles([...xs]).p50

const main = async () => {
  execFileSync("npm", ["run", "build", "--silent"], { cwd: REPO_ROOT, stdio: "inherit" })
  writeFileSync(path.join(REPO_ROOT, "bench/results/scratch-cluster-runners.log"), "")
  if (only !== undefined) {
    const runs: Array<Measured> = []
    for (let k = 0; k < numRounds; k++) runs.push(only === "cluster" ? await measureCluster() : await measureOneProcess())
    const rates = runs.map((r) => r.output_tok_per_s)
    console.log(JSON.stringify({ system: only, output_tok_per_s: rates, median_output_tok_per_s: median(rates), runs }, null, 2))
    process.exit(0)
  }
  const rounds: Array<{ one_process: Measured; cluster: Measured; output_tok_per_s_ratio: number; ttft_p99_delta_ms: number }> = []
  for (let k = 0; k < numRounds; k++) {
    let oneProcess: Measured
    let clustered: Measured
    if (k % 2 === 0) {
      oneProcess = await measureOneProcess()
      clustered = await measureCluster()
    } else {
      clustered = await measureCluster()
      oneProcess = await measureOneProcess()
    }
    rounds.push({
      one_process: oneProcess,
      cluster: clustered,
      output_tok_per_s_ratio: round(clustered.output_tok_per_s / oneProcess.output_tok_per_s, 3),
      ttft_p99_delta_ms: round(clustered.ttft_ms.p99 - oneProcess.ttft_ms.p99, 1)
    })
  }
  const ratios = rounds.map((r) => r.output_tok_per_s_ratio)
  const middle = rounds.find((r) => r.output_tok_per_s_ratio === median(ratios))!
  const result = {
    benchmark: "cluster",
    ...provenance(`node --import tsx bench/serve/cluster.ts --streams ${numStreams} --warmup ${warmupMs / 1000} --duration ${durationMs / 1000}${numRounds > 1 ? ` --rounds ${numRounds}` : ""}`),
    num_streams: numStreams,
    one_process: middle.one_process,
    cluster: middle.cluster,
    cluster_vs_one_process: {
      output_tok_per_s_ratio: median(ratios),
      ttft_p99_delta_ms: median(rounds.map((r) => r.ttft_p99_delta_ms))
    },
    ...(numRounds > 1
      ? {
        rounds: rounds.map((r) => ({
          one_process_output_tok_per_s: r.one_process.output_tok_per_s,
          cluster_output_tok_per_s: r.cluster.output_tok_per_s,
          one_process_ttft_p99_ms: r.one_process.ttft_ms.p99,
          cluster_ttft_p99_ms: r.cluster.ttft_ms.p99,
          output_tok_per_s_ratio: r.output_tok_per_s_ratio,
          ttft_p99_delta_ms: r.ttft_p99_delta_ms,
          cluster_cpu_cores: r.cluster.cpu_cores,
          cluster_errors: r.cluster.errors,
          cluster_shard_lock_lapses: r.cluster.shard_lock_lapses
        }))
      }
      : {})
  }
  console.log(JSON.stringify(result, null, 2))
  writeFileSync(path.join(REPO_ROOT, "bench/results/cluster.json"), JSON.stringify(result, null, 2) + "\n")
  process.exit(0)
}

void main()
