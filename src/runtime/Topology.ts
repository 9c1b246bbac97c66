/**
 * The cluster topology of cluster.config.ts, as a Schema (decoded at start-up) and a service.
 */
import { Context, Effect, Layer, Schema } from "effect"

const PositiveInt = Schema.Int.pipe(Schema.positive())

export const GpuId = Schema.String.pipe(Schema.pattern(/^[a-z0-9-]{1,32}$/), Schema.brand("GpuId"))
export type GpuId = typeof GpuId.Type

const Port = Schema.Int.pipe(Schema.between(1, 65535))

export const Runner = Schema.Struct({
  name: Schema.String.pipe(Schema.pattern(/^[a-z0-9-]{1,32}$/)),
  roles: Schema.Array(Schema.Literal("gateway", "gpu")),
  region: Schema.String,
  /** GPUs this runner hosts: their GpuScheduler/DecodeSlot entities live only here. */
  gpus: Schema.Array(GpuId),
  /** Where the other runners reach this one (default 127.0.0.1). */
  host: Schema.optional(Schema.String),
  /** The cluster's runner-to-runner RPC port (entity messages); required with several runners. */
  cluster_port: Schema.optional(Port),
  /** The token data plane's ZeroMQ port (token frames and stream control); required with several runners. */
  data_port: Schema.optional(Port),
  /** A gateway's HTTP port (PORT overrides it; default 8080). */
  http_port: Schema.optional(Port)
})
export type Runner = typeof Runner.Type

export const EngineSettings = Schema.Struct({
  kv_cache_bytes: PositiveInt,
  max_num_batched_tokens: PositiveInt,
  max_num_seqs: PositiveInt,
  /** DecodeSlot entities per GPU: the most concurrent streams it accepts. */
  num_slots: PositiveInt,
  /** Reuse the KV of full blocks across sequences and turns (default true; false for comparison). */
  enable_prefix_caching: Schema.optionalWith(Schema.Boolean, { default: () => true }),
  /**
   * Device `sim` only: multiplies the modelled step time (2 = a GPU half as fast; the web
   * client's browser tests slow their replies to a readable pace with it).
   */
  sim_time_scale: Schema.optional(Schema.Number.pipe(Schema.greaterThan(0), Schema.lessThanOrEqualTo(1000)))
})
export type EngineSettings = typeof EngineSettings.Type

export const Pool = Schema.Struct({
  /** "default" (the generated tiny model) or a Hugging Face checkpoint directory. */
  model: Schema.String,
  gpus: Schema.NonEmptyArray(Schema.Struct({ id: GpuId, device: Schema.String.pipe(Schema.pattern(/^(cpu|sim|cuda:\d+)$/)) })),
  engine: EngineSettings,
  /**
   * How a conversation's turns pick a GPU: "affinity" (default) asks the GPU of its last turn
   * first (its KV is cached there), "random" any (the comparison baseline).
   */
  routing: Schema.optionalWith(Schema.Literal("affinity", "random"), { default: () => "affinity" as const })
})
export type Pool = typeof Pool.Type

export const Tier = Schema.Struct({
  pool: Schema.String,
  /** Lower is served first by the GPU schedulers. */
  priority: Schema.Int.pipe(Schema.nonNegative()),
  rpm: PositiveInt,
  tpm: PositiveInt,
  ttft_p99_ms: PositiveInt,
  /**
   * The pools this tier's users may name (`model`); absent: every pool. `[pool]` pins the
   * tier to its pool (an enterprise tier on its own model). A pool outside is 404 model_not_found.
   */
  models: Schema.optional(Schema.Array(Schema.String)),
  /** Days a conversation is kept after its last turn (then deleted with everything of it); absent: indefinitely. */
  retention_days: Schema.optional(PositiveInt)
})

/** An organisation's data rules (its users' JWT `org` claim or API key's org). */
export const OrgPolicy = Schema.Struct({
  /** Its turns may be used for training: stamped on each turn as it is stored (default false). */
  training_eligible: Schema.optionalWith(Schema.Boolean, { default: () => false }),
  /** Overrides its users' tiers' retention (an enterprise contract's). */
  retention_days: Schema.optional(PositiveInt),
  /**
   * Zero retention: its turns are served but their text is never stored at rest (the store
   * keeps each turn's seq, role, status and token counts, with empty content); the text lives
   * only in the serving runner's memory, so a conversation that runner forgets goes on
   * without its earlier context. No summaries, no shared cache entry, no remembered facts.
   */
  zero_retention: Schema.optionalWith(Schema.Boolean, { default: () => false })
})
export type OrgPolicy = typeof OrgPolicy.Type

export const Generation = Schema.Struct({
  max_tokens: PositiveInt,
  temperature: Schema.Number.pipe(Schema.between(0, 2)),
  top_p: Schema.Number.pipe(Schema.greaterThan(0), Schema.lessThanOrEqualTo(1)),
  top_k: Schema.Int.pipe(Schema.nonNegative()),
  /** Tokens a client may lag behind before its sequence is paused (backpressure). */
  client_buffer_tokens: PositiveInt
})

/**
 * What a prompt holds of a long conversation: the system prompt, the user's remembered facts,
 * the running summary, and the most recent turns that fit `prompt_budget_tokens`. Turns the
 * window slides past are folded into the summary after the turn ends (src/actors/Summaries.ts).
 */
export const ContextSettings = Schema.Struct({
  /** Tokens of a prompt with history (the system prompt and the new message alone may pass it, up to the model's context). */
  prompt_budget_tokens: PositiveInt,
  /** The pool whose model writes summaries (a small one); default: the conversation's own. */
  summary_pool: Schema.optional(Schema.String),
  /** Tokens a summary may take. */
  summary_max_tokens: Schema.optionalWith(PositiveInt, { default: () => 256 })
})
export type ContextSettings = typeof ContextSettings.Type

