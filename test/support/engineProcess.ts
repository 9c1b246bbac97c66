/**
 * Test helpers for the native engine: spawn `engine/build/llm-engine` on a fresh ipc
 * endpoint, wait for it to print READY, and talk to it with raw msgpack frames over a ZeroMQ
 * DEALER socket. Deliberately independent of src/runtime/EngineClient.
 */
import { spawn, type ChildProcess } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import { pack, unpack } from "msgpackr"
import { Dealer } from "zeromq"

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..")
/** `engine/build/llm-engine`, or the binary named by LLM_ENGINE_BIN (e.g. a build elsewhere). */
export const ENGINE_BINARY = process.env["LLM_ENGINE_BIN"] ?? path.join(REPO_ROOT, "engine", "build", "llm-engine")

export const engineBinaryExists = (): boolean => fs.existsSync(ENGINE_BINARY)

/** Throws a clear message when the engine has not been built. */
export const assertEngineBuilt = (): string => {
  if (!engineBinaryExists()) {
    throw new Error(`engine binary not found at ${ENGINE_BINARY}: run \`npm run build:engine\` first`)
  }
  return ENGINE_BINARY
}

export interface EngineProcess {
  readonly endpoint: string
  readonly process: ChildProcess
  /** Everything the engine wrote to stderr so far (for diagnostics). */
  readonly stderr: () => string
  /** Stops the engine (SIGTERM, then SIGKILL after 5 s) and removes its socket file. */
  readonly kill: () => Promise<void>
}

export interface SpawnEngineOptions {
  readonly model: string
  readonly device?: string
  /** Extra command-line arguments, e.g. ["--num-blocks", "256"]. */
  readonly args?: ReadonlyArray<string>
  readonly readyTimeoutMs?: number
}

export const freshIpcEndpoint = (): { endpoint: string; socketPath: string } => {
  const socketPath = path.join(os.tmpdir(), `llm-engine-test-${process.pid}-${Math.random().toString(36).slice(2, 10)}.sock`)
  return { endpoint: `ipc://${socketPath}`, socketPath }
}

/** Spawns the engine and resolves once it printed a line starting with READY on stdout. */
export const spawnEngine = (options: SpawnEngineOptions): Promise<EngineProcess> => {
  const binary = assertEngineBuilt()
  const { endpoint, socketPath } = freshIpcEndpoint()
  const args = ["--model", options.model, "--device", options.device ?? "cpu", "--endpoint", endpoint, ...(options.args ?? [])]
  const child = spawn(binary, args, { stdio: ["ignore", "pipe", "pipe"] })
  let stderr = ""
  let stdout = ""
  child.stderr!.setEncoding("utf8")
  child.stderr!.on("data", (chunk: string) => {
    stderr += chunk
    if (stderr.length > 200_000) stderr = stderr.slice(-100_000)
  })
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()))
  const kill = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM")
      const timer = setTimeout(() => child.kill("SIGKILL"), 5_000)
      await exited
      clearTimeout(timer)
    }
    fs.rmSync(socketPath, { force: true })
  }
  const timeoutMs = options.readyTimeoutMs ?? 30_000
  return new Promise<EngineProcess>((resolve, reject) => {
    const fail = (why: string) => {
      clearTimeout(timer)
      void kill().finally(() =>
        reject(new Error(`llm-engine ${args.join(" ")}: ${why}\n--- stdout ---\n${stdout.slice(-4000)}\n--- stderr ---\n${stderr.slice(-4000)}`))
      )
    }
    const timer = setTimeout(() => fail(`no READY within ${timeoutMs} ms`), timeoutMs)
    const onError = (err: Error) => fail(`spawn failed: ${err.message}`)
    const onExit = (code: number | null, signal: NodeJS.Signals | null) => fail(`exited before READY (code ${code}, signal ${signal})`)
    child.once("error", onError)
    child.once("exit", onExit)
    child.stdout!.setEncoding("utf8")
    child.stdout!.on("data", (chunk: string) => {
      const before = stdout
      stdout += chunk
      if (stdout.length > 200_000) stdout = stdout.slice(-100_000)
      if (!/^READY/m.test(before) && /^READY/m.test(stdout)) {
        clearTimeout(timer)
        child.off("exit", onExit)
        child.off("error", onError)
        resolve({ endpoint, process: child, stderr: () => stderr, kill })
      }
    })
  })
}

// ---------------------------------------------------------------------------------------
// Raw requests

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Reply = Record<string, any>

/**
 * One DEALER connection. Requests are serialised (one in flight at a time), each awaits
 * its single reply frame; a timeout closes the connection (replies could be misaligned).
 */
export class RawEngineClient {
  private readonly socket: Dealer
  private queue: Promise<unknown> = Promise.resolve()
  private nextReqId = 1
  private closed = false

  constructor(
    readonly endpoint: string,
    readonly timeoutMs = 30_000
  ) {
    this.socket = new Dealer({ linger: 0, receiveTimeout: timeoutMs, sendTimeout: timeoutMs })
    this.socket.connect(endpoint)
  }

  /** Sends raw bytes as one frame and decodes the one reply frame. */
  requestRaw(frame: Uint8Array): Promise<Reply> {
    const run = async (): Promise<Reply> => {
      if (this.closed) throw new Error("RawEngineClient is closed")
      await this.socket.send(frame)
      let frames: Array<Buffer>
      try {
        frames = await this.socket.receive()
      } catch (err) {
        this.close()
        throw new Error(`no reply from ${this.endpoint} within ${this.timeoutMs} ms (${String(err)})`)
      }
      if (frames.length !== 1) throw new Error(`expected one reply frame, got ${frames.length}`)
      return unpack(frames[0]!) as Reply
    }
    const result = this.queue.then(run, run)
    this.queue = result.catch(() => undefined)
    return result
  }

  /** Sends one msgpack map (adding `v: 1` and a fresh `req_id` unless given) and awaits its reply. */
  request(msg: Record<string, unknown>): Promise<Reply> {
    const full = { v: 1, req_id: this.nextReqId++, ...msg }
    return this.requestRaw(pack(full))
  }

  /** Like `request`, but throws when the reply is not `ok`. */
  async ok(msg: Record<string, unknown>): Promise<Reply> {
    const reply = await this.request(msg)
    if (reply["ok"] !== true) throw new Error(`engine error for ${String(msg["type"])}: ${JSON.stringify(reply["error"])}`)
    return reply
  }

  close(): void {
    if (!this.closed) {
      this.closed = true
      this.socket.close()
    }
  }
}

/** One-shot: connect, send one msgpack map, await its reply, disconnect. */
export const rawRequest = async (endpoint: string, msg: Record<string, unknown>, timeoutMs = 30_000): Promise<Reply> => {
  const client = new RawEngineClient(endpoint, timeoutMs)
  try {
    return await client.request(msg)
  } finally {
    client.close()
  }
}

/** Decodes a `logits` bin (float32 little-endian) into a Float32Array. */
export const decodeLogits = (bin: Uint8Array): Float32Array => {
  const copy = new Uint8Array(bin.byteLength)
  copy.set(bin)
  return new Float32Array(copy.buffer)
}
