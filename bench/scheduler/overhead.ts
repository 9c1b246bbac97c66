/**
 * Scheduler overhead: the time the TypeScript side spends per engine step on the GPU's
 * critical path, at decode batch 1, 64 and 256, as a percentage of the modelled H100 step.
 *
 * Method: a GpuWorker (the production step loop) drives `llm-engine --device sim` (the
 * simulated H100 + Llama-3.1-8B shape), whose reply carries its own `timings.total_ms` (the
 * modelled step it slept). For every steady-state decode step (all N sequences running, N
 * tokens in the step) the worker records (GpuWorker.StepRecord):
 *   schedule_ms  previous reply decoded → this step on the socket: apply the reply,
 *                schedule, build the request, msgpack-encode, send
 *   decode_ms    reply frame in → decoded (msgpack + Schema)
 *   rpc_ms       step sent → reply frame in; engine_ms (the sim's step) is inside it
 *   dispatch_ms  hand the previous step's tokens to their sequences' sinks; runs after the
 *                send, while the engine computes, so it is off the critical path (it would
 *                delay the GPU only by outlasting the step, and would then show in rpc_ms)
 * Reported per batch size:
 *   overhead = schedule_ms + decode_ms           (the target: TypeScript time per step)
 *   gap      = overhead + (rpc_ms − engine_ms)   (all the time the GPU waits per step)
 *   ipc_floor: the same step frames sent by a bare zeromq DEALER + msgpackr loop with no
 *              runtime code, rpc − engine p50: what IPC and the engine's own msgpack work
 *              cost on this machine whatever the TypeScript side does.
 * Readers drain their sequences concurrently, as DecodeSlots do.
 *
 *   node --import tsx bench/scheduler/overhead.ts [--short] [--device sim|cpu] [--json]
 * Writes bench/results/scheduler-overhead.json (machine, date, commit, command).
 */
import { execSync } from "node:child_process"
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs"
import os from "node:os"
import path from "node:path"
import { Effect } from "effect"
import { Packr } from "msgpackr"
import * as Zmq from "zeromq"
import { ensureDefaultModel } from "../../src/runtime/DefaultModel.js"
import * as EngineClient from "../../src/runtime/EngineClient.js"
import * as GpuWorker from "../../src/runtime/GpuWorker.js"

const args = process.argv.slice(2)
const short = args.includes("--short")
const device = args.includes("--device") ? args[args.indexOf("--device") + 1]! : "sim"
const batchSizes = [1, 64, 256]
const stepsPerPoint = short ? 150 : 600
const contextTokens = 1024
const binary = path.resolve(process.env["ENGINE_BIN"] ?? "engine/build/llm-engine")
const modelDir = ensureDefaultModel(path.resolve(".data"))
const endpoint = () => `ipc://${path.join(mkdtempSync(path.join(os.tmpdir(), "sched-")), "e.sock")}`
const numBlocksFor = (batchSize: number) => batchSize * Math.ceil((contextTokens + stepsPerPoint + 64) / 16) + 16

const quantile = (xs: ReadonlyArray<number>, q: number) => {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.floor(q * s.length))]!
}
const p50p99 = (xs: ReadonlyArray<number>) => ({ p50: quantile(xs, 0.5), p99: quantile(xs, 0.99) })

interface Point {
  readonly batch_size: number
  readonly num_steps: number
  readonly overhead_ms: { readonly p50: number; readonly p99: number }
  readonly overhead_pct_of_step: { readonly p50: number; readonly p99: number }
  readonly parts_p50_ms: {
    readonly schedule: number
    readonly decode: number
    readonly ipc: number
    readonly dispatch_overlapped: number
  }
  readonly gap_ms: { readonly p50: number; readonly p99: number }
  readonly gap_pct_of_step: { readonly p50: number; readonly p99: number }
  readonly ipc_floor_ms: { readonly p50: number; readonly p99: number }
  readonly modelled_step_ms: { readonly p50: number }
}

const measureWorker = (batchSize: number) =>
  Effect.scoped(
    Effect.gen(function*() {
      const worker = yield* GpuWorker.make({
        gpuId: "bench",
        binary,
        modelDir,
        device,
        endpoint: endpoint(),
        numBlocks: numBlocksFor(batchSize),
        maxNumSeqs: batchSize,
        maxNumBatchedTokens: Math.max(8192, batchSize),
        numSlots: batchSize,
        bufferTokens: 1 << 20,
        stepHistory: 1 << 16
      })
      const sampling = { temperature: 0.8, top_p: 0.95, top_k: 0, seed: 7 }
      const seqs = yield* Effect.forEach(
        Array.from({ length: batchSize }, (_, i) => i),
        (i) =>
          worker.generate({
            promptTokenIds: Array.from({ length: contextTokens }, (_, j) => 1000 + ((i * 31 + j) % 5000)),
            maxTokens: stepsPerPoint + 8,
            sampling: { ...sampling, seed: i },
            priority: 0
          })
      )
      yield* Effect.forEach(seqs, (seq) => Effect.forkScoped(Effect.forever(seq.take)), { discard: true })
      while ((yield* worker.stats).numSteps < stepsPerPoint) yield* Effect.sleep("20 millis")
      return worker.recentSteps().filter((s) => s.num_seqs === batchSize && s.num_tokens === batchSize)
    })
  )

