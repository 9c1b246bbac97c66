/**
 * Prometheus metrics (`GET /metrics`, prom-client's text format) with vLLM's names
 * (vllm/v1/metrics/loggers.py), labelled by model pool and tier:
 *
 * - per turn, seen at the gateway from its stream: `time_to_first_token_seconds`,
 *   `inter_token_latency_seconds` (between token events), `e2e_request_latency_seconds`,
 *   `prompt_tokens_total`, `generation_tokens_total`, `request_success_total` by
 *   `finished_reason` (`stop`, `length`, `cancelled`, `error`);
 * - per GPU of this process, read at scrape time: `num_requests_running`,
 *   `num_requests_waiting`, `kv_cache_usage_perc` (0–1, blocks in use), and prefix-cache
 *   `prefix_cache_queries_total` / `prefix_cache_hits_total` (tokens);
 * - per model pool: `tokenizer_long_pieces_on_event_loop_total` (long text that was encoded on
 *   the event loop, each a stall: the off-thread encoding missed it);
 * - at the edge: `rate_limit_rejections_total` by tier and limit (`requests`, `tokens`), and
 *   `moderation_verdicts_total` by stage (`input`; output verdicts are counted as
 *   `request_success_total{finished_reason="content_filter"}`) and verdict.
 */
import { ConversationCache } from "./ConversationCache.js"
import { Context, Effect, Layer } from "effect"
import * as Prometheus from "prom-client"
import { GpuWorkers } from "./GpuWorkers.js"
import { Models } from "./Models.js"
import { TopologyService } from "./Topology.js"
import type { TurnStream } from "./TurnStream.js"

export interface TurnLabels {
  readonly model: string
  readonly tier: string
}

export class Metrics extends Context.Tag("chat/Metrics")<Metrics, {
  /** Times a turn from `startMs` (`performance.now()` when its request came) through its stream's events. */
  readonly observeTurn: (labels: TurnLabels, stream: TurnStream, startMs: number) => void
  readonly rateLimitRejected: (tier: string, limit: "requests" | "tokens") => void
  /** A moderation verdict: `pass`, or the category that was flagged. */
  readonly moderationVerdict: (stage: "input" | "output", verdict: string) => void
  /** The exposition text and its content type. */
  readonly scrape: Effect.Effect<{ readonly text: string; readonly contentType: string }>
  /**
   * The series the operator dashboard charts (TTFT histogram, generated tokens, turns by finish
   * reason, per-GPU gauges), as prom-client's JSON, and the last {@link NUM_RECENT_ERRORS}
   * turns that ended in an error, newest first.
   */
  readonly snapshot: Effect.Effect<{ readonly metrics: ReadonlyArray<unknown>; readonly recentErrors: ReadonlyArray<RecentError> }>
}>() {}

/** A turn that ended with an `error` event, as the dashboard lists it. */
export interface RecentError {
  readonly at_ms: number
  readonly model: string
  readonly tier: string
  readonly code: string
  readonly message: string
}

export const NUM_RECENT_ERRORS = 20

/** The series in {@link Metrics} `snapshot`. */
const DASHBOARD_SERIES = new Set([
  "time_to_first_token_seconds",
  "generation_tokens_total",
  "request_success_total",
  "num_requests_running",
  "num_requests_waiting",
  "kv_cache_usage_perc"
])

