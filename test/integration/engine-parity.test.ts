/**
 * Engine correctness suite: the native engine (CPU backend) against an independent float64
 * TypeScript reference forward pass (test/reference/forward.ts), over the raw msgpack/ZeroMQ
 * protocol (engine/PROTOCOL.md).
 *
 * Needs `engine/build/llm-engine` (`npm run build:engine`).
 */
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { pack } from "msgpackr"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { generateTinyQwen3, Xoshiro128 } from "../../src/runtime/DefaultModel.js"
import { parseHeader, writeSafetensors, type TensorToWrite } from "../../src/runtime/internal/safetensors.js"
import { argmax, elementwiseCheck, maxRelativeError, ReferenceModel, top2Gap } from "../reference/forward.js"
import { decodeLogits, RawEngineClient, spawnEngine, type EngineProcess, type Reply } from "../support/engineProcess.js"

// A seed whose greedy paths in this suite have top-2 logit gaps ≥ 0.008 (float32 error ≈ 1e-5).
const MODEL_SEED = 4
const GREEDY = { temperature: 0, top_p: 1, top_k: 0, seed: 0 }

// ---------------------------------------------------------------------------------------
// Small helpers: deterministic prompts, block accounting, sequences

/** Deterministic token ids in [lo, hi). */
const promptTokens = (n: number, salt: number, hi = 151643, lo = 0): Array<number> => {
  const rng = new Xoshiro128(0x5eed + salt * 7919)
  return Array.from({ length: n }, () => lo + (rng.nextU32() % (hi - lo)))
}

class BlockPool {
  private readonly free: Array<number>
  constructor(readonly numBlocks: number) {
    this.free = Array.from({ length: numBlocks }, (_, i) => numBlocks - 1 - i)
  }
  alloc(n: number): Array<number> {
    if (n > this.free.length) throw new Error(`test block pool exhausted (${n} > ${this.free.length})`)
    return Array.from({ length: n }, () => this.free.pop()!)
  }
  release(ids: ReadonlyArray<number>): void {
    this.free.push(...ids)
  }
}

type Sampling = { temperature: number; top_p: number; top_k: number; seed: number }

/** Client-side state of one sequence: position and block table (blocks added on demand). */
class Seq {
  pos = 0
  table: Array<number> = []
  readonly generated: Array<number> = []
  constructor(
    readonly id: number,
    readonly blockSize: number,
    readonly pool: BlockPool,
    readonly sampling: Sampling
  ) {}

  /** The `seqs` entry for appending `tokens`; advances the position. */
  entry(tokens: ReadonlyArray<number>, extra: Record<string, unknown> = {}): Record<string, unknown> {
    const need = Math.ceil((this.pos + tokens.length) / this.blockSize)
    const e: Record<string, unknown> = { seq_id: this.id, tokens: [...tokens], start_pos: this.pos, ...extra }
    if (this.table.length === 0) {
      this.table = this.pool.alloc(need)
      e["block_table"] = [...this.table]
      e["sampling"] = this.sampling
    } else if (need > this.table.length) {
      const more = this.pool.alloc(need - this.table.length)
      this.table.push(...more)
      e["new_blocks"] = more
    }
    this.pos += tokens.length
    return e
  }

  free(): void {
    this.pool.release(this.table)
    this.table = []
  }
}

const outputsOf = (reply: Reply): Array<Reply> => {
  if (reply["ok"] !== true) throw new Error(`step failed: ${JSON.stringify(reply["error"])}`)
  return reply["outputs"] as Array<Reply>
}

// ---------------------------------------------------------------------------------------
// The sampling rule of PROTOCOL.md, re-implemented (float64) to check the engine's draws

const MASK64 = (1n << 64n) - 1n
const GOLDEN = 0x9e3779b97f4a7c15n
const splitmix64 = (x: bigint): bigint => {
  let z = (x + GOLDEN) & MASK64
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64
  return z ^ (z >> 31n)
}
const uniformFor = (seed: number, pos: number): number =>
  Number(splitmix64(BigInt(seed) ^ ((GOLDEN * BigInt(pos + 1)) & MASK64)) >> 11n) * 2 ** -53

/**
 * Temperature → top-k → softmax → top-p (most probable first) → renormalise → inverse CDF
 * with the (seed, position) uniform, accumulating over the kept tokens in ascending id order
 * (the engine's reading of PROTOCOL.md). Returns the sampled token, plus the CDF margin of the draw (how far u is from a boundary). */
