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

export const StepReply = Schema.Struct({
  ok: Schema.Literal(true),
  req_id: UInt,
  outputs: Schema.Array(StepOutput),
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

/** Body of a `step` request (PROTOCOL.md); built by the scheduler from its StepPlan. */
export interface StepRequest {
  readonly release?: ReadonlyArray<number>
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

/** Little-endian float32 bytes (the `logits` bin) → Float32Array, copying to fix alignment. */
export const logitsFromBytes = (bytes: Uint8Array): Float32Array => {
  const copy = new Uint8Array(bytes.byteLength)
  copy.set(bytes)
  return new Float32Array(copy.buffer)
}
