import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { afterAll, describe, expect, it } from "vitest"
import {
  bf16BitsToF32,
  f16BitsToF32,
  f32ToBf16Bits,
  f32ToF16Bits,
  parseHeader,
  quantize,
  readSafetensors,
  writeSafetensors,
  type SafetensorsDtype
} from "../../src/runtime/internal/safetensors.js"

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "safetensors-test-"))
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }))

/** Every finite F16 value (all 63 488 non-NaN, non-Inf bit patterns). */
const allFiniteF16 = (): Float32Array => {
  const out: Array<number> = []
  for (let h = 0; h < 0x10000; h++) if ((h & 0x7c00) !== 0x7c00) out.push(f16BitsToF32(h))
  return Float32Array.from(out)
}

/** A sample of BF16 values: every pattern with a finite exponent, stepping through mantissas. */
const sampleBf16 = (): Float32Array => {
  const out: Array<number> = []
  for (let h = 0; h < 0x10000; h += 7) if ((h & 0x7f80) !== 0x7f80) out.push(bf16BitsToF32(h))
  return Float32Array.from(out)
}

const bitsEqual = (a: Float32Array, b: Float32Array): boolean => {
  if (a.length !== b.length) return false
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length)
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length)
  for (let i = 0; i < ua.length; i++) if (ua[i] !== ub[i]) return false
  return true
}

describe("safetensors", () => {
  it("round-trips F32, F16 and BF16 tensors exactly (representable values) with header and metadata", () => {
    const f32 = new Float32Array(3 * 5).map((_, i) => Math.fround(Math.sin(i) * 1e3 + i / 7))
    f32[0] = -0
    f32[1] = 3.4028234663852886e38
    f32[2] = 1.401298464324817e-45 // smallest subnormal
    const f16 = allFiniteF16()
    const bf16 = sampleBf16()
    const file = path.join(tmp, "rt.safetensors")
    writeSafetensors(
      file,
      [
        { name: "a.f32", dtype: "F32", shape: [3, 5], data: f32 },
        { name: "b.f16", dtype: "F16", shape: [f16.length], data: () => f16 },
        { name: "c.bf16", dtype: "BF16", shape: [1, bf16.length], data: bf16 },
        { name: "d.scalar", dtype: "F32", shape: [], data: Float32Array.of(42) }
      ],
      { format: "pt" }
    )
    const buf = fs.readFileSync(file)
    const headerLen = Number(buf.readBigUInt64LE(0))
    expect((8 + headerLen) % 8).toBe(0)
    const { infos } = parseHeader(buf)
    expect(infos.get("a.f32")).toEqual({ dtype: "F32", shape: [3, 5], data_offsets: [0, 60] })
    expect(infos.get("b.f16")!.data_offsets).toEqual([60, 60 + 2 * f16.length])
    expect(buf.byteLength).toBe(8 + headerLen + 60 + 2 * f16.length + 2 * bf16.length + 4)

    const loaded = readSafetensors(file)
    expect(loaded.metadata).toEqual({ format: "pt" })
    expect([...loaded.tensors.keys()].sort()).toEqual(["a.f32", "b.f16", "c.bf16", "d.scalar"])
    const a = loaded.tensors.get("a.f32")!
    expect(a.dtype).toBe("F32")
    expect(a.shape).toEqual([3, 5])
    expect(bitsEqual(a.data, f32)).toBe(true)
    expect(bitsEqual(loaded.tensors.get("b.f16")!.data, f16)).toBe(true)
    expect(bitsEqual(loaded.tensors.get("c.bf16")!.data, bf16)).toBe(true)
    expect(loaded.tensors.get("c.bf16")!.shape).toEqual([1, bf16.length])
    expect(Array.from(loaded.tensors.get("d.scalar")!.data)).toEqual([42])
  })

  it("rounds to nearest even when narrowing", () => {
    // F16: 1 + 2^-11 is halfway between 1 and 1 + 2^-10 → even (1); 1 + 3·2^-11 → 1 + 2^-9
    expect(f16BitsToF32(f32ToF16Bits(1 + 2 ** -11))).toBe(1)
    expect(f16BitsToF32(f32ToF16Bits(1 + 3 * 2 ** -11))).toBe(1 + 2 ** -9)
    expect(f16BitsToF32(f32ToF16Bits(65520))).toBe(Infinity) // rounds past max half 65504
    expect(f16BitsToF32(f32ToF16Bits(65519))).toBe(65504)
    expect(f16BitsToF32(f32ToF16Bits(2 ** -25))).toBe(0) // halfway to the smallest subnormal → even (0)
    expect(f16BitsToF32(f32ToF16Bits(1.5 * 2 ** -25))).toBe(2 ** -24)
    expect(Number.isNaN(f16BitsToF32(f32ToF16Bits(NaN)))).toBe(true)
    // BF16: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 → 1; 1 + 3·2^-8 → 1 + 2^-6
    expect(bf16BitsToF32(f32ToBf16Bits(1 + 2 ** -8))).toBe(1)
    expect(bf16BitsToF32(f32ToBf16Bits(1 + 3 * 2 ** -8))).toBe(1 + 2 ** -6)
    expect(Number.isNaN(bf16BitsToF32(f32ToBf16Bits(NaN)))).toBe(true)
  })

  it("quantize() gives what a reader sees, and is idempotent", () => {
    const xs = new Float32Array(1000).map((_, i) => Math.fround(Math.cos(i * 0.37) * (i + 1)))
    for (const dtype of ["F32", "F16", "BF16"] as Array<SafetensorsDtype>) {
      const q = quantize(xs, dtype)
      const file = path.join(tmp, `q-${dtype}.safetensors`)
      writeSafetensors(file, [{ name: "x", dtype, shape: [xs.length], data: xs }])
      expect(bitsEqual(readSafetensors(file).tensors.get("x")!.data, q)).toBe(true)
      expect(bitsEqual(quantize(q, dtype), q)).toBe(true)
    }
  })

  it("rejects a tensor whose data does not match its shape", () => {
    expect(() =>
      writeSafetensors(path.join(tmp, "bad.safetensors"), [{ name: "x", dtype: "F32", shape: [2, 2], data: new Float32Array(3) }])
    ).toThrow(/shape/)
  })
})