const specSample = (logits: ArrayLike<number>, s: Sampling, pos: number): { token: number; margin: number } => {
  const ids = Array.from({ length: logits.length }, (_, i) => i)
  ids.sort((a, b) => logits[b]! - logits[a]! || a - b)
  const kept = s.top_k > 0 ? ids.slice(0, s.top_k) : ids
  const max = logits[kept[0]!]! / s.temperature
  const p = kept.map((i) => Math.exp(logits[i]! / s.temperature - max))
  const z = p.reduce((a, b) => a + b, 0)
  let n = 0
  let mass = 0
  while (n < kept.length) {
    mass += p[n]! / z
    n++
    if (mass >= s.top_p) break
  }
  // inverse CDF over the kept tokens in ascending token-id order
  const keptIds = kept.slice(0, n).map((id, j) => ({ id, w: p[j]! })).sort((a, b) => a.id - b.id)
  const u = uniformFor(s.seed, pos)
  const total = keptIds.reduce((a, b) => a + b.w, 0)
  let cum = 0
  for (let i = 0; i < keptIds.length; i++) {
    const lo = cum
    cum += keptIds[i]!.w / total
    if (u < cum || i === keptIds.length - 1) return { token: keptIds[i]!.id, margin: Math.min(u - lo, cum - u) }
  }
  throw new Error("unreachable")
}

// ---------------------------------------------------------------------------------------

const report: Array<string> = []
const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "engine-parity-"))
afterAll(() => {
  fs.rmSync(tmpRoot, { recursive: true, force: true })
  if (report.length > 0) console.log(["engine parity report:", ...report].join("\n"))
})