/** rpc − engine of the same decode frames from a bare DEALER loop (no runtime code). */
const measureIpcFloor = (batchSize: number) =>
  Effect.scoped(
    Effect.gen(function*() {
      const ep = endpoint()
      yield* EngineClient.spawn({ binary, modelDir, device, endpoint: ep, numBlocks: numBlocksFor(batchSize) })
      const packr = new Packr(EngineClient.packrOptions)
      const socket = new Zmq.Dealer({ linger: 0 })
      socket.connect(ep)
      yield* Effect.addFinalizer(() => Effect.sync(() => socket.close()))
      const blocksPerSeq = Math.ceil((contextTokens + 200) / 16)
      let reqId = 1
      /** One step: pack, send, receive, unpack; returns its wall time minus the engine's step. */
      const roundTrip = (body: Record<string, unknown>) =>
        Effect.promise(async () => {
          const t0 = performance.now()
          await socket.send(packr.pack({ v: 1, type: "step", req_id: reqId++, ...body }))
          const [frame] = await socket.receive()
          const reply = packr.unpack(frame!) as { ok: boolean; timings?: { total_ms: number } }
          if (!reply.ok) throw new Error(`engine error: ${JSON.stringify(reply)}`)
          return performance.now() - t0 - reply.timings!.total_ms
        })
      const sampling = { temperature: 0.8, top_p: 0.95, top_k: 0, seed: 7 }
      yield* roundTrip({
        seqs: Array.from({ length: batchSize }, (_, i) => ({
          seq_id: i + 1,
          tokens: Array.from({ length: contextTokens }, (_, j) => 1000 + ((i * 31 + j) % 5000)),
          start_pos: 0,
          block_table: Array.from({ length: blocksPerSeq }, (_, b) => i * blocksPerSeq + b),
          sampling
        }))
      })
      const floor: Array<number> = []
      for (let s = 0; s < Math.min(150, stepsPerPoint); s++) {
        const body = {
          packed_outputs: true,
          seqs: Array.from({ length: batchSize }, (_, i) => ({ seq_id: i + 1, tokens: [1000 + i], start_pos: contextTokens + s }))
        }
        floor.push(yield* roundTrip(body))
      }
      return floor
    })
  )

const measure = (batchSize: number) =>
  Effect.gen(function*() {
    const steady = yield* measureWorker(batchSize)
    const floor = yield* measureIpcFloor(batchSize)
    const overhead = steady.map((s) => s.schedule_ms + s.decode_ms)
    const gap = steady.map((s) => s.schedule_ms + s.decode_ms + (s.rpc_ms - s.engine_ms))
    const pct = (xs: ReadonlyArray<number>) => xs.map((x, i) => (100 * x) / steady[i]!.engine_ms)
    return {
      batch_size: batchSize,
      num_steps: steady.length,
      overhead_ms: p50p99(overhead),
      overhead_pct_of_step: p50p99(pct(overhead)),
      parts_p50_ms: {
        schedule: quantile(steady.map((s) => s.schedule_ms), 0.5),
        decode: quantile(steady.map((s) => s.decode_ms), 0.5),
        ipc: quantile(steady.map((s) => s.rpc_ms - s.engine_ms), 0.5),
        dispatch_overlapped: quantile(steady.map((s) => s.dispatch_ms), 0.5)
      },
      gap_ms: p50p99(gap),
      gap_pct_of_step: p50p99(pct(gap)),
      ipc_floor_ms: p50p99(floor),
      modelled_step_ms: { p50: quantile(steady.map((s) => s.engine_ms), 0.5) }
    } satisfies Point
  })

const main = Effect.gen(function*() {
  const points: Array<Point> = []
  for (const b of batchSizes) points.push(yield* measure(b))
  const commit = (() => {
    try {
      return execSync("git rev-parse HEAD", { encoding: "utf8" }).trim()
    } catch {
      return "unknown"
    }
  })()
  const result = {
    name: "scheduler-overhead",
    date: new Date().toISOString(),
    commit,
    command: `node --import tsx bench/scheduler/overhead.ts ${args.join(" ")}`.trim(),
    machine: { cpu: os.cpus()[0]?.model, cores: os.cpus().length, memory_bytes: os.totalmem(), node: process.version },
    device,
    context_tokens: contextTokens,
    target: "overhead (TypeScript time per step on the GPU's critical path) at batch 256 <= 5 % of the modelled step time",
    points
  }
  mkdirSync("bench/results", { recursive: true })
  writeFileSync("bench/results/scheduler-overhead.json", JSON.stringify(result, null, 2) + "\n")
  if (args.includes("--json")) {
    process.stdout.write(JSON.stringify(result) + "\n")
    return
  }
  const f = (x: number, d = 3) => x.toFixed(d)
  console.log(`scheduler overhead per step (device ${device}, context ${contextTokens}), ms:`)
  console.log(
    "batch  steps  step   overhead p50/p99 (% p50)   schedule decode | gap p50/p99 (% p50)    ipc  ipc-floor | dispatch (overlapped)"
  )
  for (const p of points) {
    console.log(
      `${String(p.batch_size).padStart(5)}  ${String(p.num_steps).padStart(5)}  ${f(p.modelled_step_ms.p50, 2).padStart(5)}  ` +
        `${f(p.overhead_ms.p50)} / ${f(p.overhead_ms.p99)} (${f(p.overhead_pct_of_step.p50, 2)} %)  ` +
        `${f(p.parts_p50_ms.schedule)}   ${f(p.parts_p50_ms.decode)} | ` +
        `${f(p.gap_ms.p50)} / ${f(p.gap_ms.p99)} (${f(p.gap_pct_of_step.p50, 1)} %)  ${f(p.parts_p50_ms.ipc)}  ${f(p.ipc_floor_ms.p50)}     | ` +
        `${f(p.parts_p50_ms.dispatch_overlapped)}`
    )
  }
})

Effect.runPromise(main).then(
  () => process.exit(0),
  (e) => {
    console.error(e)
    process.exit(1)
  }
)
