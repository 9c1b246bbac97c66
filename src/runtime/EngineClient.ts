/**
 * EngineClient: one ZeroMQ DEALER to an `llm-engine` ROUTER (engine/PROTOCOL.md), msgpack
 * frames, replies correlated by `req_id` and decoded with Schema, per-request timeouts.
 * `spawn` starts and supervises the engine process itself; `connect` attaches to a running one.
 */
import { type ChildProcess, spawn as spawnProcess } from "node:child_process"
import { Deferred, Duration, Effect, Exit, Fiber, Option, ParseResult, type Schema, type Scope } from "effect"
import { Packr } from "msgpackr"
import * as Zmq from "zeromq"
import {
  ErrorReply,
  HealthReply,
  InfoReply,
  PROTOCOL_VERSION,
  ReleaseReply,
  StepReply,
  type StepRequest
} from "./EngineProtocol.js"
import { EngineError } from "./Errors.js"

export interface EngineClient {
  readonly endpoint: string
  readonly info: Effect.Effect<InfoReply, EngineError>
  readonly health: Effect.Effect<HealthReply, EngineError>
  readonly step: (request: StepRequest) => Effect.Effect<StepReply, EngineError>
  readonly release: (seqIds: ReadonlyArray<number>) => Effect.Effect<ReleaseReply, EngineError>
}

export interface EngineProcessOptions {
  /** Path of the `llm-engine` binary. */
  readonly binary: string
  readonly modelDir: string
  /** `cpu`, `cuda:N` or `sim`. */
  readonly device: string
  /** ZeroMQ endpoint to bind, e.g. `ipc:///tmp/engine-0.sock`. */
  readonly endpoint: string
  readonly kvCacheBytes?: number | undefined
  readonly numBlocks?: number | undefined
  readonly threads?: number | undefined
  readonly maxNumBatchedTokens?: number | undefined
  /** How long to wait for the engine's `READY` line. */
  readonly startTimeoutMs?: number | undefined
  /** Prefix for the engine's stderr lines in our log; `undefined` keeps them quiet. */
  readonly logPrefix?: string | undefined
}

const packr = new Packr({ useRecords: false, variableMapSize: true })

const engineError = (code: string, message: string) => new EngineError({ code, message })

/**
 * Connects a DEALER to `endpoint`. Requests may be issued concurrently; sends are serialized
 * (a zeromq v6 socket allows one pending send) and replies matched by `req_id`.
 * The socket closes when the scope closes; pending requests then fail with `closed`.
 */
export const connect = (
  endpoint: string,
  options: { readonly requestTimeoutMs?: number } = {}
): Effect.Effect<EngineClient, never, Scope.Scope> =>
  Effect.gen(function*() {
    const timeout = Duration.millis(options.requestTimeoutMs ?? 60_000)
    const socket = new Zmq.Dealer({ linger: 0 })
    socket.connect(endpoint)
    const pending = new Map<number, Deferred.Deferred<unknown, EngineError>>()
    const sendLock = yield* Effect.makeSemaphore(1)
    let nextReqId = 1

    const receiver = yield* Effect.tryPromise({
      try: () => socket.receive(),
      catch: (e) => engineError("closed", String(e))
    }).pipe(
      Effect.flatMap((frames) =>
        Effect.sync(() => {
          const payload = frames[frames.length - 1]
          if (payload === undefined) return
          let reply: unknown
          try {
            reply = packr.unpack(payload)
          } catch {
            return
          }
          const reqId = typeof reply === "object" && reply !== null ? (reply as { req_id?: unknown }).req_id : undefined
          if (typeof reqId !== "number") return
          const deferred = pending.get(reqId)
          if (deferred === undefined) return
          pending.delete(reqId)
          Deferred.unsafeDone(deferred, Exit.succeed(reply))
        })
      ),
      Effect.forever,
      Effect.catchAll((e) =>
        Effect.sync(() => {
          for (const d of pending.values()) Deferred.unsafeDone(d, Exit.fail(e))
          pending.clear()
        })
      ),
      Effect.forkScoped
    )

    yield* Effect.addFinalizer(() =>
      Effect.sync(() => {
        socket.close()
        for (const d of pending.values()) Deferred.unsafeDone(d, Exit.fail(engineError("closed", "engine client closed")))
        pending.clear()
      }).pipe(Effect.zipRight(Fiber.interrupt(receiver)))
    )

    const request = <A, I>(
      type: string,
      body: Record<string, unknown>,
      schema: Schema.Schema<A, I>
    ): Effect.Effect<A, EngineError> =>
      Effect.gen(function*() {
        const reqId = nextReqId++
        const deferred = yield* Deferred.make<unknown, EngineError>()
        pending.set(reqId, deferred)
        const frame = packr.pack({ v: PROTOCOL_VERSION, type, req_id: reqId, ...body })
        yield* sendLock.withPermits(1)(
          Effect.tryPromise({ try: () => socket.send(frame), catch: (e) => engineError("send_failed", String(e)) })
        )
        const reply = yield* Deferred.await(deferred).pipe(
          Effect.timeoutFail({
            duration: timeout,
            onTimeout: () => engineError("timeout", `engine did not answer ${type} within ${Duration.format(timeout)}`)
          }),
          Effect.ensuring(Effect.sync(() => pending.delete(reqId)))
        )
        return yield* decodeReply(type, reply, schema)
      })

    return {
      endpoint,
      info: request("info", {}, InfoReply),
      health: request("health", {}, HealthReply),
      step: (body) => request("step", body as unknown as Record<string, unknown>, StepReply),
      release: (seqIds) => request("release", { seq_ids: seqIds }, ReleaseReply)
    } satisfies EngineClient
  })