describe("engine parity (tiny Qwen3, CPU backend)", () => {
  const modelDir = path.join(tmpRoot, "tiny-qwen3")
  let engine: EngineProcess
  let client: RawEngineClient
  let ref: ReferenceModel
  let info: Reply
  let blockSize: number
  let pool: BlockPool
  let nextSeqId = 1

  beforeAll(async () => {
    const t0 = performance.now()
    generateTinyQwen3(modelDir, { seed: MODEL_SEED })
    report.push(`generateTinyQwen3: ${(performance.now() - t0).toFixed(0)} ms`)
    engine = await spawnEngine({ model: modelDir, device: "cpu", args: ["--num-blocks", "128"] })
    client = new RawEngineClient(engine.endpoint, 30_000)
    ref = ReferenceModel.load(modelDir)
    info = await client.ok({ type: "info" })
    blockSize = info["block_size"] as number
    pool = new BlockPool(info["num_blocks"] as number)
  })

  afterAll(async () => {
    client?.close()
    await engine?.kill()
  })

  const newSeq = (sampling: Sampling = GREEDY) => new Seq(nextSeqId++, blockSize, pool, sampling)

  const step = async (seqs: Array<Record<string, unknown>>, extra: Record<string, unknown> = {}): Promise<Array<Reply>> =>
    outputsOf(await client.request({ type: "step", seqs, ...extra }))

  const release = async (...seqs: Array<Seq>) => {
    const reply = await client.ok({ type: "release", seq_ids: seqs.map((s) => s.id) })
    for (const s of seqs) s.free()
    return reply
  }

  /** Runs one sequence alone: prefill (in the given chunks), then greedy/sampled decode. */
  const runAlone = async (
    prompt: ReadonlyArray<number>,
    newTokens: number,
    options: { chunks?: ReadonlyArray<number>; sampling?: Sampling; logits?: boolean } = {}
  ): Promise<{ tokens: Array<number>; logits: Array<Float32Array> }> => {
    const seq = newSeq(options.sampling)
    const chunks = options.chunks ?? [prompt.length]
    const wantLogits = options.logits ?? false
    const tokens: Array<number> = []
    const logits: Array<Float32Array> = []
    let at = 0
    for (let c = 0; c < chunks.length; c++) {
      const last = c === chunks.length - 1
      const part = prompt.slice(at, at + chunks[c]!)
      at += chunks[c]!
      const [out] = await step([seq.entry(part, last ? { return_logits: wantLogits } : { sample: false })])
      expect(out!["seq_id"]).toBe(seq.id)
      if (!last) {
        expect(out!["token"]).toBeUndefined()
        continue
      }
      tokens.push(out!["token"] as number)
      if (wantLogits) logits.push(decodeLogits(out!["logits"] as Uint8Array))
    }
    expect(at).toBe(prompt.length)
    while (tokens.length < newTokens) {
      const [out] = await step([seq.entry([tokens[tokens.length - 1]!], { return_logits: wantLogits })])
      tokens.push(out!["token"] as number)
      if (wantLogits) logits.push(decodeLogits(out!["logits"] as Uint8Array))
    }
    await release(seq)
    return { tokens, logits }
  }

  it("info describes the model and the KV cache", () => {
    const m = info["model"] as Reply
    expect(info["ok"]).toBe(true)
    expect(info["protocol_version"]).toBe(1)
    expect(info["device"]).toBe("cpu")
    expect(blockSize).toBe(16)
    expect(m["vocab_size"]).toBe(151936)
    expect(m["hidden_size"]).toBe(64)
    expect(m["num_layers"]).toBe(2)
    expect(m["num_heads"]).toBe(4)
    expect(m["num_kv_heads"]).toBe(2)
    expect(m["head_dim"]).toBe(32)
    expect(m["model_type"]).toBe("qwen3")
    expect(m["eos_token_ids"]).toEqual([151645, 151643])
    expect(m["dtype"]).toBe("f32")
    expect(info["num_blocks"]).toBeGreaterThanOrEqual(64)
    expect(info["num_active_seqs"]).toBe(0)
    expect(info["num_used_blocks"]).toBe(0)
  })

  it("embed is the float64 reference's last-token final hidden state, unit norm; it touches no sequence", async () => {
    const prompt = promptTokens(40, 3)
    const reply = await client.ok({ type: "embed", tokens: prompt })
    const got = reply["embedding"] as Array<number>
    const want = ref.session().embed(prompt)
    expect(got.length).toBe(64)
    let norm = 0
    for (let i = 0; i < got.length; i++) {
      norm += got[i]! * got[i]!
      expect(Math.abs(got[i]! - want[i]!), `dimension ${i}`).toBeLessThanOrEqual(1e-4)
    }
    expect(Math.abs(norm - 1)).toBeLessThanOrEqual(1e-5)
    // Another text, another vector; the same text, the same vector.
    const other = (await client.ok({ type: "embed", tokens: promptTokens(40, 4) }))["embedding"] as Array<number>
    expect(other).not.toEqual(got)
    expect((await client.ok({ type: "embed", tokens: prompt }))["embedding"]).toEqual(got)
    expect((await client.ok({ type: "info" }))["num_active_seqs"]).toBe(0)
    expect(((await client.request({ type: "embed", tokens: [] })) as any).error.code).toBe("token_out_of_range")
  })

  it("a 48-token prefill and 16 greedy decode steps match the float64 reference", async () => {
    const prompt = promptTokens(48, 1)
    const t0 = performance.now()
    const engineRun = await runAlone(prompt, 17, { logits: true })
    const tEngine = performance.now() - t0
    const t1 = performance.now()
    const session = ref.session()
    let r = session.forward(prompt)
    const rows: Array<string> = []
    let worst = 0
    let minGap = Infinity
    for (let i = 0; i < 17; i++) {
      const e = engineRun.logits[i]!
      expect(e.length).toBe(151936)
      const rel = maxRelativeError(e, r)
      const el = elementwiseCheck(e, r, 1e-4, 1e-3)
      worst = Math.max(worst, rel)
      minGap = Math.min(minGap, top2Gap(r))
      rows.push(`${i === 0 ? "prefill" : `decode ${i}`}: rel ${rel.toExponential(2)}, elementwise violations ${el.violations}`)
      expect(rel, `step ${i}: max relative error`).toBeLessThanOrEqual(1e-3)
      expect(el.violations, `step ${i}: elementwise |e-r| <= 1e-4 + 1e-3|r| (worst at ${el.worstIndex})`).toBe(0)
      expect(engineRun.tokens[i], `step ${i}: greedy token`).toBe(argmax(r))
      if (i < 16) r = session.forward([engineRun.tokens[i]!])
    }
    const tRef = performance.now() - t1
    report.push(
      `tiny-qwen3 parity (48-token prefill + 16 decode): max rel error ${worst.toExponential(3)}; min top-2 logit gap ${minGap.toFixed(3)}; ` +
        `engine ${tEngine.toFixed(0)} ms, reference ${tRef.toFixed(0)} ms`,
      ...rows.map((r) => `  ${r}`)
    )
    expect(new Set(engineRun.tokens).size, "greedy decode is not degenerate").toBeGreaterThan(4)
  })

  it("chunked prefill (17 + 16 + 15) gives the same logits and greedy continuation as one prefill", async () => {
    const prompt = promptTokens(48, 1)
    const whole = await runAlone(prompt, 16, { logits: true })
    const chunked = await runAlone(prompt, 16, { chunks: [17, 16, 15], logits: true })
    const rel = maxRelativeError(chunked.logits[0]!, whole.logits[0]!)
    report.push(`chunked prefill vs one prefill: next-token logits rel diff ${rel.toExponential(3)}`)
    expect(rel).toBeLessThanOrEqual(1e-5)
    expect(chunked.tokens).toEqual(whole.tokens)
    const refRel = maxRelativeError(chunked.logits[0]!, ref.logits(prompt))
    expect(refRel).toBeLessThanOrEqual(1e-3)
  })

  it("continuous batching: 8 sequences joining at different steps decode exactly as they do alone", async () => {
    const N = 8
    const NEW = 12
    const prompts = Array.from({ length: N }, (_, k) => promptTokens(5 + 5 * k, 100 + k))
    const alone: Array<Array<number>> = []
    for (const p of prompts) alone.push((await runAlone(p, NEW)).tokens)

    const seqs = prompts.map(() => newSeq())
    const running = new Set<number>()
    let stepNo = 0
    let maxBatchTokens = 0
    while (stepNo < N || running.size > 0) {
      const entries: Array<Record<string, unknown>> = []
      const order: Array<number> = []
      const finished: Array<Seq> = []
      // decode one token for each running sequence…
      for (const k of running) {
        const s = seqs[k]!
        entries.push(s.entry([s.generated[s.generated.length - 1]!]))
        order.push(k)
      }
      // …plus the prefill of the newly admitted one (sequence k joins at step k)
      if (stepNo < N) {
        entries.push(seqs[stepNo]!.entry(prompts[stepNo]!))
        order.push(stepNo)
        running.add(stepNo)
      }
      maxBatchTokens = Math.max(maxBatchTokens, entries.reduce((a, e) => a + (e["tokens"] as Array<number>).length, 0))
      const outs = await step(entries)
      expect(outs.map((o) => o["seq_id"])).toEqual(order.map((k) => seqs[k]!.id))
      outs.forEach((o, i) => {
        const k = order[i]!
        seqs[k]!.generated.push(o["token"] as number)
        if (seqs[k]!.generated.length === NEW) {
          running.delete(k)
          finished.push(seqs[k]!)
        }
      })
      if (finished.length > 0) await release(...finished)
      stepNo++
    }
    report.push(`batching: ${stepNo} steps, up to ${maxBatchTokens} tokens per step`)
    for (let k = 0; k < N; k++) expect(seqs[k]!.generated, `sequence ${k} (prompt ${prompts[k]!.length} tokens)`).toEqual(alone[k])
    const after = await client.ok({ type: "info" })
    expect(after["num_active_seqs"]).toBe(0)
    expect(after["num_used_blocks"]).toBe(0)
  })

  it("seeded sampling is reproducible, independent of the batch, and follows the protocol's rule", async () => {
    const sampling: Sampling = { temperature: 0.8, top_p: 0.9, top_k: 50, seed: 1234 }
    const prompt = promptTokens(20, 200)
    const a = await runAlone(prompt, 16, { sampling, logits: true })
    const b = await runAlone(prompt, 16, { sampling })
    expect(b.tokens).toEqual(a.tokens)

    // the same sequence inside a batch, next to a greedy one that joined earlier
    const other = newSeq()
    const s = newSeq(sampling)
    const [o] = await step([other.entry(promptTokens(33, 201))])
    let otherLast = o!["token"] as number
    let outs = await step([other.entry([otherLast]), s.entry(prompt)])
    otherLast = outs[0]!["token"] as number
    const batched: Array<number> = [outs[1]!["token"] as number]
    while (batched.length < 16) {
      outs = await step([s.entry([batched[batched.length - 1]!]), other.entry([otherLast])])
      batched.push(outs[0]!["token"] as number)
      otherLast = outs[1]!["token"] as number
    }
    await release(other, s)
    expect(batched).toEqual(a.tokens)

    const c = await runAlone(prompt, 16, { sampling: { ...sampling, seed: 4321 } })
    expect(c.tokens).not.toEqual(a.tokens)

    // the draws follow PROTOCOL.md's sampling rule, applied to the engine's own logits
    let checked = 0
    const mismatches: Array<string> = []
    a.logits.forEach((logits, i) => {
      const pos = prompt.length + i // position of the produced token = start_pos + len(tokens)
      const { token, margin } = specSample(logits, sampling, pos)
      if (margin < 1e-6) return // too close to a CDF boundary to call
      checked++
      if (token !== a.tokens[i]) mismatches.push(`step ${i}: engine ${a.tokens[i]}, spec ${token}`)
    })
    report.push(
      `seeded sampling: tokens ${a.tokens.join(" ")}; distinct ${new Set(a.tokens).size}/16; spec check ${checked - mismatches.length}/${checked} agree`
    )
    expect(mismatches).toEqual([])
  })

  it("packed_outputs: the same tokens as u32 arrays; logits rows and prefill chunks stay out of them", async () => {
    const sampling: Sampling = { temperature: 0.7, top_p: 0.95, top_k: 0, seed: 99 }
    const prompt = promptTokens(24, 300)
    const expected = (await runAlone(prompt, 8, { sampling })).tokens
    const u32 = (bytes: Uint8Array) => Array.from({ length: bytes.byteLength / 4 }, (_, i) =>
      new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(i * 4, true))
    const seq = newSeq(sampling)
    const chunk = newSeq()
    const withLogits = newSeq()
    // one step: a sampled prefill (packed), a non-final prefill chunk (absent), a logits row (in outputs)
    const first = await client.request({
      type: "step",
      packed_outputs: true,
      seqs: [
        seq.entry(prompt),
        chunk.entry(promptTokens(10, 301), { sample: false }),
        withLogits.entry(promptTokens(5, 302), { return_logits: true })
      ]
    })
    const packed = first["packed"] as { seq_ids: Uint8Array; tokens: Uint8Array }
    expect(u32(packed.seq_ids)).toEqual([seq.id])
    const tokens = u32(packed.tokens)
    const outputs = first["outputs"] as Array<Reply>
    expect(outputs.map((o) => o["seq_id"])).toEqual([withLogits.id])
    expect(outputs[0]!["logits"]).toBeInstanceOf(Uint8Array)
    await release(chunk, withLogits)
    while (tokens.length < 8) {
      const reply = await client.request({ type: "step", packed_outputs: true, seqs: [seq.entry([tokens[tokens.length - 1]!])] })
      expect(reply["outputs"]).toEqual([])
      tokens.push(...u32((reply["packed"] as { tokens: Uint8Array }).tokens))
    }
    await release(seq)
    expect(tokens).toEqual(expected)
  })

  it("bad messages get error replies and change nothing", async () => {
    const numBlocks = info["num_blocks"] as number
    const prompt = promptTokens(20, 300)
    const live = newSeq()
    const [first] = await step([live.entry(prompt)])
    let last = first!["token"] as number
    const snapshot = async () => {
      const i = await client.ok({ type: "info" })
      return { seqs: i["num_active_seqs"], blocks: i["num_used_blocks"] }
    }
    const before = await snapshot()
    expect(before).toEqual({ seqs: 1, blocks: 2 })

    const expectError = async (reply: Reply, code: string, reqId?: number) => {
      expect(reply["ok"], JSON.stringify(reply)).toBe(false)
      expect(reply["v"]).toBe(1)
      expect((reply["error"] as Reply)["code"]).toBe(code)
      expect(typeof (reply["error"] as Reply)["message"]).toBe("string")
      if (reqId !== undefined) expect(reply["req_id"]).toBe(reqId)
      expect(await snapshot()).toEqual(before)
    }
    // a valid decode entry for the live sequence, put next to the bad one
    const liveDecode = () => ({ seq_id: live.id, tokens: [last], start_pos: live.pos })
    const fresh = (extra: Record<string, unknown>) => ({
      seq_id: 9_999,
      tokens: [1, 2, 3],
      start_pos: 0,
      block_table: [0],
      sampling: GREEDY,
      ...extra
    })

    await expectError(await client.requestRaw(Uint8Array.from([0xc1, 0xff, 0x00, 0x13])), "bad_message", 0)
    await expectError(await client.requestRaw(pack([1, 2, 3])), "bad_message", 0)
    await expectError(await client.requestRaw(pack({ v: 1, type: "info" })), "bad_message", 0)
    await expectError(await client.request({ type: "frobnicate", req_id: 77 }), "unknown_type", 77)
    await expectError(await client.request({ type: "info", v: 2, req_id: 78 }), "unsupported_version", 78)
    await expectError(await client.request({ type: "step", seqs: [liveDecode(), { seq_id: 12_345, tokens: [5], start_pos: 0 }] }), "unknown_sequence")
    await expectError(await client.request({ type: "step", seqs: [liveDecode(), fresh({ block_table: [numBlocks] })] }), "block_out_of_range")
    await expectError(
      await client.request({ type: "step", seqs: [{ ...liveDecode(), new_blocks: [numBlocks + 5] }] }),
      "block_out_of_range"
    )
    await expectError(await client.request({ type: "step", seqs: [liveDecode(), fresh({ tokens: [1, 151936] })] }), "token_out_of_range")
    await expectError(await client.request({ type: "step", seqs: [liveDecode(), fresh({ tokens: [] })] }), "token_out_of_range")
    await expectError(await client.request({ type: "step", seqs: [liveDecode(), liveDecode()] }), "duplicate_sequence")
    await expectError(await client.request({ type: "step", seqs: [{ ...liveDecode(), start_pos: live.pos + 1 }] }), "position_mismatch")
    await expectError(await client.request({ type: "step", seqs: [liveDecode(), fresh({ tokens: Array(17).fill(1) })] }), "block_table_too_short")
    await expectError(await client.request({ type: "step", seqs: [liveDecode(), fresh({ start_pos: 4095, tokens: [1, 2], block_table: Array(257).fill(0) })] }), "position_out_of_range")
    await expectError(
      await client.request({ type: "step", seqs: [liveDecode(), fresh({ sampling: { ...GREEDY, top_p: 0 } })] }),
      "invalid_sampling"
    )
    await expectError(
      await client.request({ type: "step", seqs: [liveDecode(), fresh({ sampling: { ...GREEDY, temperature: -1 } })] }),
      "invalid_sampling"
    )

    // still serving, and the live sequence continues where it was: same logits as the reference
    const session = ref.session()
    let r = session.forward(prompt)
    expect(last).toBe(argmax(r))
    for (let i = 0; i < 3; i++) {
      const [out] = await step([live.entry([last], { return_logits: true })])
      r = session.forward([last])
      expect(maxRelativeError(decodeLogits(out!["logits"] as Uint8Array), r)).toBeLessThanOrEqual(1e-3)
      last = out!["token"] as number
      expect(last).toBe(argmax(r))
    }
    const health = await client.ok({ type: "health" })
    expect(health["status"]).toBe("ok")

    const rel = await client.ok({ type: "release", seq_ids: [live.id, 424_242] })
    live.free()
    expect(rel["released"]).toEqual([live.id])
    expect(rel["unknown"]).toEqual([424_242])
    const after = await client.ok({ type: "info" })
    expect(after["num_active_seqs"]).toBe(0)
    expect(after["num_used_blocks"]).toBe(0)
    // idempotent
    const again = await client.ok({ type: "release", seq_ids: [live.id] })
    expect(again["released"]).toEqual([])
    expect(again["unknown"]).toEqual([live.id])
  })
})

