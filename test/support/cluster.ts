/**
 * Starts the processes of examples/cluster-local.config.ts (gateways gw-1 and gw-2, GPU runners
 * gpu-1 and gpu-2 with simulated GPUs) on loopback ports of their own, as
 * `npm run cluster:local` would, and stops them.
 */
import { type ChildProcess, spawn } from "node:child_process"
import { mkdtempSync } from "node:fs"
import { tmpdir } from "node:os"
import path from "node:path"
import { REPO_ROOT } from "./engineProcess.js"
import { serviceNodeArgs } from "./nodeArgs.js"
import { freeListenPort, LISTEN_PORT_MAX, LISTEN_PORT_MIN, listenPortUsable, portFree } from "./ports.js"

export interface RunnerProcess {
  readonly name: string
  readonly process: ChildProcess
  /** Its latest output (bounded: older lines are dropped). */
  readonly output: () => string
  /** Counts its output lines that contain `text` from now on (not bounded as `output` is). */
  readonly counter: (text: string) => () => number
  readonly exited: Promise<void>
}

export interface LocalCluster {
  /** gw-1's and gw-2's base URLs. */
  readonly gateways: readonly [string, string]
  readonly runners: ReadonlyMap<string, RunnerProcess>
  /** Starts runner `name` again (after a kill), on the same ports and data directory. */
  readonly restart: (name: string) => Promise<RunnerProcess>
  readonly stop: () => Promise<void>
}

const RUNNERS = ["gw-1", "gw-2", "gpu-1", "gpu-2"] as const

/** A base whose ports +1..+4, +11..+14 and +21..+22 are all free. */
const freeBase = async (): Promise<number> => {
  for (;;) {
    const base = LISTEN_PORT_MIN + 30 * Math.floor(Math.random() * ((LISTEN_PORT_MAX - LISTEN_PORT_MIN) / 30 - 1))
    const ports = [1, 2, 3, 4, 11, 12, 13, 14, 21, 22].map((i) => base + i)
    if ((await Promise.all(ports.map(listenPortUsable))).every(Boolean)) return base
  }
}

export const startCluster = async (options: {
  readonly databaseUrl: string
  readonly redisUrl?: string
  /** How node runs a runner (default: `--import tsx src/main.ts`; benchmarks use the compiled dist/src/main.js). */
  readonly entry?: ReadonlyArray<string>
  readonly env?: Record<string, string>
}): Promise<LocalCluster> => {
  const base = await freeBase()
  const root = mkdtempSync(path.join(tmpdir(), "chat-cluster-"))
  const gateways = [`http://127.0.0.1:${base + 21}`, `http://127.0.0.1:${base + 22}`] as const
  const runners = new Map<string, RunnerProcess>()

  const spawnRunner = (name: string): RunnerProcess => {
    const env: Record<string, string> = {}
    for (const [k, v] of Object.entries({
      ...process.env,
      PORT: undefined,
      RUNNER_NAME: name,
      CLUSTER_CONFIG: "examples/cluster-local.config.ts",
      CLUSTER_LOCAL_PORT_BASE: String(base),
      CLUSTER_LOCAL_HTTP_BASE: String(base + 20),
      DATABASE_URL: options.databaseUrl,
      ...(options.redisUrl === undefined ? {} : { REDIS_URL: options.redisUrl }),
      DATA_DIR: path.join(root, name),
      RUN_DIR: mkdtempSync(path.join(root, `run-${name}-`)),
      SHUTDOWN_GRACE_MS: "3000",
      // A client that disconnects cancels its turn at once (the drills count on it); the web
      // tests give their own grace.
      STREAM_DETACH_GRACE_MS: "0",
      // Each test cluster keeps its stream logs under keys of its own in the shared Redis.
      REDIS_KEY_PREFIX: `chat-test-${base}:`,
      ...options.env
    })) {
      if (v !== undefined) env[k] = v
    }
    const child = spawn(process.execPath, [...serviceNodeArgs(), ...(options.entry ?? ["--import", "tsx", "src/main.ts"])], { cwd: REPO_ROOT, env, stdio: ["ignore", "pipe", "pipe"] })
    let output = ""
    const counters: Array<{ readonly text: string; n: number }> = []
    const partial = { stdout: "", stderr: "" }
    // Kept bounded: a long benchmark would otherwise hold every log line.
    const keep = (from: "stdout" | "stderr") => (d: Buffer) => {
      const chunk = d.toString()
      output += chunk
      if (output.length > 200_000) output = output.slice(-100_000)
      if (counters.length === 0) return
      const lines = (partial[from] + chunk).split("\n")
      partial[from] = lines.pop()!
      for (const line of lines) for (const c of counters) if (line.includes(c.text)) c.n++
    }
    child.stdout!.on("data", keep("stdout"))
    child.stderr!.on("data", keep("stderr"))
    const counter = (text: string) => {
      const c = { text, n: 0 }
      counters.push(c)
      return () => c.n
    }
    const runner = { name, process: child, output: () => output, counter, exited: new Promise<void>((r) => child.once("exit", () => r())) }
    runners.set(name, runner)
    return runner
  }

  const ready = async (runner: RunnerProcess) => {
    const deadline = Date.now() + 120_000
    const i = RUNNERS.indexOf(runner.name as (typeof RUNNERS)[number])
    for (;;) {
      if (runner.process.exitCode !== null) throw new Error(`${runner.name} exited with ${runner.process.exitCode}:\n${runner.output()}`)
      if (Date.now() > deadline) throw new Error(`${runner.name} did not become ready:\n${runner.output()}`)
      if (i < 2) {
        const ok = await fetch(`${gateways[i]}/readyz`).then((r) => r.ok, () => false)
        if (ok) return
      } else if (/engine sim-\d ready/.test(runner.output())) return
      await new Promise((r) => setTimeout(r, 200))
    }
  }

  const stopRunner = async (runner: RunnerProcess) => {
    if (runner.process.exitCode !== null || runner.process.signalCode !== null) return
    runner.process.kill("SIGTERM")
    const timer = setTimeout(() => runner.process.kill("SIGKILL"), 20_000)
    await runner.exited
    clearTimeout(timer)
  }

  for (const name of RUNNERS) spawnRunner(name)
  try {
    await Promise.all([...runners.values()].map(ready))
  } catch (e) {
    await Promise.all([...runners.values()].map((r) => (r.process.kill("SIGKILL"), r.exited)))
    throw e
  }
  return {
    gateways,
    runners,
    restart: async (name) => {
      const runner = spawnRunner(name)
      await ready(runner)
      return runner
    },
    stop: async () => {
      await Promise.all([...runners.values()].map(stopRunner))
    }
  }
}

export interface RedisProcess {
  readonly url: string
  readonly start: () => Promise<void>
  readonly kill: () => Promise<void>
}

/** A Redis server of its own (redis-server, no persistence) on a free port, for drills that stop it. */
export const privateRedis = async (): Promise<RedisProcess> => {
  const port = await freeListenPort()
  let child: ChildProcess | undefined
  const start = async () => {
    child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: "ignore" })
    const deadline = Date.now() + 10_000
    while (await portFree(port)) {
      if (Date.now() > deadline) throw new Error("redis-server did not start")
      await new Promise((r) => setTimeout(r, 50))
    }
  }
  await start()
  return {
    url: `redis://127.0.0.1:${port}`,
    start,
    kill: async () => {
      const c = child
      if (c === undefined || c.exitCode !== null) return
      const exited = new Promise((r) => c.once("exit", r))
      c.kill("SIGKILL")
      await exited
    }
  }
}