/** Facts mined from conversations into their users' memory (src/actors/FactExtraction.ts). */
export const MemorySettings = Schema.Struct({
  /** A conversation is mined once it has had no turn for this long (seconds). */
  extract_after_idle_s: PositiveInt,
  /** The pool whose model mines it; default: the conversation's own. */
  extraction_pool: Schema.optional(Schema.String)
})

export const TopologySchema = Schema.Struct({
  runners: Schema.NonEmptyArray(Runner),
  pools: Schema.Record({ key: Schema.String, value: Pool }),
  tiers: Schema.Record({ key: Schema.String, value: Tier }),
  default_tier: Schema.String,
  generation: Generation,
  /** Absent: no summaries; a prompt holds the most recent turns that fit the model's context. */
  context: Schema.optional(ContextSettings),
  /** Absent: no facts are mined (explicit "remember that …" requests still are kept). */
  memory: Schema.optional(MemorySettings),
  /** Per-organisation data rules; an org not listed has the defaults. */
  orgs: Schema.optional(Schema.Record({ key: Schema.String, value: OrgPolicy }))
}).pipe(
  Schema.filter((t) => {
    const issues: Array<string> = []
    if (t.tiers[t.default_tier] === undefined) issues.push(`default_tier "${t.default_tier}" is not a tier`)
    for (const [name, tier] of Object.entries(t.tiers)) {
      if (t.pools[tier.pool] === undefined) issues.push(`tier "${name}" routes to unknown pool "${tier.pool}"`)
      for (const m of tier.models ?? []) if (t.pools[m] === undefined) issues.push(`tier "${name}" allows unknown pool "${m}"`)
      if (tier.models !== undefined && !tier.models.includes(tier.pool)) issues.push(`tier "${name}" does not allow its own pool "${tier.pool}"`)
    }
    const names = new Set<string>()
    for (const r of t.runners) {
      if (names.has(r.name)) issues.push(`runner "${r.name}" is listed twice`)
      names.add(r.name)
      if (t.runners.length > 1 && (r.cluster_port === undefined || r.data_port === undefined)) {
        issues.push(`runner "${r.name}" needs cluster_port and data_port (the topology has several runners)`)
      }
    }
    if (!t.runners.some((r) => r.roles.includes("gateway"))) issues.push("no runner has the gateway role")
    const summaryPool = t.context?.summary_pool
    if (summaryPool !== undefined && t.pools[summaryPool] === undefined) issues.push(`context.summary_pool "${summaryPool}" is not a pool`)
    const extractionPool = t.memory?.extraction_pool
    if (extractionPool !== undefined && t.pools[extractionPool] === undefined) issues.push(`memory.extraction_pool "${extractionPool}" is not a pool`)
    const hosted = new Set(t.runners.flatMap((r) => r.gpus))
    for (const [name, pool] of Object.entries(t.pools)) {
      for (const gpu of pool.gpus) if (!hosted.has(gpu.id)) issues.push(`pool "${name}" GPU "${gpu.id}" is hosted by no runner`)
    }
    return issues.length === 0 ? true : issues.join("; ")
  })
)
export type Topology = typeof TopologySchema.Type
export type TopologyInput = typeof TopologySchema.Encoded

/** Days a new conversation of a user of `tier` and `org` is kept after its last turn; null: indefinitely. */
export const retentionDaysFor = (topology: Topology, tier: string, org: string | null): number | null => {
  const policy = org === null ? undefined : lookup(topology.orgs ?? {}, org)
  return policy?.retention_days ?? lookup(topology.tiers, tier)?.retention_days ?? null
}

/** Whether `org` has zero retention (OrgPolicy). */
export const zeroRetention = (topology: Topology, org: string | null): boolean =>
  org !== null && (lookup(topology.orgs ?? {}, org)?.zero_retention ?? false)

/** Whether the turns of `org`'s users may be used for training. */
export const trainingEligible = (topology: Topology, org: string | null): boolean =>
  org !== null && (lookup(topology.orgs ?? {}, org)?.training_eligible ?? false)

/** The runner named `name`, if the topology has it. */
export const runnerNamed = (topology: Topology, name: string): Runner | undefined => topology.runners.find((r) => r.name === name)

export class TopologyService extends Context.Tag("chat/Topology")<TopologyService, Topology>() {}

/** Decodes `input` (cluster.config.ts's default export); a bad config fails start-up with the Schema's message. */
export const layer = (input: unknown) =>
  Layer.effect(TopologyService, Schema.decodeUnknown(TopologySchema)(input, { errors: "all" }).pipe(Effect.orDie))

/**
 * `record[key]` if `key` is the record's own key: user input such as a model name must never
 * reach `Object.prototype` (`constructor`, `__proto__`, `toString`).
 */
export const lookup = <A>(record: Readonly<Record<string, A>>, key: string): A | undefined =>
  Object.hasOwn(record, key) ? record[key] : undefined

/**
 * The pool a model name resolves to, or without one the tier's (default: the default tier's);
 * undefined when there is no such pool or the tier may not use it (`models`).
 */
export const poolFor = (topology: Topology, model: string | undefined, tier?: string): { name: string; pool: Pool } | undefined => {
  const tierValue = lookup(topology.tiers, tier ?? topology.default_tier) ?? lookup(topology.tiers, topology.default_tier)!
  const name = model ?? tierValue.pool
  if (tierValue.models !== undefined && !tierValue.models.includes(name)) return undefined
  const pool = lookup(topology.pools, name)
  return pool === undefined ? undefined : { name, pool }
}