// ---------------------------------------------------------------------------------------
// Llama: llama3 rope scaling, untied lm_head, BF16 weights

const LLAMA_CONFIG = {
  architectures: ["LlamaForCausalLM"],
  model_type: "llama",
  vocab_size: 1000,
  hidden_size: 64,
  intermediate_size: 160,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  rms_norm_eps: 1e-5,
  rope_theta: 500000,
  rope_scaling: {
    rope_type: "llama3",
    factor: 8,
    low_freq_factor: 1,
    high_freq_factor: 4,
    original_max_position_embeddings: 64
  },
  max_position_embeddings: 2048,
  tie_word_embeddings: false,
  torch_dtype: "bfloat16",
  bos_token_id: 1,
  eos_token_id: 2,
  attention_bias: false,
  mlp_bias: false,
  hidden_act: "silu"
}

const hashName = (name: string): number => {
  let h = 0x811c9dc5
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193)
  return h
}

const writeLlamaBf16 = (dir: string, seed: number): void => {
  const c = LLAMA_CONFIG
  const headDim = c.hidden_size / c.num_attention_heads
  const q = c.num_attention_heads * headDim
  const kv = c.num_key_value_heads * headDim
  const g = (name: string, shape: Array<number>, std: number, mean = 0): TensorToWrite => ({
    name,
    dtype: "BF16",
    shape,
    data: () => new Xoshiro128(seed ^ hashName(name)).fillNormal(new Float32Array(shape.reduce((a, b) => a * b, 1)), std, mean)
  })
  const tensors: Array<TensorToWrite> = [g("model.embed_tokens.weight", [c.vocab_size, c.hidden_size], 1)]
  for (let i = 0; i < c.num_hidden_layers; i++) {
    const p = `model.layers.${i}`
    tensors.push(
      g(`${p}.input_layernorm.weight`, [c.hidden_size], 0.05, 1),
      g(`${p}.self_attn.q_proj.weight`, [q, c.hidden_size], 1 / Math.sqrt(c.hidden_size)),
      g(`${p}.self_attn.k_proj.weight`, [kv, c.hidden_size], 1 / Math.sqrt(c.hidden_size)),
      g(`${p}.self_attn.v_proj.weight`, [kv, c.hidden_size], 1 / Math.sqrt(c.hidden_size)),
      g(`${p}.self_attn.o_proj.weight`, [c.hidden_size, q], 4 / Math.sqrt(q)),
      g(`${p}.post_attention_layernorm.weight`, [c.hidden_size], 0.05, 1),
      g(`${p}.mlp.gate_proj.weight`, [c.intermediate_size, c.hidden_size], 1 / Math.sqrt(c.hidden_size)),
      g(`${p}.mlp.up_proj.weight`, [c.intermediate_size, c.hidden_size], 1 / Math.sqrt(c.hidden_size)),
      g(`${p}.mlp.down_proj.weight`, [c.hidden_size, c.intermediate_size], 4 / Math.sqrt(c.intermediate_size))
    )
  }
  tensors.push(g("model.norm.weight", [c.hidden_size], 0.05, 1), g("lm_head.weight", [c.vocab_size, c.hidden_size], 0.4))
  fs.mkdirSync(dir, { recursive: true })
  fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(c, null, 2))
  writeSafetensors(path.join(dir, "model.safetensors"), tensors, { format: "pt" })
}