const make = Effect.gen(function*() {
  const workers = yield* GpuWorkers
  const topology = yield* TopologyService
  const poolOfGpu = new Map<string, string>()
  for (const [name, pool] of Object.entries(topology.pools)) for (const gpu of pool.gpus) poolOfGpu.set(gpu.id, name)

  const registry = new Prometheus.Registry()
  const models = yield* Models
  // Long text the tokenizer encoded on the event loop (a stall each): encodeAhead's misses.
  new Prometheus.Counter({
    name: "tokenizer_long_pieces_on_event_loop_total",
    help: "Pieces of 1,024 characters or more the tokenizer encoded on the event loop (not on its worker thread), by model pool.",
    labelNames: ["model"] as const,
    registers: [registry],
    collect() {
      this.reset()
      for (const pool of Object.keys(topology.pools)) {
        const model = models.get(pool)
        if (model !== undefined) this.inc({ model: pool }, model.tokenizer.numLongPiecesEncodedOnLoop())
      }
    }
  })
  const cacheStats = (yield* ConversationCache).stats
  // Read at scrape time from the cache's own counts (the entities count as they load).
  new Prometheus.Counter({
    name: "conversation_loads_total",
    help: "Conversation entities started on this runner, by where their state came from: process (this runner's memory), checked (the same after one read of the store's last turn), shared (the Redis entry), store (PostgreSQL).",
    labelNames: ["source"] as const,
    registers: [registry],
    collect() {
      this.reset()
      for (const [source, n] of Object.entries(cacheStats.loads)) this.inc({ source }, n)
    }
  })
  const turnLabels = ["model", "tier"] as const
  const ttft = new Prometheus.Histogram({
    name: "time_to_first_token_seconds",
    help: "Time from a turn's acceptance to its first token event.",
    labelNames: turnLabels,
    buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40],
    registers: [registry]
  })
  const itl = new Prometheus.Histogram({
    name: "inter_token_latency_seconds",
    help: "Time between consecutive token events of a turn.",
    labelNames: turnLabels,
    buckets: [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5],
    registers: [registry]
  })
  const e2e = new Prometheus.Histogram({
    name: "e2e_request_latency_seconds",
    help: "Time from a turn's acceptance to its end.",
    labelNames: turnLabels,
    buckets: [0.1, 0.3, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120],
    registers: [registry]
  })
  const promptTokens = new Prometheus.Counter({ name: "prompt_tokens_total", help: "Prompt tokens of finished turns.", labelNames: turnLabels, registers: [registry] })
  const generationTokens = new Prometheus.Counter({ name: "generation_tokens_total", help: "Generated tokens of finished turns.", labelNames: turnLabels, registers: [registry] })
  const success = new Prometheus.Counter({
    name: "request_success_total",
    help: "Turns ended, by finish reason.",
    labelNames: [...turnLabels, "finished_reason"],
    registers: [registry]
  })
  const rejections = new Prometheus.Counter({
    name: "rate_limit_rejections_total",
    help: "Requests refused with 429 by a tier's limit.",
    labelNames: ["tier", "limit"],
    registers: [registry]
  })

  const verdicts = new Prometheus.Counter({
    name: "moderation_verdicts_total",
    help: "Moderation verdicts: pass, or the category flagged.",
    labelNames: ["stage", "verdict"],
    registers: [registry]
  })

  // GPU gauges are read when scraped: each GPU worker of this process reports its scheduler.
  const gpuLabels = ["model", "gpu"] as const
  const running = new Prometheus.Gauge({ name: "num_requests_running", help: "Sequences in the running batch.", labelNames: gpuLabels, registers: [registry] })
  const waiting = new Prometheus.Gauge({ name: "num_requests_waiting", help: "Sequences waiting for admission to the batch.", labelNames: gpuLabels, registers: [registry] })
  const kvUsage = new Prometheus.Gauge({ name: "kv_cache_usage_perc", help: "Fraction of KV cache blocks in use (0-1).", labelNames: gpuLabels, registers: [registry] })
  const prefixQueries = new Prometheus.Gauge({ name: "prefix_cache_queries_total", help: "Prompt tokens looked up in the prefix cache.", labelNames: gpuLabels, registers: [registry] })
  const prefixHits = new Prometheus.Gauge({ name: "prefix_cache_hits_total", help: "Prompt tokens found in the prefix cache.", labelNames: gpuLabels, registers: [registry] })
  const readGpus = Effect.forEach(workers.all, (worker) =>
    Effect.map(worker.stats, (stats) => {
      const labels = { model: poolOfGpu.get(worker.gpuId) ?? "", gpu: worker.gpuId }
      running.set(labels, stats.numRunning)
      waiting.set(labels, stats.numWaiting)
      kvUsage.set(labels, stats.numBlocks === 0 ? 0 : (stats.numBlocks - stats.numFreeBlocks) / stats.numBlocks)
      prefixQueries.set(labels, stats.numPrefixQueriedTokens)
      prefixHits.set(labels, stats.numPrefixHitTokens)
    }), { discard: true })

  const recentErrors: Array<RecentError> = []

  return Metrics.of({
    observeTurn: (labels, stream, startMs) => {
      let lastMs: number | undefined
      // The labelled series once per turn: a token event then costs one observation.
      const itlSeries = itl.labels(labels)
      const end = (reason: string) => {
        e2e.observe(labels, (performance.now() - startMs) / 1000)
        success.inc({ ...labels, finished_reason: reason })
      }
      stream.observe({
        onToken: () => {
          const now = performance.now()
          if (lastMs === undefined) ttft.observe(labels, (now - startMs) / 1000)
          else itlSeries.observe((now - lastMs) / 1000)
          lastMs = now
        },
        onDone: (e) => {
          promptTokens.inc(labels, e.usage.prompt_tokens)
          generationTokens.inc(labels, e.usage.completion_tokens)
          end(e.finish_reason)
        },
        onFail: (code, message) => {
          end(code === "content_filter" ? "content_filter" : "error")
          // Cancellations and filtered replies are the client's or the policy's doing, not faults.
          if (code === "content_filter" || code === "cancelled") return
          recentErrors.unshift({ at_ms: Date.now(), model: labels.model, tier: labels.tier, code, message: message.slice(0, 200) })
          if (recentErrors.length > NUM_RECENT_ERRORS) recentErrors.pop()
        }
      })
    },
    rateLimitRejected: (tier, limit) => rejections.inc({ tier, limit }),
    moderationVerdict: (stage, verdict) => verdicts.inc({ stage, verdict }),
    scrape: Effect.zipRight(
      readGpus,
      Effect.promise(() => registry.metrics()).pipe(Effect.map((text) => ({ text, contentType: registry.contentType })))
    ),
    snapshot: Effect.zipRight(
      readGpus,
      Effect.promise(() => registry.getMetricsAsJSON()).pipe(Effect.map((all) => ({
        metrics: all.filter((m) => DASHBOARD_SERIES.has(m.name)),
        recentErrors: [...recentErrors]
      })))
    )
  })
})

export const layer: Layer.Layer<Metrics, never, GpuWorkers | TopologyService | ConversationCache | Models> = Layer.effect(Metrics, make)
