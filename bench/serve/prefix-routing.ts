/**
 * `npm run bench -- --prefix-routing` (or `node --import tsx bench/serve/prefix-routing.ts
 * [--streams 128] [--warmup 15] [--duration 30]`): prefix caching and conversation-affine
 * routing on four simulated GPUs in one process (bench/serve/multi-gpu.config.ts), under the
 * closed-loop multi-turn workload (workload.ts MULTI_TURN: 10 turns per conversation,
 * ShareGPT-like lengths, conversations distinct from their first token). Three runs at the same
 * load: affinity routing with prefix caching, random routing with prefix caching, and prefix
 * caching off. Reports output tok/s, TTFT p50/p99, and for turns after a conversation's first
 * the mean new and computed prompt tokens (computed = prompt − cached_tokens). Writes
 * bench/results/prefix-routing.json (prefix-routing-scaleS.json with `--sim-time-scale S`) with
 * machine, date, commit and command. `--modes affinity,random,off` picks the runs.
 */
import { execFileSync } from "node:child_process"
import { mkdtempSync, writeFileSync } from "node:fs"
import os from "node:os"
import path from "node:path"
import { makeAgent } from "./client.js"
import { createPrivateDatabase } from "./database.js"
import { runPoint } from "./loadgen.js"
import { REPO_ROOT, startService } from "./processes.js"
import { Progress } from "./progress.js"
import { round } from "./stats.js"
import { MULTI_TURN } from "./workload.js"
import { numberArg, provenance } from "./provenance.js"

const numStreams = numberArg("streams", 128)
// Multiplies the sim's modelled step times: at 1 this 2-core machine's Node process saturates
// (~8k tok/s) before four simulated GPUs do, and routing cannot matter where the GPUs are not
// the bottleneck. A larger scale puts the bottleneck on the GPUs, as in a real deployment.
const simTimeScale = numberArg("sim-time-scale", 1)
const modeNames = (() => {
  const i = process.argv.indexOf("--modes")
  const names = i < 0 ? ["affinity", "random", "off"] : (process.argv[i + 1] ?? "").split(",")
  const known = ["affinity", "random", "off"]
  if (names.length === 0 || names.some((n) => !known.includes(n))) {
    console.error(`--modes takes a comma-separated list of ${known.join(", ")}`)
    process.exit(2)
  }
  return names
})()
const warmupMs = numberArg("warmup", 15) * 1000
const durationMs = numberArg("duration", 30) * 1000
const progress = new Progress()

const MODES = [
  { key: "affinity", name: "affinity, prefix caching", env: { BENCH_ROUTING: "affinity", BENCH_PREFIX_CACHING: "1" } },
  { key: "random", name: "random, prefix caching", env: { BENCH_ROUTING: "random", BENCH_PREFIX_CACHING: "1" } },
  { key: "off", name: "prefix caching off", env: { BENCH_ROUTING: "random", BENCH_PREFIX_CACHING: "0" } }
] as const

const runMode = async (mode: (typeof MODES)[number]) => {
  const db = await createPrivateDatabase(process.env["DATABASE_URL"] ?? "postgres://postgres@127.0.0.1:5432/test")
  const service = await startService({
    env: {
      DATABASE_URL: db.url,
      SHUTDOWN_GRACE_MS: "2000",
      CLUSTER_CONFIG: "bench/serve/multi-gpu.config.ts",
      BENCH_SIM_TIME_SCALE: String(simTimeScale),
      ...mode.env
    },
    dataDir: mkdtempSync(path.join(os.tmpdir(), "bench-prefix-"))
  })
  try {
    const p = await runPoint({ host: service.host, port: service.port, agent: makeAgent() }, { kind: "closed", concurrency: numStreams }, {
      label: mode.name,
      warmupMs,
      durationMs,
      workload: MULTI_TURN,
      maxInFlight: numStreams,
      progress,
      cpuPids: () => service.pids()
    })
    return {
      mode: mode.name,
      output_tok_per_s: round(p.outputTokPerS, 1),
      ttft_ms: { p50: round(p.ttftMs.p50, 1), p99: round(p.ttftMs.p99, 1) },
      completed_turns: p.requests.completedInWindow,
      mean_turns_per_conversation: p.conversations.meanTurnsCompleted,
      later_turns: p.laterTurns,
      computed_over_new: round(p.laterTurns.meanComputedTokens / Math.max(1, p.laterTurns.meanNewTokens), 2),
      // Issue 11's measure: over the later turns that hit the cache.
      computed_over_new_on_hits: round(p.laterTurns.hits.meanComputedTokens / Math.max(1, p.laterTurns.hits.meanNewTokens), 2),
      mean_prompt_tokens: p.tokens.meanPrompt,
      errors: p.errors.total,
      cpu_cores: p.cpuCores
    }
  } finally {
    await service.stop()
    await db.drop()
  }
}

const main = async () => {
  execFileSync("npm", ["run", "build", "--silent"], { cwd: REPO_ROOT, stdio: "inherit" })
  const runs: Array<Awaited<ReturnType<typeof runMode>>> = []
  for (const mode of MODES) if (modeNames.includes(mode.key)) runs.push(await runMode(mode))
  const byKey = (key: string) => runs.find((r) => r.mode === MODES.find((m) => m.key === key)!.name)
  const [affinity, random, off] = [byKey("affinity"), byKey("random"), byKey("off")]
  const ratio = (a: typeof affinity, b: typeof affinity) =>
    a && b
      ? { output_tok_per_s_ratio: round(a.output_tok_per_s / b.output_tok_per_s, 3), ttft_p99_ratio: round(a.ttft_ms.p99 / b.ttft_ms.p99, 3) }
      : null
  const result = {
    benchmark: "prefix-routing",
    ...provenance(`node --import tsx bench/serve/prefix-routing.ts --streams ${numStreams} --warmup ${warmupMs / 1000} --duration ${durationMs / 1000} --sim-time-scale ${simTimeScale} --modes ${modeNames.join(",")}`),
    num_streams: numStreams,
    sim_time_scale: simTimeScale,
    runs,
    affinity_vs_random: ratio(affinity, random),
    affinity_vs_caching_off: ratio(affinity, off)
  }
  console.log(JSON.stringify(result, null, 2))
  // A scaled run is another experiment: it does not overwrite the default run's record.
  const file = simTimeScale === 1 ? "prefix-routing.json" : `prefix-routing-scale${simTimeScale}.json`
  writeFileSync(path.join(REPO_ROOT, "bench/results", file), JSON.stringify(result, null, 2) + "\n")
  process.exit(0)
}

void main()
