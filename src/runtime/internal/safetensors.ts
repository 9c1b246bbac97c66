/**
 * Minimal safetensors writer and reader (https://github.com/huggingface/safetensors).
 *
 * File layout: an 8-byte little-endian unsigned length N, then N bytes of UTF-8 JSON
 * header `{ name: { dtype, shape, data_offsets: [begin, end] }, "__metadata__": {..} }`
 * (padded with spaces so the data starts 8-byte aligned), then the raw little-endian
 * tensor bytes; `data_offsets` are relative to the start of the data section.
 *
 * Supported dtypes: F32, F16 (IEEE binary16) and BF16 (upper half of a binary32). Values
 * are handed in and out as `Float32Array`; encoding to F16/BF16 rounds to nearest, ties to
 * even, so any value representable in the target format round-trips exactly.
 */
import * as fs from "node:fs"

export type SafetensorsDtype = "F32" | "F16" | "BF16"

export const bytesPerElement = (dtype: SafetensorsDtype): number => (dtype === "F32" ? 4 : 2)

export interface TensorToWrite {
  readonly name: string
  readonly dtype: SafetensorsDtype
  readonly shape: ReadonlyArray<number>
  /** The values (row-major), or a thunk producing them when the tensor is written (keeps memory low). */
  readonly data: Float32Array | (() => Float32Array)
}

export interface TensorInfo {
  readonly dtype: SafetensorsDtype
  readonly shape: ReadonlyArray<number>
  readonly data_offsets: readonly [number, number]
}

export interface LoadedTensor {
  readonly name: string
  readonly dtype: SafetensorsDtype
  readonly shape: ReadonlyArray<number>
  /** Decoded values (exact widening of the stored F16/BF16 values). */
  readonly data: Float32Array
}

export interface LoadedSafetensors {
  readonly metadata: Readonly<Record<string, string>>
  readonly tensors: ReadonlyMap<string, LoadedTensor>
}

// ---------------------------------------------------------------------------------------
// Scalar conversions

const f32 = new Float32Array(1)
const u32 = new Uint32Array(f32.buffer)

/** float32 bits → bfloat16 bits, round to nearest even (NaN stays a quiet NaN). */
export const f32ToBf16Bits = (x: number): number => {
  f32[0] = x
  const bits = u32[0]!
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x007fffff) !== 0) return ((bits >>> 16) | 0x0040) & 0xffff
  const rounded = bits + 0x7fff + ((bits >>> 16) & 1)
  return (rounded >>> 16) & 0xffff
}

export const bf16BitsToF32 = (h: number): number => {
  u32[0] = (h & 0xffff) << 16
  return f32[0]!
}

/** float32 value → IEEE binary16 bits, round to nearest even, with subnormals, ±Inf and NaN. */
export const f32ToF16Bits = (x: number): number => {
  f32[0] = x
  const bits = u32[0]!
  const sign = (bits >>> 16) & 0x8000
  const exp = (bits >>> 23) & 0xff
  let mant = bits & 0x007fffff
  if (exp === 0xff) return sign | 0x7c00 | (mant !== 0 ? 0x0200 : 0)
  // unbiased exponent
  const e = exp - 127
  if (e > 15) return sign | 0x7c00 // overflow → Inf
  if (e >= -14) {
    // normal half: 10 mantissa bits, round the 13 dropped bits to nearest even
    let half = ((e + 15) << 10) | (mant >>> 13)
    const rest = mant & 0x1fff
    if (rest > 0x1000 || (rest === 0x1000 && (half & 1) === 1)) half += 1 // may carry into exponent (→ Inf ok)
    return sign | half
  }
  if (e < -25) return sign // underflow → ±0
  // subnormal half: value = mant' * 2^-24, with implicit leading 1
  mant |= 0x00800000
  const shift = -e - 14 + 13 // 14..24
  let half = mant >>> shift
  const rest = mant & ((1 << shift) - 1)
  const halfway = 1 << (shift - 1)
  if (rest > halfway || (rest === halfway && (half & 1) === 1)) half += 1
  return sign | half
}

export const f16BitsToF32 = (h: number): number => {
  const sign = h & 0x8000 ? -1 : 1
  const exp = (h >>> 10) & 0x1f
  const mant = h & 0x3ff
  if (exp === 0) return sign * mant * 2 ** -24
  if (exp === 0x1f) return mant === 0 ? sign * Infinity : NaN
  return sign * (1 + mant / 1024) * 2 ** (exp - 15)
}

// ---------------------------------------------------------------------------------------
// Array encoding / decoding

/** Encodes values into little-endian bytes of the given dtype. */
export const encodeTensor = (values: Float32Array, dtype: SafetensorsDtype): Uint8Array => {
  if (dtype === "F32") {
    const copy = new Float32Array(values) // platform is little-endian (Node on x86/arm64)
    return new Uint8Array(copy.buffer, copy.byteOffset, copy.byteLength)
  }
  const out = new Uint16Array(values.length)
  if (dtype === "BF16") {
    // fast path: same rounding as f32ToBf16Bits, on a Uint32 view
    const bitsView = new Uint32Array(new Float32Array(values).buffer)
    for (let i = 0; i < bitsView.length; i++) {
      const bits = bitsView[i]!
      if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x007fffff) !== 0) {
        out[i] = ((bits >>> 16) | 0x0040) & 0xffff
      } else {
        out[i] = ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff
      }
    }
  } else {
    for (let i = 0; i < values.length; i++) out[i] = f32ToF16Bits(values[i]!)
  }
  return new Uint8Array(out.buffer, out.byteOffset, out.byteLength)
}

