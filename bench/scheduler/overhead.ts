/**
 * Scheduler overhead: the time the TypeScript side spends per engine step (build the step,
 * msgpack-encode and send it, receive and decode the reply, dispatch sampled tokens to their
 * sequences' buffers), at decode batch 1, 64 and 256, as a percentage of the modelled H100
 * step time.
 *
 * Method: a GpuWorker (the production step loop) drives `llm-engine --device sim` (the
 * simulated H100 + Llama-3.1-8B shape), whose reply carries its own `timings.total_ms` (the
 * modelled step time it slept). For every steady-state decode step (all N sequences running,
 * N tokens in the step) the worker records schedule_ms, rpc_ms, engine_ms and dispatch_ms;
 *   overhead_ms = schedule_ms + (rpc_ms - engine_ms) + dispatch_ms
 * i.e. everything but the engine's own step, including ZeroMQ IPC both ways. Readers drain
 * their buffers concurrently, as DecodeSlots do.
 *
 *   node --import tsx bench/scheduler/overhead.ts [--short] [--device sim|cpu] [--json]
 * Writes bench/results/scheduler-overhead.json (machine, date, commit, command).
 */
import { execSync } from "node:child_process"
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs"
import os from "node:os"
import path from "node:path"
import { Effect } from "effect"
import { ensureDefaultModel } from "../../src/runtime/DefaultModel.js"
import * as GpuWorker from "../../src/runtime/GpuWorker.js"

const args = process.argv.slice(2)
const short = args.includes("--short")
const device = args.includes("--device") ? args[args.indexOf("--device") + 1]! : "sim"
const batchSizes = [1, 64, 256]
const stepsPerPoint = short ? 150 : 600
const contextTokens = 1024

const quantile = (xs: ReadonlyArray<number>, q: number) => {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.floor(q * s.length))]!
}

interface Point {
  readonly batch_size: number
  readonly num_steps: number
  readonly overhead_ms: { readonly p50: number; readonly p99: number }
  readonly parts_p50_ms: { readonly schedule: number; readonly ipc_and_codec: number; readonly dispatch: number }
  readonly modelled_step_ms: { readonly p50: number }
  readonly overhead_pct_of_step: { readonly p50: number; readonly p99: number }
}

const measure = (batchSize: number) =>
  Effect.scoped(
    Effect.gen(function*() {
      const worker = yield* GpuWorker.make({
        gpuId: "bench",
        binary: path.resolve(process.env["ENGINE_BIN"] ?? "engine/build/llm-engine"),
        modelDir: ensureDefaultModel(path.resolve(".data")),
        device,
        endpoint: `ipc://${path.join(mkdtempSync(path.join(os.tmpdir(), "sched-")), "e.sock")}`,
        numBlocks: batchSize * Math.ceil((contextTokens + stepsPerPoint + 64) / 16) + 16,
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
      // Readers drain every sequence concurrently, as DecodeSlots do.
      yield* Effect.forEach(seqs, (seq) => Effect.forkScoped(Effect.forever(seq.take)), { discard: true })
      while ((yield* worker.stats).numSteps < stepsPerPoint) yield* Effect.sleep("20 millis")
      const steady = worker.recentSteps().filter((s) => s.num_seqs === batchSize && s.num_tokens === batchSize)
      const overhead = steady.map((s) => s.schedule_ms + (s.rpc_ms - s.engine_ms) + s.dispatch_ms)
      const engine = steady.map((s) => s.engine_ms)
      const pct = steady.map((s, i) => (100 * overhead[i]!) / s.engine_ms)
      return {
        batch_size: batchSize,
        num_steps: steady.length,
        overhead_ms: { p50: quantile(overhead, 0.5), p99: quantile(overhead, 0.99) },
        parts_p50_ms: {
          schedule: quantile(steady.map((s) => s.schedule_ms), 0.5),
          ipc_and_codec: quantile(steady.map((s) => s.rpc_ms - s.engine_ms), 0.5),
          dispatch: quantile(steady.map((s) => s.dispatch_ms), 0.5)
        },
        modelled_step_ms: { p50: quantile(engine, 0.5) },
        overhead_pct_of_step: { p50: quantile(pct, 0.5), p99: quantile(pct, 0.99) }
      } satisfies Point
    })
  )

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
    target: "overhead at batch 256 <= 5 % of the modelled step time",
    points
  }
  mkdirSync("bench/results", { recursive: true })
  writeFileSync("bench/results/scheduler-overhead.json", JSON.stringify(result, null, 2) + "\n")
  if (args.includes("--json")) {
    process.stdout.write(JSON.stringify(result) + "\n")
    return
  }
  console.log(`scheduler overhead per step (device ${device}, context ${contextTokens}):`)
  console.log("batch  steps  overhead p50/p99 ms  (schedule / ipc+codec / dispatch p50)  modelled step ms  % of step p50/p99")
  for (const p of points) {
    console.log(
      `${String(p.batch_size).padStart(5)}  ${String(p.num_steps).padStart(5)}  ` +
        `${p.overhead_ms.p50.toFixed(3).padStart(7)} / ${p.overhead_ms.p99.toFixed(3).padEnd(7)}    ` +
        `(${p.parts_p50_ms.schedule.toFixed(3)} / ${p.parts_p50_ms.ipc_and_codec.toFixed(3)} / ${p.parts_p50_ms.dispatch.toFixed(3)})` +
        `${p.modelled_step_ms.p50.toFixed(2).padStart(22)}  ${p.overhead_pct_of_step.p50.toFixed(2)} % / ${p.overhead_pct_of_step.p99.toFixed(2)} %`
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
