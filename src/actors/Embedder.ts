/**
 * Text embeddings for memory retrieval: the engine's `embed` request (last-token pooling of
 * the final hidden state, unit norm, as Qwen3-Embedding; Zhang et al. 2025, "Qwen3 Embedding",
 * §3) on a GPU of the default tier's pool, so that every fact and query is embedded by the
 * same model. With the tiny default model the vectors are meaningless; the full-text rank
 * still orders facts then.
 */
import { Context, Duration, Effect, Layer, Option } from "effect"
import { Models } from "../runtime/Models.js"
import { encodeOffLoop } from "../runtime/Tokenizer.js"
import { lookup, TopologyService } from "../runtime/Topology.js"
import { GpuScheduler } from "./GpuScheduler.js"
import { askGpu, gpuOrder } from "./internal/gpuOrder.js"

/** Tokens of a text that are embedded, at most (the engine's limit): its first ones. */
const MAX_EMBED_TOKENS = 512
/** How long one embedding may take before the text goes without (retrieval by text alone). */
const EMBED_TIMEOUT = Duration.seconds(5)

export class Embedder extends Context.Tag("chat/Embedder")<Embedder, {
  /**
   * The unit vector of each text, or undefined for one that could not be embedded now (no GPU
   * answered, an empty text): callers then rank by text alone. Never fails.
   */
  readonly embed: (texts: ReadonlyArray<string>) => Effect.Effect<ReadonlyArray<ReadonlyArray<number> | undefined>>
}>() {}

export const layer = Layer.effect(
  Embedder,
  Effect.gen(function*() {
    const models = yield* Models
    const topology = yield* TopologyService
    const gpus = yield* GpuScheduler.client
    const poolName = lookup(topology.tiers, topology.default_tier)!.pool
    const pool = lookup(topology.pools, poolName)
    const one = (text: string): Effect.Effect<ReadonlyArray<number> | undefined> => {
      const model = models.get(poolName)
      if (model === undefined || pool === undefined) return Effect.succeed(undefined)
      // Only the first MAX_EMBED_TOKENS count: a message's head is encoded, not all of its up
      // to 65,536 characters, and off the event loop (CJK text takes ~10 µs a character). No
      // token is 16 characters on average, so the head holds them all.
      return Effect.flatMap(encodeOffLoop(model.tokenizer, text.slice(0, MAX_EMBED_TOKENS * 16)), (encoded) => {
        const ids = encoded.slice(0, MAX_EMBED_TOKENS)
        if (ids.length === 0) return Effect.succeed(undefined)
        // Any GPU of the pool, one that lately answered first; given up without waiting for
        // the call to stop (to a GPU whose runner drained or died the cluster holds it, and
        // its interrupt, until the runner is back: a turn waited for it for good).
        const gpuId = gpuOrder(pool.gpus.map((g) => g.id))[0]!
        return askGpu(gpuId, gpus(gpuId).Embed({ token_ids: ids }), EMBED_TIMEOUT).pipe(
          Effect.option,
          Effect.map(Option.getOrUndefined)
        )
      })
    }
    return Embedder.of({ embed: (texts) => Effect.forEach(texts, one, { concurrency: 4 }) })
  })
)

/** No embeddings (every text ranks by its words alone). */
export const layerNone = Layer.succeed(Embedder, { embed: (texts) => Effect.succeed(texts.map(() => undefined)) })
