/**
 * The two systems under test as child processes: the real service (src/main.ts with the
 * bench topology, like `npm start`) and the baseline server (bench/baseline/server.ts).
 */
import { type ChildProcess, spawn } from "node:child_process"
import { appendFileSync, existsSync, mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import path from "node:path"
import { fileURLToPath } from "node:url"
import { freePort } from "./freePort.js"
import { childrenOf, commandOf } from "./proc.js"
import { serviceNodeArgs } from "../../test/support/nodeArgs.js"

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..")

export interface Running {
  readonly name: string
  readonly host: string
  readonly port: number
  readonly process: ChildProcess
  readonly pid: number
  /** Processes to account CPU to (name → pid). */
  readonly pids: () => Record<string, number>
  readonly output: () => string
  readonly stop: () => Promise<void>
}

const stopChild = (child: ChildProcess, exited: Promise<void>) => async () => {
  if (child.exitCode !== null || child.signalCode !== null) return
  child.kill("SIGTERM")
  const timer = setTimeout(() => child.kill("SIGKILL"), 20_000)
  await exited
  clearTimeout(timer)
}

const waitHealthy = async (child: ChildProcess, url: string, output: () => string, timeoutMs: number) => {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (child.exitCode !== null) throw new Error(`process exited with ${child.exitCode}:\n${output().slice(-4000)}`)
    if (Date.now() > deadline) {
      child.kill("SIGKILL")
      throw new Error(`not healthy after ${timeoutMs} ms:\n${output().slice(-4000)}`)
    }
    try {
      const res = await fetch(`${url}/healthz`)
      if (res.ok) return
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100))
  }
}

export interface ServiceOptions {
  /** Environment for the service (DATABASE_URL, BENCH_* of bench/serve/sim.config.ts, …). */
  readonly env: Record<string, string | undefined>
  /** Shared across starts so the tiny model (its tokenizer) is generated once per run. */
  readonly dataDir: string
  /** Extra node flags (e.g. --cpu-prof). */
  readonly nodeArgs?: ReadonlyArray<string>
}

/**
 * The compiled entry point under dist/ (`npm run build`, which `npm run bench` runs first):
 * both servers are measured as they would be deployed, not through tsx's loader (whose
 * keep-names transform adds a property to every function it creates).
 */
const built = (file: string): string => {
  const full = path.join(REPO_ROOT, "dist", file)
  if (!existsSync(full)) throw new Error(`${full} is missing: run npm run build`)
  return full
}

export const startService = async (options: ServiceOptions): Promise<Running> => {
  const port = await freePort()
  const runDir = mkdtempSync(path.join(tmpdir(), "chat-bench-run-"))
  const env: Record<string, string> = {}
  for (const [k, v] of Object.entries({
    ...process.env,
    PORT: String(port),
    HOST: "127.0.0.1",
    DATA_DIR: options.dataDir,
    RUN_DIR: runDir,
    CLUSTER_CONFIG: "bench/serve/sim.config.ts",
    // Every bench client connects from 127.0.0.1.
    MAX_CONNECTIONS_PER_CLIENT: "16384",
    // A bench client that stops reading ends its turn at once, as before the detach grace.
    STREAM_DETACH_GRACE_MS: "0",
    ...options.env
  })) {
    if (v !== undefined) env[k] = v
  }
  // Diagnostics: BENCH_SERVICE_NODE_ARGS="--trace-gc …" adds node flags; BENCH_SERVICE_LOG=FILE
  // appends everything the service prints to FILE.
  const extraArgs = serviceNodeArgs()
  const logFile = process.env["BENCH_SERVICE_LOG"]
  const child = spawn(process.execPath, [...(options.nodeArgs ?? []), ...extraArgs, built("src/main.js")], { cwd: REPO_ROOT, env, stdio: ["ignore", "pipe", "pipe"] })
  let output = ""
  const keep = (d: Buffer) => {
    if (logFile !== undefined) appendFileSync(logFile, d)
    output += d.toString()
    if (output.length > 200_000) output = output.slice(-100_000)
  }
  child.stdout!.on("data", keep)
  child.stderr!.on("data", keep)
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()))
  const url = `http://127.0.0.1:${port}`
  await waitHealthy(child, url, () => output, 120_000)
  const pid = child.pid!
  const enginePid = () => childrenOf(pid).find((c) => commandOf(c).includes("llm-engine"))
  const stop = stopChild(child, exited)
  return {
    name: "service",
    host: "127.0.0.1",
    port,
    process: child,
    pid,
    pids: () => {
      const e = enginePid()
      return e === undefined ? { service: pid } : { service: pid, engine: e }
    },
    output: () => output,
    stop: async () => {
      await stop()
      rmSync(runDir, { recursive: true, force: true })
    }
  }
}

export interface BaselineOptions {
  readonly maxNumSeqs: number
  readonly maxNumBatchedTokens: number
  readonly clientBufferTokens: number
  /** Multiplies the modelled step time (default 1). */
  readonly timeScale?: number
}

export const startBaseline = async (options: BaselineOptions, nodeArgs: ReadonlyArray<string> = []): Promise<Running> => {
  const child = spawn(process.execPath, [
    ...nodeArgs,
    built("bench/baseline/server.js"),
    "--port", "0",
    "--max-num-seqs", String(options.maxNumSeqs),
    "--max-num-batched-tokens", String(options.maxNumBatchedTokens),
    "--client-buffer-tokens", String(options.clientBufferTokens),
    "--time-scale", String(options.timeScale ?? 1)
  ], { cwd: REPO_ROOT, stdio: ["ignore", "pipe", "pipe"] })
  let output = ""
  child.stderr!.on("data", (d: Buffer) => (output += d.toString()))
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()))
  const port = await new Promise<number>((resolve, reject) => {
    let line = ""
    const timer = setTimeout(() => reject(new Error(`baseline did not start:\n${output}`)), 30_000)
    child.stdout!.on("data", (d: Buffer) => {
      line += d.toString()
      const m = /READY (\d+)/.exec(line)
      if (m !== null) {
        clearTimeout(timer)
        resolve(Number(m[1]))
      }
    })
    child.once("exit", (code) => reject(new Error(`baseline exited with ${code}:\n${output}`)))
  })
  const pid = child.pid!
  return {
    name: "baseline",
    host: "127.0.0.1",
    port,
    process: child,
    pid,
    pids: () => ({ baseline: pid }),
    output: () => output,
    stop: stopChild(child, exited)
  }
}
