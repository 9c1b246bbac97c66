/**
 * Models: for each pool of the topology, its checkpoint directory, tokenizer and context
 * length. Loaded once per process (both gateway and GPU runners need the tokenizer: the
 * former to build prompts, the latter to detokenize).
 */
import { readFile } from "node:fs/promises"
import { join } from "node:path"
import { Context, Effect, Layer, Schema } from "effect"
import { StorageError } from "./Errors.js"
import * as Tokenizer from "./Tokenizer.js"
import { TopologyService } from "./Topology.js"

export interface LoadedModel {
  readonly pool: string
  readonly modelDir: string
  readonly tokenizer: Tokenizer.ModelTokenizer
  /** max_position_embeddings of config.json: prompt + output tokens at most. */
  readonly maxModelLen: number
}

export interface ModelsService {
  /** The model of `pool`, or undefined for an unknown pool. */
  readonly get: (pool: string) => LoadedModel | undefined
}

export class Models extends Context.Tag("chat/Models")<Models, ModelsService>() {}

const ModelConfig = Schema.Struct({ max_position_embeddings: Schema.Int.pipe(Schema.positive()) })

const readModelConfig = (modelDir: string) =>
  Effect.tryPromise({
    try: () => readFile(join(modelDir, "config.json"), "utf8").then((s) => JSON.parse(s) as unknown),
    catch: (e) => new StorageError({ message: `cannot read ${modelDir}/config.json: ${String(e)}` })
  }).pipe(
    Effect.flatMap(Schema.decodeUnknown(ModelConfig)),
    Effect.mapError((e) => e._tag === "StorageError" ? e : new StorageError({ message: `bad config.json in ${modelDir}: ${e.message}` }))
  )

/**
 * @param resolveModelDir maps a pool's `model` setting ("default" or a directory) to a
 *        checkpoint directory (generating the default model if needed).
 */
export const layer = (resolveModelDir: (model: string) => Effect.Effect<string, StorageError>) =>
  Layer.effect(
    Models,
    Effect.gen(function*() {
      const topology = yield* TopologyService
      const byDir = new Map<string, { tokenizer: Tokenizer.ModelTokenizer; maxModelLen: number }>()
      const models = new Map<string, LoadedModel>()
      for (const [pool, settings] of Object.entries(topology.pools)) {
        const modelDir = yield* resolveModelDir(settings.model)
        let loaded = byDir.get(modelDir)
        if (loaded === undefined) {
          const config = yield* readModelConfig(modelDir)
          loaded = { tokenizer: yield* Tokenizer.load(modelDir), maxModelLen: config.max_position_embeddings }
          byDir.set(modelDir, loaded)
        }
        models.set(pool, { pool, modelDir, ...loaded })
      }
      return { get: (pool) => models.get(pool) }
    })
  )