describe("engine parity (Llama, llama3 rope scaling, untied lm_head, BF16)", () => {
  const dir = path.join(tmpRoot, "llama-bf16")
  let engine: EngineProcess
  let client: RawEngineClient

  beforeAll(async () => {
    writeLlamaBf16(dir, 99)
    engine = await spawnEngine({ model: dir, device: "cpu" })
    client = new RawEngineClient(engine.endpoint, 30_000)
  })

  afterAll(async () => {
    client?.close()
    await engine?.kill()
  })

  it("matches the float64 reference on the same bf16 values", async () => {
    const ref = ReferenceModel.load(dir)
    expect(ref.config.tied).toBe(false)
    // the engine and the reference read the same bf16 file (the reference widens bf16 exactly)
    const header = parseHeader(fs.readFileSync(path.join(dir, "model.safetensors")))
    expect([...header.infos.values()].every((t) => t.dtype === "BF16")).toBe(true)

    const info = await client.ok({ type: "info" })
    const m = info["model"] as Reply
    expect(m["dtype"]).toBe("bf16")
    expect(m["vocab_size"]).toBe(1000)
    expect(m["head_dim"]).toBe(16)
    const bs = info["block_size"] as number

    // a prompt that runs past original_max_position_embeddings (64), so every rope band matters
    const prompt = promptTokens(80, 400, 1000, 3)
    const table = Array.from({ length: Math.ceil((prompt.length + 12) / bs) }, (_, i) => i)
    const session = ref.session()
    let r = session.forward(prompt)
    // the comparison is sensitive to the rope scaling: without it the logits differ by far more than 1e-3
    const unscaledDir = path.join(tmpRoot, "llama-bf16-unscaled")
    fs.mkdirSync(unscaledDir, { recursive: true })
    fs.writeFileSync(path.join(unscaledDir, "config.json"), JSON.stringify({ ...LLAMA_CONFIG, rope_scaling: null }))
    fs.linkSync(path.join(dir, "model.safetensors"), path.join(unscaledDir, "model.safetensors"))
    const unscaledRel = maxRelativeError(ReferenceModel.load(unscaledDir).logits(prompt), r)
    expect(unscaledRel).toBeGreaterThan(1e-2)
    let out = outputsOf(
      await client.request({
        type: "step",
        seqs: [{ seq_id: 1, tokens: prompt, start_pos: 0, block_table: table, sampling: GREEDY, return_logits: true }]
      })
    )[0]!
    let worst = 0
    let pos = prompt.length
    for (let i = 0; i < 12; i++) {
      const e = decodeLogits(out["logits"] as Uint8Array)
      const rel = maxRelativeError(e, r)
      worst = Math.max(worst, rel)
      expect(rel, `step ${i}`).toBeLessThanOrEqual(1e-3)
      expect(out["token"], `step ${i}: greedy token`).toBe(argmax(r))
      const tok = out["token"] as number
      r = session.forward([tok])
      out = outputsOf(
        await client.request({ type: "step", seqs: [{ seq_id: 1, tokens: [tok], start_pos: pos, return_logits: true }] })
      )[0]!
      pos++
    }
    report.push(
      `llama bf16 (80-token prefill + 12 decode, llama3 rope scaling, untied): max rel error ${worst.toExponential(3)} ` +
        `(the same model without rope scaling differs by ${unscaledRel.toExponential(2)})`
    )
    await client.ok({ type: "release", seq_ids: [1] })
  })

  it("prefix caching: a new sequence that shares a released one's full blocks (start_pos past them) gives the same logits and greedy tokens as computing them", async () => {
    const info = await client.ok({ type: "info" })
    const bs = info["block_size"] as number
    const first = promptTokens(5 * bs + 7, 500, 1000, 11)
    // Sequence 10 computes its prompt into blocks 0..5, then is released: its blocks' KV stays.
    await client.request({ type: "step", seqs: [{ seq_id: 10, tokens: first, start_pos: 0, block_table: [0, 1, 2, 3, 4, 5], sampling: GREEDY }] })
    await client.ok({ type: "release", seq_ids: [10] })
    // The next prompt starts with its first 5 full blocks, then goes another way.
    const next = [...first.slice(0, 5 * bs), ...promptTokens(40, 700, 1000, 12)]
    const cached = 5 * bs
    const greedy = async (seqId: number, table: Array<number>, startPos: number) => {
      let out = outputsOf(await client.request({
        type: "step",
        seqs: [{ seq_id: seqId, tokens: next.slice(startPos), start_pos: startPos, block_table: table, sampling: GREEDY, return_logits: true }]
      }))[0]!
      const logits = [decodeLogits(out["logits"] as Uint8Array)]
      const tokens = [out["token"] as number]
      for (let pos = next.length; tokens.length < 8; pos++) {
        out = outputsOf(await client.request({ type: "step", seqs: [{ seq_id: seqId, tokens: [tokens.at(-1)!], start_pos: pos, return_logits: true }] }))[0]!
        logits.push(decodeLogits(out["logits"] as Uint8Array))
        tokens.push(out["token"] as number)
      }
      await client.ok({ type: "release", seq_ids: [seqId] })
      return { logits, tokens }
    }
    // Shared blocks 0..4 (read, never written) plus new blocks, against fresh blocks throughout.
    const hit = await greedy(11, [0, 1, 2, 3, 4, 20, 21, 22], cached)
    const fresh = await greedy(12, [30, 31, 32, 33, 34, 35, 36, 37], 0)
    expect(hit.tokens).toEqual(fresh.tokens)
    hit.logits.forEach((l, i) => expect(maxRelativeError(l, fresh.logits[i]!), `step ${i}`).toBeLessThanOrEqual(1e-4))
    // Reading block 4 as if it held other tokens' KV changes the output: the test can tell.
    const wrong = await greedy(13, [0, 1, 2, 3, 5, 20, 21, 22], cached)
    expect(wrong.logits.some((l, i) => maxRelativeError(l, fresh.logits[i]!) > 1e-3)).toBe(true)
  })
})
