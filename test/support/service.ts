/**
 * Starts the real service (`src/main.ts`) as a child process, as a user would with
 * `npm start`, and talks to it over HTTP/SSE like a client.
 */
import { type ChildProcess, spawn } from "node:child_process"
import { mkdtempSync } from "node:fs"
import { tmpdir } from "node:os"
import path from "node:path"
import { REPO_ROOT } from "./engineProcess.js"
import { serviceNodeArgs } from "./nodeArgs.js"
import { freeListenPort } from "./ports.js"

export interface Service {
  readonly url: string
  readonly dataDir: string
  readonly runDir: string
  readonly process: ChildProcess
  readonly output: () => string
  readonly stop: () => Promise<void>
}

/**
 * Starts the service and waits until /healthz answers (timeout 90 s), with the Node flags of
 * `BENCH_SERVICE_NODE_ARGS` (nodeArgs.ts).
 */
export const startService = async (options: {
  readonly env?: Record<string, string | undefined>
  readonly dataDir?: string
  /** Runs `dist/src/main.js` (as `npm start` does; `npm run build` first) instead of src/main.ts through tsx. */
  readonly compiled?: boolean
}): Promise<Service> => {
  const port = await freeListenPort()
  const dataDir = options.dataDir ?? mkdtempSync(path.join(tmpdir(), "chat-e2e-data-"))
  const runDir = mkdtempSync(path.join(tmpdir(), "chat-e2e-run-"))
  const env: Record<string, string> = {}
  // A client that disconnects cancels its turn at once, unless a test gives a grace.
  for (const [k, v] of Object.entries({ ...process.env, PORT: String(port), HOST: "127.0.0.1", DATA_DIR: dataDir, RUN_DIR: runDir, STREAM_DETACH_GRACE_MS: "0", ...options.env })) {
    if (v !== undefined) env[k] = v
  }
  const child = spawn(process.execPath, [...serviceNodeArgs(), ...(options.compiled === true ? ["dist/src/main.js"] : ["--import", "tsx", "src/main.ts"])], { cwd: REPO_ROOT, env, stdio: ["ignore", "pipe", "pipe"] })
  let output = ""
  child.stdout!.on("data", (d: Buffer) => (output += d.toString()))
  child.stderr!.on("data", (d: Buffer) => (output += d.toString()))
  const url = `http://127.0.0.1:${port}`
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()))
  const deadline = Date.now() + 90_000
  for (;;) {
    if (child.exitCode !== null) throw new Error(`service exited with ${child.exitCode}:\n${output}`)
    if (Date.now() > deadline) {
      child.kill("SIGKILL")
      throw new Error(`service did not become healthy:\n${output}`)
    }
    try {
      const res = await fetch(`${url}/healthz`)
      if (res.ok) break
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 200))
  }
  return {
    url,
    dataDir,
    runDir,
    process: child,
    output: () => output,
    stop: async () => {
      if (child.exitCode !== null) return
      child.kill("SIGTERM")
      const timer = setTimeout(() => child.kill("SIGKILL"), 20_000)
      await exited
      clearTimeout(timer)
    }
  }
}

export interface SseEvent {
  readonly event: string
  readonly id: string | undefined
  readonly data: any
}

/**
 * Reads an SSE response event by event. `onEvent` may return "stop" to stop reading (the
 * caller then aborts the request to disconnect).
 */
export const readSse = async (
  res: Response,
  onEvent: (e: SseEvent) => "stop" | void | Promise<"stop" | void>
): Promise<Array<SseEvent>> => {
  const events: Array<SseEvent> = []
  const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader()
  let buffer = ""
  for (;;) {
    const { value, done } = await reader.read()
    if (done) return events
    buffer += value
    let sep: number
    while ((sep = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, sep)
      buffer = buffer.slice(sep + 2)
      if (block.startsWith(":")) continue // keep-alive comment
      let event = "message"
      let id: string | undefined
      let data = ""
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7)
        else if (line.startsWith("id: ")) id = line.slice(4)
        else if (line.startsWith("data: ")) data += line.slice(6)
      }
      const e = { event, id, data: data.length > 0 ? JSON.parse(data) : undefined }
      events.push(e)
      if ((await onEvent(e)) === "stop") {
        await reader.cancel().catch(() => undefined)
        return events
      }
    }
  }
}

export const postJson = (url: string, body: unknown, headersOrSignal?: Record<string, string> | AbortSignal) => {
  const signal = headersOrSignal instanceof AbortSignal ? headersOrSignal : undefined
  const headers = headersOrSignal instanceof AbortSignal ? {} : headersOrSignal ?? {}
  return fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify(body),
    ...(signal === undefined ? {} : { signal })
  })
}