/** Decodes little-endian bytes of the given dtype into float32 values. */
export const decodeTensor = (bytes: Uint8Array, dtype: SafetensorsDtype): Float32Array => {
  const n = bytes.byteLength / bytesPerElement(dtype)
  if (!Number.isInteger(n)) throw new Error(`safetensors: ${bytes.byteLength} bytes is not a whole number of ${dtype}`)
  // copy into an aligned buffer
  const aligned = new Uint8Array(bytes.byteLength)
  aligned.set(bytes)
  if (dtype === "F32") return new Float32Array(aligned.buffer)
  const halves = new Uint16Array(aligned.buffer)
  if (dtype === "BF16") {
    const out = new Uint32Array(n)
    for (let i = 0; i < n; i++) out[i] = halves[i]! << 16
    return new Float32Array(out.buffer)
  }
  const out = new Float32Array(n)
  for (let i = 0; i < n; i++) out[i] = f16BitsToF32(halves[i]!)
  return out
}

// ---------------------------------------------------------------------------------------
// Writer

const product = (shape: ReadonlyArray<number>): number => shape.reduce((a, b) => a * b, 1)

/** Rounds values to what the dtype can store (what a reader will see). */
export const quantize = (values: Float32Array, dtype: SafetensorsDtype): Float32Array =>
  dtype === "F32" ? new Float32Array(values) : decodeTensor(encodeTensor(values, dtype), dtype)

/** Builds the padded header bytes for the tensors (in the given order). */
const buildHeader = (
  tensors: ReadonlyArray<Pick<TensorToWrite, "name" | "dtype" | "shape">>,
  metadata: Readonly<Record<string, string>> | undefined
): { header: Buffer; dataBytes: number } => {
  const json: Record<string, unknown> = {}
  if (metadata !== undefined) json["__metadata__"] = metadata
  let offset = 0
  const seen = new Set<string>()
  for (const t of tensors) {
    if (t.name === "__metadata__" || seen.has(t.name)) throw new Error(`safetensors: bad or duplicate tensor name ${t.name}`)
    seen.add(t.name)
    const bytes = product(t.shape) * bytesPerElement(t.dtype)
    json[t.name] = { dtype: t.dtype, shape: [...t.shape], data_offsets: [offset, offset + bytes] }
    offset += bytes
  }
  let text = JSON.stringify(json)
  const len = Buffer.byteLength(text, "utf8")
  const padded = Math.ceil((8 + len) / 8) * 8 - 8
  text = text + " ".repeat(padded - len)
  const header = Buffer.alloc(8 + padded)
  header.writeBigUInt64LE(BigInt(padded), 0)
  header.write(text, 8, "utf8")
  return { header, dataBytes: offset }
}

/**
 * Writes a safetensors file, one tensor at a time (a thunk's values are produced only when
 * its turn comes and can be garbage-collected right after).
 */
export const writeSafetensors = (
  path: string,
  tensors: ReadonlyArray<TensorToWrite>,
  metadata?: Readonly<Record<string, string>>
): void => {
  const { header } = buildHeader(tensors, metadata)
  const fd = fs.openSync(path, "w")
  try {
    writeAll(fd, header)
    for (const t of tensors) {
      const values = typeof t.data === "function" ? t.data() : t.data
      const expected = product(t.shape)
      if (values.length !== expected) {
        throw new Error(`safetensors: tensor ${t.name} has ${values.length} values, shape [${t.shape.join(", ")}] needs ${expected}`)
      }
      writeAll(fd, encodeTensor(values, t.dtype))
    }
    fs.fsyncSync(fd)
  } finally {
    fs.closeSync(fd)
  }
}

const writeAll = (fd: number, bytes: Uint8Array): void => {
  let off = 0
  while (off < bytes.byteLength) off += fs.writeSync(fd, bytes, off, bytes.byteLength - off)
}

// ---------------------------------------------------------------------------------------
// Reader

/** Parses the header of a safetensors buffer. */
export const parseHeader = (
  buf: Uint8Array
): { headerBytes: number; metadata: Record<string, string>; infos: Map<string, TensorInfo> } => {
  if (buf.byteLength < 8) throw new Error("safetensors: file shorter than 8 bytes")
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength)
  const n = Number(view.getBigUint64(0, true))
  if (8 + n > buf.byteLength) throw new Error("safetensors: header length exceeds file size")
  const json = JSON.parse(Buffer.from(buf.buffer, buf.byteOffset + 8, n).toString("utf8")) as Record<string, unknown>
  const metadata = (json["__metadata__"] ?? {}) as Record<string, string>
  const infos = new Map<string, TensorInfo>()
  for (const [name, v] of Object.entries(json)) {
    if (name === "__metadata__") continue
    const info = v as TensorInfo
    if (info.dtype !== "F32" && info.dtype !== "F16" && info.dtype !== "BF16") {
      throw new Error(`safetensors: tensor ${name} has unsupported dtype ${String(info.dtype)}`)
    }
    const [b, e] = info.data_offsets
    if (e - b !== product(info.shape) * bytesPerElement(info.dtype) || 8 + n + e > buf.byteLength) {
      throw new Error(`safetensors: tensor ${name} has inconsistent data_offsets`)
    }
    infos.set(name, info)
  }
  return { headerBytes: 8 + n, metadata, infos }
}

/** Reads a whole safetensors file, decoding every tensor to float32. */
export const readSafetensors = (path: string): LoadedSafetensors => {
  const buf = fs.readFileSync(path)
  const { headerBytes, metadata, infos } = parseHeader(buf)
  const tensors = new Map<string, LoadedTensor>()
  for (const [name, info] of infos) {
    const [b, e] = info.data_offsets
    const bytes = buf.subarray(headerBytes + b, headerBytes + e)
    tensors.set(name, { name, dtype: info.dtype, shape: info.shape, data: decodeTensor(bytes, info.dtype) })
  }
  return { metadata, tensors }
}
