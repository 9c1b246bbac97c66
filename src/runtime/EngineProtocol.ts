/**
 * Schemas of the engine's msgpack wire protocol, version 1 (engine/PROTOCOL.md). Replies are
 * decoded with these before anything trusts them.
 */
import { Schema } from "effect"

export const PROTOCOL_VERSION = 1

const UInt = Schema.Int.pipe(Schema.nonNegative())

export const ErrorReply = Schema.Struct({
  ok: Schema.Literal(false),
  req_id: UInt,
  error: Schema.Struct({ code: Schema.String, message: Schema.String })
})

export const ModelInfo = Schema.Struct({
  architecture: Schema.String,
  model_type: Schema.String,
  vocab_size: UInt,
  hidden_size: UInt,
  num_layers: UInt,
  num_heads: UInt,
  num_kv_heads: UInt,
  head_dim: UInt,
  max_position_embeddings: UInt,
  eos_token_ids: Schema.Array(UInt),
  dtype: Schema.String
})

export const InfoReply = Schema.Struct({
  ok: Schema.Literal(true),
  req_id: UInt,
  model: ModelInfo,
  device: Schema.String,
  protocol_version: Schema.Literal(PROTOCOL_VERSION),
  block_size: UInt,
  num_blocks: UInt,
  kv_cache_bytes: UInt,
  num_active_seqs: UInt,
  num_used_blocks: UInt
})
export type InfoReply = typeof InfoReply.Type

export const HealthReply = Schema.Struct({
  ok: Schema.Literal(true),
  req_id: UInt,
  status: Schema.String,
  uptime_ms: Schema.Number,
  num_steps: UInt
})
export type HealthReply = typeof HealthReply.Type

export const StepOutput = Schema.Struct({
  seq_id: UInt,
  token: Schema.optional(UInt),
  logprob: Schema.optional(Schema.Number),
  logits: Schema.optional(Schema.Uint8ArrayFromSelf)
})

export const StepTimings = Schema.Struct({
  forward_ms: Schema.Number,
  sample_ms: Schema.Number,
  total_ms: Schema.Number
})

/** Token-only outputs of a `packed_outputs` step: parallel u32 little-endian arrays. */
export const PackedOutputs = Schema.Struct({
  seq_ids: Schema.Uint8ArrayFromSelf,
  tokens: Schema.Uint8ArrayFromSelf
}).pipe(
  Schema.filter((p) =>
    p.seq_ids.byteLength === p.tokens.byteLength && p.seq_ids.byteLength % 4 === 0
      ? undefined
      : "seq_ids and tokens must be u32 arrays of the same length"
  )
)

export const StepReply = Schema.Struct({
  ok: Schema.Literal(true),
  req_id: UInt,
  outputs: Schema.Array(StepOutput),
  packed: Schema.optional(PackedOutputs),
  timings: StepTimings,
  num_tokens: UInt
})
export type StepReply = typeof StepReply.Type

export const ReleaseReply = Schema.Struct({
  ok: Schema.Literal(true),
  req_id: UInt,
  released: Schema.Array(UInt),
  unknown: Schema.Array(UInt)
})
export type ReleaseReply = typeof ReleaseReply.Type

/** An `embed` reply: the last token's final hidden state, L2-normalised ([hidden_size]). */
export const EmbedReply = Schema.Struct({
  ok: Schema.Literal(true),
  req_id: UInt,
  embedding: Schema.Array(Schema.Number),
  forward_ms: Schema.Number
})
export type EmbedReply = typeof EmbedReply.Type

/** Body of a `step` request (PROTOCOL.md); built by the scheduler from its StepPlan. */
export interface StepRequest {
  readonly release?: ReadonlyArray<number>
  /** Ask for `packed` token outputs (PROTOCOL.md). */
  readonly packed_outputs?: boolean
  readonly seqs: ReadonlyArray<{
    readonly seq_id: number
    readonly tokens: ReadonlyArray<number>
    readonly start_pos: number
    readonly block_table?: ReadonlyArray<number>
    readonly new_blocks?: ReadonlyArray<number>
    readonly sampling?: { readonly temperature: number; readonly top_p: number; readonly top_k: number; readonly seed: number }
    readonly sample?: boolean
    readonly logprobs?: boolean
    readonly return_logits?: boolean
  }>
}

/** Calls `f(seq_id, token)` for every output of a step reply that carries a token. */
export const forEachSampledToken = (reply: StepReply, f: (seqId: number, tokenId: number) => void): void => {
  for (const out of reply.outputs) if (out.token !== undefined) f(out.seq_id, out.token)
  const packed = reply.packed
  if (packed === undefined) return
  const ids = new DataView(packed.seq_ids.buffer, packed.seq_ids.byteOffset, packed.seq_ids.byteLength)
  const tokens = new DataView(packed.tokens.buffer, packed.tokens.byteOffset, packed.tokens.byteLength)
  for (let off = 0; off < packed.seq_ids.byteLength; off += 4) f(ids.getUint32(off, true), tokens.getUint32(off, true))
}

/** Little-endian float32 bytes (the `logits` bin) → Float32Array, copying to fix alignment. */
export const logitsFromBytes = (bytes: Uint8Array): Float32Array => {
  const copy = new Uint8Array(bytes.byteLength)
  copy.set(bytes)
  return new Float32Array(copy.buffer)
}
