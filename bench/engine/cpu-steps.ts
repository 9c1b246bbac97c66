/**
 * `node --import tsx bench/engine/cpu-steps.ts [--reps 15] [--threads N]`: the CPU engine's
 * time for a few step shapes that a serving workload produces, on the generated tiny Qwen3
 * (src/runtime/DefaultModel.ts), driven over the engine protocol with no service in between:
 *
 * - a first turn's prefill (167 tokens from position 0);
 * - a tenth turn's prefill with the prefix cache (171 new tokens after 1,760 cached positions):
 *   attention over the cached history is what grows;
 * - a decode step of 64 sequences at 500 positions, greedy and at temperature 0.7 / top-p 0.95
 *   (the CPU pool's `max_num_seqs`): the LM head and the sampler over the 151,936-token vocabulary.
 *
 * Reports the medians of the engine's own `forward_ms`, `sample_ms` and `total_ms` per shape
 * and writes bench/results/cpu-steps.json with machine, date, commit and command.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs"
import os from "node:os"
import path from "node:path"
import { generateTinyQwen3 } from "../../src/runtime/DefaultModel.js"
import { RawEngineClient, REPO_ROOT, spawnEngine } from "../../test/support/engineProcess.js"
import { numberArg, provenance } from "../serve/provenance.js"
import { round, summarize } from "../serve/stats.js"

const reps = numberArg("reps", 15)
const threads = numberArg("threads", 0)

interface Shape {
  readonly name: string
  readonly numSeqs: number
  /** Positions already in the KV cache before the measured step. */
  readonly startPos: number
  readonly numTokens: number
  readonly sampling: Record<string, number>
}

const GREEDY = { temperature: 0, max_tokens: 1_000_000 }
const SHAPES: ReadonlyArray<Shape> = [
  { name: "prefill 167 tokens from position 0 (turn 1)", numSeqs: 1, startPos: 0, numTokens: 167, sampling: GREEDY },
  { name: "prefill 171 tokens after 1,760 cached (turn 10)", numSeqs: 1, startPos: 1760, numTokens: 171, sampling: GREEDY },
  { name: "decode 64 sequences at 500 positions, greedy", numSeqs: 64, startPos: 500, numTokens: 1, sampling: GREEDY },
  {
    name: "decode 64 sequences at 500 positions, temperature 0.7 top-p 0.95",
    numSeqs: 64,
    startPos: 500,
    numTokens: 1,
    sampling: { temperature: 0.7, top_p: 0.95, seed: 1, max_tokens: 1_000_000 }
  }
]

const median = (xs: Array<number>) => summarize(xs).p50
const tokens = (n: number, offset: number) => Array.from({ length: n }, (_, i) => 100 + ((offset + i) % 1000))

const main = async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), "bench-cpu-steps-"))
  generateTinyQwen3(path.join(dir, "tiny-qwen3"))
  const engine = await spawnEngine({ model: path.join(dir, "tiny-qwen3"), args: threads > 0 ? ["--threads", String(threads)] : [] })
  const client = new RawEngineClient(engine.endpoint, 120_000)
  const results: Array<Record<string, unknown>> = []
  let nextSeqId = 1
  try {
    const blockSize = Number((await client.ok({ type: "info" }))["block_size"])
    for (const shape of SHAPES) {
      const timings: Array<{ forward_ms: number; sample_ms: number; total_ms: number }> = []
      const numBlocks = Math.ceil((shape.startPos + shape.numTokens + reps) / blockSize)
      const isDecode = shape.numTokens === 1
      // A new sequence may start at any position (the engine takes the positions before it as
      // cached; their KV is whatever the blocks hold, and the time does not depend on its
      // values). A prefill is measured on a new set of sequences each time; decode steps go on
      // one position at a time on the same ones.
      const newSeqs = () =>
        Array.from({ length: shape.numSeqs }, (_, i) => ({
          seq_id: nextSeqId++,
          block_table: Array.from({ length: numBlocks }, (_, b) => i * numBlocks + b)
        }))
      let seqs = newSeqs()
      for (let rep = 0; rep < reps; rep++) {
        const first = rep === 0 || !isDecode
        if (first && rep > 0) {
          await client.ok({ type: "release", seq_ids: seqs.map((s) => s.seq_id) })
          seqs = newSeqs()
        }
        const reply = await client.ok({
          type: "step",
          seqs: seqs.map((s) => ({
            seq_id: s.seq_id,
            tokens: tokens(shape.numTokens, rep),
            start_pos: isDecode ? shape.startPos + rep : shape.startPos,
            ...(first ? { block_table: s.block_table, sampling: shape.sampling } : {})
          }))
        })
        const t = reply["timings"] as Record<string, number>
        timings.push({ forward_ms: t["forward_ms"] ?? NaN, sample_ms: t["sample_ms"] ?? NaN, total_ms: t["total_ms"] ?? NaN })
      }
      await client.ok({ type: "release", seq_ids: seqs.map((s) => s.seq_id) })
      const row = {
        shape: shape.name,
        num_seqs: shape.numSeqs,
        num_tokens_per_seq: shape.numTokens,
        start_pos: shape.startPos,
        forward_ms: round(median(timings.map((t) => t.forward_ms)), 2),
        sample_ms: round(median(timings.map((t) => t.sample_ms)), 2),
        total_ms: round(median(timings.map((t) => t.total_ms)), 2)
      }
      console.log(`${row.shape}: forward ${row.forward_ms} ms, sample ${row.sample_ms} ms, total ${row.total_ms} ms (median of ${reps})`)
      results.push(row)
    }
  } finally {
    client.close()
    await engine.kill()
    rmSync(dir, { recursive: true, force: true })
  }
  const record = {
    benchmark: "cpu-steps",
    ...provenance(`node --import tsx bench/engine/cpu-steps.ts --reps ${reps}${threads > 0 ? ` --threads ${threads}` : ""}`),
    engine_threads: threads > 0 ? threads : "default (all cores)",
    model: "generated tiny Qwen3 (2 layers, hidden 64, 4 heads, 2 KV heads, head_dim 32, vocab 151,936)",
    steps: results
  }
  writeFileSync(path.join(REPO_ROOT, "bench/results/cpu-steps.json"), JSON.stringify(record, null, 2) + "\n")
  console.log("written: bench/results/cpu-steps.json")
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