const decodeReply = <A, I>(type: string, reply: unknown, schema: Schema.Schema<A, I>): Effect.Effect<A, EngineError> => {
  if ((reply as { ok?: unknown }).ok === false) {
    return ParseResult.decodeUnknown(ErrorReply)(reply).pipe(
      Effect.mapError(() => engineError("bad_reply", `malformed error reply to ${type}`)),
      Effect.flatMap((e) => Effect.fail(engineError(e.error.code, e.error.message)))
    )
  }
  return ParseResult.decodeUnknown(schema)(reply).pipe(
    Effect.mapError((e) => engineError("bad_reply", `malformed ${type} reply: ${ParseResult.TreeFormatter.formatIssueSync(e)}`))
  )
}

/** Handle of a running engine process. `exited` completes when the process ends. */
export interface EngineProcess {
  readonly pid: number
  readonly exited: Effect.Effect<number | null>
}

/**
 * Starts `llm-engine`, waits for its `READY` line, and kills it (SIGTERM, then SIGKILL after
 * 5 s) when the scope closes. Fails with `engine_start_failed` if it exits or times out first.
 */
export const spawn = (options: EngineProcessOptions): Effect.Effect<EngineProcess, EngineError, Scope.Scope> =>
  Effect.gen(function*() {
    const args = ["--model", options.modelDir, "--device", options.device, "--endpoint", options.endpoint]
    if (options.kvCacheBytes !== undefined) args.push("--kv-cache-bytes", String(options.kvCacheBytes))
    if (options.numBlocks !== undefined) args.push("--num-blocks", String(options.numBlocks))
    if (options.threads !== undefined) args.push("--threads", String(options.threads))
    if (options.maxNumBatchedTokens !== undefined) args.push("--max-num-batched-tokens", String(options.maxNumBatchedTokens))

    const exited = yield* Deferred.make<number | null>()
    const child = yield* Effect.acquireRelease(
      Effect.sync(() =>
        spawnProcess(options.binary, args, {
          stdio: ["ignore", "pipe", "pipe"],
          // Spinning OpenMP workers starve the Node runtime sharing these cores (measured: 60
          // vs 140 tokens/s for one stream on 2 cores); let them sleep between steps.
          env: { ...process.env, OMP_WAIT_POLICY: process.env["OMP_WAIT_POLICY"] ?? "PASSIVE" }
        })
      ),
      (child) => stopProcess(child, exited)
    )
    child.on("exit", (code) => Deferred.unsafeDone(exited, Exit.succeed(code)))
    const stderrTail: Array<string> = []
    child.stderr!.setEncoding("utf8").on("data", (chunk: string) => {
      for (const line of chunk.split("\n")) {
        if (line.length === 0) continue
        stderrTail.push(line)
        if (stderrTail.length > 20) stderrTail.shift()
        if (options.logPrefix !== undefined) process.stderr.write(`${options.logPrefix} ${line}\n`)
      }
    })
    const ready = yield* Deferred.make<void, EngineError>()
    let stdout = ""
    child.stdout!.setEncoding("utf8").on("data", (chunk: string) => {
      stdout += chunk
      if (/^READY\b/m.test(stdout)) Deferred.unsafeDone(ready, Exit.void)
    })
    child.on("error", (e) => Deferred.unsafeDone(ready, Exit.fail(engineError("engine_start_failed", e.message))))
    child.on("exit", (code) =>
      Deferred.unsafeDone(
        ready,
        Exit.fail(engineError("engine_start_failed", `engine exited with ${code} before READY: ${stderrTail.join(" | ")}`))
      )
    )
    const startTimeout = Duration.millis(options.startTimeoutMs ?? 60_000)
    yield* Deferred.await(ready).pipe(
      Effect.timeoutFail({
        duration: startTimeout,
        onTimeout: () => engineError("engine_start_failed", `engine not READY within ${Duration.format(startTimeout)}`)
      })
    )
    return { pid: child.pid ?? -1, exited: Deferred.await(exited) }
  })

const stopProcess = (child: ChildProcess, exited: Deferred.Deferred<number | null>) =>
  Effect.gen(function*() {
    if (child.exitCode !== null || child.signalCode !== null) return
    child.kill("SIGTERM")
    const done = yield* Deferred.await(exited).pipe(Effect.timeoutOption(Duration.seconds(5)))
    if (Option.isNone(done)) child.kill("SIGKILL")
  })

/** A client of an engine process that this process spawned. */
export interface SpawnedEngineClient extends EngineClient {
  readonly process: EngineProcess
}

/** Spawns the engine and connects to it; both end with the scope. */
export const make = (
  options: EngineProcessOptions & { readonly requestTimeoutMs?: number }
): Effect.Effect<SpawnedEngineClient, EngineError, Scope.Scope> =>
  Effect.gen(function*() {
    const process = yield* spawn(options)
    const client = yield* connect(options.endpoint, options.requestTimeoutMs === undefined ? {} : { requestTimeoutMs: options.requestTimeoutMs })
    return { ...client, process }
  })
