/**
 * Process entry: composes every layer (the only place that does). With no environment it is
 * the embedded single-process deployment: PGlite behind pglite-socket as PostgreSQL, one CPU
 * engine with the generated tiny model, HTTP on :8080.
 *
 * Environment: PORT, HOST, DATA_DIR (default .data), DATABASE_URL (use that PostgreSQL
 * instead of the embedded one), MODEL_DIR (a Hugging Face checkpoint directory for pools whose
 * model is "default"), ENGINE_BIN (default engine/build/llm-engine), ENGINE_THREADS,
 * RUNNER_NAME (default: the first runner of cluster.config.ts), API_KEYS, LOG_ENGINE=1,
 * RUN_DIR (directory of the engines' ipc sockets `engine-<gpu>.sock`), CLUSTER_CONFIG (a
 * module whose default export replaces cluster.config.ts), REDIS_URL and REDIS_KEY_PREFIX (the
 * turn stream logs and rate limits of a multi-runner topology; default redis://127.0.0.1:6379,
 * `chat:`), RATE_LIMIT_STORE (`redis` to share limits through Redis in one process too),
 * MODERATION_BLOCKLIST (comma-separated words or phrases that moderation refuses),
 * OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_SERVICE_NAME (a trace span per turn over OTLP/HTTP),
 * EVENT_LOOP_SLICE_MS (how long fiber work may hold the event loop before waiting I/O runs).
 * `--name NAME` (or RUNNER_NAME) picks the runner of the topology this process is.
 */
import { resolve } from "node:path"
import { RateLimiter } from "@effect/experimental"
import { HttpMiddleware } from "@effect/platform"
import { ClusterWorkflowEngine, Sharding } from "@effect/cluster"
import { NodeRuntime } from "@effect/platform-node"
import { PgClient } from "@effect/sql-pg"
import { Config, ConfigProvider, Context, Duration, Effect, Either, Layer, Option, Redacted, Schema } from "effect"
import { pathToFileURL } from "node:url"
import defaultTopology from "../cluster.config.js"
import * as ConversationEntity from "./actors/Conversation.js"
import * as ConversationsLive from "./actors/ConversationsLive.js"
import * as BackgroundModel from "./actors/BackgroundModel.js"
import * as Embedder from "./actors/Embedder.js"
import * as DecodeSlot from "./actors/DecodeSlot.js"
import * as FactExtraction from "./actors/FactExtraction.js"
import * as Retention from "./actors/Retention.js"
import * as Summaries from "./actors/Summaries.js"
import * as GpuScheduler from "./actors/GpuScheduler.js"
import { RunningSlots } from "./actors/internal/runningSlots.js"
import * as RateLimits from "./http/RateLimits.js"
import * as HttpServer from "./http/Server.js"
import * as Metrics from "./runtime/Metrics.js"
import * as Moderation from "./runtime/Moderation.js"
import * as TurnTraces from "./runtime/TurnTraces.js"
import * as Cluster from "./runtime/Cluster.js"
import * as ConversationCache from "./runtime/ConversationCache.js"
import * as DataPlane from "./runtime/DataPlane.js"
import { ensureDefaultModel } from "./runtime/DefaultModel.js"
import * as EmbeddedPostgres from "./runtime/EmbeddedPostgres.js"
import { StorageError } from "./runtime/Errors.js"
import * as GpuWorkers from "./runtime/GpuWorkers.js"
import * as Models from "./runtime/Models.js"
import * as RunnerStatus from "./runtime/RunnerStatus.js"
import * as Storage from "./runtime/Storage.js"
import * as Topology from "./runtime/Topology.js"
import * as TurnEventLog from "./runtime/TurnEventLog.js"
import { TurnStreams } from "./runtime/TurnStream.js"
import { DEFAULT_SLICE_MS, EventLoopScheduler } from "./runtime/EventLoopScheduler.js"

/** The PostgreSQL every pool of this process connects to (DATABASE_URL, or the embedded one). */
class DatabaseUrl extends Context.Tag("chat/DatabaseUrl")<DatabaseUrl, Redacted.Redacted>() {}

const settings = Config.all({
  dataDir: Config.string("DATA_DIR").pipe(Config.withDefault(".data")),
  databaseUrl: Config.option(Config.redacted("DATABASE_URL")),
  modelDir: Config.option(Config.string("MODEL_DIR")),
  engineBinary: Config.string("ENGINE_BIN").pipe(Config.withDefault("engine/build/llm-engine")),
  engineThreads: Config.option(Config.integer("ENGINE_THREADS")),
  runnerName: Config.option(Config.string("RUNNER_NAME")),
  logEngine: Config.boolean("LOG_ENGINE").pipe(Config.withDefault(false)),
  runDir: Config.option(Config.string("RUN_DIR")),
  clusterConfig: Config.option(Config.string("CLUSTER_CONFIG")),
  redisUrl: Config.string("REDIS_URL").pipe(Config.withDefault("redis://127.0.0.1:6379")),
  redisKeyPrefix: Config.string("REDIS_KEY_PREFIX").pipe(Config.withDefault("chat:")),
  rateLimitStore: Config.literal("redis", "memory")("RATE_LIMIT_STORE").pipe(Config.withDefault("memory" as const)),
  // A reader that disconnects (a reload, a dropped connection) may resume its turn meanwhile.
  streamDetachGraceMs: Config.integer("STREAM_DETACH_GRACE_MS").pipe(Config.withDefault(30_000))
})

/** ioredis options of a `redis://[user:password@]host[:port][/db]` URL. */
const redisOptions = (url: string) => {
  const u = new URL(url)
  return {
    host: u.hostname,
    port: u.port === "" ? 6379 : Number(u.port),
    db: u.pathname.length > 1 ? Number(u.pathname.slice(1)) : 0,
    ...(u.username === "" ? {} : { username: decodeURIComponent(u.username) }),
    ...(u.password === "" ? {} : { password: decodeURIComponent(u.password) })
  }
}

/**
 * A topology module. A `.ts` one is loaded through tsx, so that a compiled server
 * (`npm start` runs dist/) takes the same config files as `node --import tsx`.
 */
const importConfig = async (file: string): Promise<{ default: unknown }> => {
  const url = pathToFileURL(file).href
  if (!/\.[cm]?ts$/.test(file)) return import(url) as Promise<{ default: unknown }>
  const { tsImport } = await import("tsx/esm/api")
  return tsImport(url, import.meta.url) as Promise<{ default: unknown }>
}

/** `--name NAME` on the command line (`npm run runner -- --name gw-1`), else RUNNER_NAME. */
const nameArg = (() => {
  const i = process.argv.indexOf("--name")
  return i < 0 ? undefined : process.argv[i + 1]
})()

/**
 * SHUTDOWN_GRACE_MS, as the HTTP layer reads it; a bad value stops the start-up there (this
 * default only sizes the stop deadline of a process that does not start).
 */
const shutdownGraceMs = Either.getOrElse(Effect.runSync(Effect.either(HttpServer.shutdownGraceMsConfig)), () => 10_000)

/** A start-up misconfiguration: the process exits with this message. */
const misconfigured = (message: string) => Effect.fail(new StorageError({ message }))

const MainLive = Layer.unwrapEffect(
  Effect.gen(function*() {
    const s = yield* settings
    const configPath = Option.getOrUndefined(s.clusterConfig)
    const topologyInput: unknown = configPath === undefined
      ? defaultTopology
      : (yield* Effect.promise(() => importConfig(resolve(configPath)))).default
    const topologyValue = yield* Schema.decodeUnknown(Topology.TopologySchema)(topologyInput, { errors: "all" })
    const runnerName = nameArg ?? Option.getOrElse(s.runnerName, () => topologyValue.runners[0].name)
    const runner = Topology.runnerNamed(topologyValue, runnerName)
    if (runner === undefined) {
      return yield* misconfigured(`runner "${runnerName}" is not in the topology (${topologyValue.runners.map((r) => r.name).join(", ")})`)
    }
    // Several runners share their registry, messages and turns through one PostgreSQL.
    const multiRunner = topologyValue.runners.length > 1
    if (multiRunner && Option.isNone(s.databaseUrl)) {
      return yield* misconfigured("a topology of several runners needs DATABASE_URL (a PostgreSQL that every runner reaches)")
    }
    const dataDir = resolve(s.dataDir)

    const resolveModelDir = (model: string) =>
      model !== "default"
        ? Effect.succeed(resolve(model))
        : Option.isSome(s.modelDir)
        ? Effect.succeed(resolve(s.modelDir.value))
        : Effect.try({
          try: () => ensureDefaultModel(dataDir),
          catch: (e) => new StorageError({ message: `cannot generate the default model: ${String(e)}` })
        })

    const DatabaseUrlLive = Option.isSome(s.databaseUrl)
      ? Layer.succeed(DatabaseUrl, s.databaseUrl.value)
      : Layer.scoped(
        DatabaseUrl,
        EmbeddedPostgres.start(resolve(dataDir, "pg")).pipe(
          Effect.tap(({ url }) => Effect.logInfo(`embedded PostgreSQL (PGlite) at ${url}, data in ${dataDir}/pg`)),
          Effect.map(({ url }) => Redacted.make(url))
        )
      )
    const pgPool = (maxConnections: number) =>
      Layer.unwrapEffect(Effect.map(DatabaseUrl, (url) => PgClient.layer({ url, maxConnections }))).pipe(Layer.provide(DatabaseUrlLive))
    // The conversation store's pool (fewer connections than pglite-socket accepts, 16).
    const SqlLive = pgPool(8)
    // The cluster's storages have a pool of their own: a shard lock refresh that queued behind
    // hundreds of turn appends missed its deadline under load, and the runner then gave up
    // every shard at once (interrupting its entities mid-message).
    const ClusterSqlLive = pgPool(4)
    // And the shard locks have one of their own within that: the message storage's polls and
    // writes queued a refresh past its deadline too (the same loss of every shard).
    const ShardLockSqlLive = pgPool(2)

    const TopologyLive = Layer.succeed(Topology.TopologyService, topologyValue)
    const ModelsLive = Models.layer(resolveModelDir).pipe(Layer.provide(TopologyLive))
    const WorkersLive = GpuWorkers.layer({
      runnerName,
      engineBinary: resolve(s.engineBinary),
      threads: Option.getOrUndefined(s.engineThreads),
      logEngine: s.logEngine,
      socketDir: Option.getOrUndefined(Option.map(s.runDir, (d) => resolve(d)))
    }).pipe(Layer.provide(ModelsLive), Layer.provide(TopologyLive))
    // One runner owns every conversation here: replies lost in a crash are filled in as
    // `failed` before any turn is taken (Storage.reconcile).
    const ReconcileLive = Layer.effectDiscard(
      Storage.reconcile.pipe(
        Effect.tap((n) => n > 0 ? Effect.logWarning(`reconciled ${n} user turns left without a reply by a crash`) : Effect.void)
      )
    )
    // Runners that start together on a fresh database race to create the same tables (a
    // CREATE TABLE IF NOT EXISTS can still fail on its type's unique index): the loser retries
    // and finds them made.
    // (The cluster's own migrations die rather than fail, so this catches every cause.)
    const retryStartup = <A, E, R>(layer: Layer.Layer<A, E, R>, attempts = 5): Layer.Layer<A, E, R> =>
      attempts === 0 ? layer : Layer.catchAllCause(Layer.fresh(layer), () =>
        Layer.unwrapEffect(Effect.as(Effect.sleep(Duration.millis(500 + Math.random() * 500)), retryStartup(layer, attempts - 1))))
    const StoreLive = multiRunner
      ? retryStartup(Storage.layer.pipe(Layer.provide(SqlLive)))
      : ReconcileLive.pipe(Layer.provideMerge(Storage.layer), Layer.provide(SqlLive))
    // One registry of token streams per runner: the facade opens them, DecodeSlots write them
    // (through the data plane when the slot is on another runner).
    const StreamsLive = TurnStreams.layerFor(runnerName, Math.max(0, s.streamDetachGraceMs))
    // Turn stream logs for resuming on any gateway: Redis across runners, memory in one process.
    const EventLogLive = multiRunner ? TurnEventLog.layerRedis(s.redisUrl, s.redisKeyPrefix) : TurnEventLog.layerMemory
    const DataPlaneLive = (multiRunner ? DataPlane.layerZmq(topologyValue, runnerName) : DataPlane.layerLocal).pipe(
      Layer.provide(StreamsLive),
      Layer.provide(EventLogLive)
    )
    // The shared hot-conversation cache: Redis across runners; one process needs none.
    const ConversationCacheLive = multiRunner ? ConversationCache.layerRedis(s.redisUrl, s.redisKeyPrefix) : ConversationCache.layerNone
    const SlotsLive = DecodeSlot.layer.pipe(Layer.provide(ConversationEntity.layerTurnFinisher))
    // Summaries are durable workflows on the cluster's message storage (they resume after a restart).
    const SummariesLive = Layer.mergeAll(
      Summaries.layer.pipe(Layer.provide(Summaries.layerSummarizer)),
      FactExtraction.layer.pipe(Layer.provide(FactExtraction.layerExtractor))
    ).pipe(Layer.provide(BackgroundModel.layer))
    // Memory retrieval's embeddings: the engine's embed on the default tier's pool.
    const EmbedderLive = Embedder.layer
    const EntitiesLive = Layer.mergeAll(ConversationEntity.layer, GpuScheduler.layer, SlotsLive, SummariesLive, Retention.layer).pipe(
      Layer.provide(EmbedderLive),
      Layer.provide(Layer.mergeAll(StoreLive, ModelsLive, WorkersLive, TopologyLive, StreamsLive, DataPlaneLive, EventLogLive, RunningSlots.layer, Moderation.layerConfig, ConversationCacheLive)),
      Layer.provideMerge(ClusterWorkflowEngine.layer)
    )
    const ClusterLive = EntitiesLive.pipe(
      Layer.provideMerge(
        // orDie: one error channel for both; a runner that cannot start exits with the cause.
        multiRunner
          ? retryStartup(Cluster.layerSocket(topologyValue, runnerName, ShardLockSqlLive).pipe(Layer.provide(ClusterSqlLive))).pipe(Layer.orDie)
          : Cluster.layerSingle(topologyValue, runnerName).pipe(Layer.provide(ClusterSqlLive), Layer.orDie)
      )
    )
    yield* Effect.logInfo(`runner ${runnerName} (${runner.roles.join(", ")}) of ${topologyValue.runners.length}`)
    // Built after the cluster (it needs Sharding), so released before it: on a stop, this
    // runner's GPUs admit nothing more and their sequences may finish before the engines and
    // entities go; what is left moves to other GPUs (the Conversations' failover).
    const GpuDrainLive = Layer.scopedDiscard(Effect.gen(function*() {
      yield* Sharding.Sharding
      const workers = yield* GpuWorkers.GpuWorkers
      if (workers.all.length === 0) return
      yield* Effect.addFinalizer(() =>
        Effect.gen(function*() {
          yield* Effect.logInfo(`stopping: ${workers.all.length} GPUs admit nothing more; sequences get up to ${shutdownGraceMs} ms`)
          const left = yield* workers.drain(shutdownGraceMs)
          yield* Effect.logInfo(`stopping: ${left} sequences were still running and move to other GPUs`)
        })
      )
    }))
    // Operators' view (npm run cluster -- status, /ops) and drain requests.
    const RunnerStatusLive = RunnerStatus.layer({
      runner,
      shardGroups: [...(runner.roles.includes("gateway") ? ["default"] : []), ...runner.gpus],
      shardsPerGroup: Cluster.SHARDS_PER_GROUP,
      onDrain: Effect.sync(() => process.kill(process.pid, "SIGTERM"))
    }).pipe(Layer.provide(SqlLive))
    // One runner reports too: the /ops dashboard reads the same rows (and a drain of the only
    // runner is its graceful stop).
    const RunnerLive = Layer.mergeAll(GpuDrainLive, RunnerStatusLive).pipe(
      Layer.provideMerge(ClusterLive),
      Layer.provide(Layer.mergeAll(WorkersLive, StreamsLive))
    )
    if (!runner.roles.includes("gateway")) return Layer.discard(RunnerLive)
    // One registry for the whole process: the facade times turns, the edge counts refusals.
    const MetricsLive = Metrics.layer.pipe(Layer.provide(Layer.mergeAll(WorkersLive, TopologyLive, ConversationCacheLive, ModelsLive)))
    const ConversationsLayer = ConversationsLive.layer.pipe(
      Layer.provide(EmbedderLive.pipe(Layer.provide(RunnerLive), Layer.provide(ModelsLive), Layer.provide(TopologyLive))),
      Layer.provide(Layer.mergeAll(RunnerLive, StoreLive, TopologyLive, StreamsLive, WorkersLive, EventLogLive, MetricsLive, ModelsLive, Moderation.layerConfig, TurnTraces.layerConfig))
    )
    // PORT overrides the runner's http_port.
    const port = process.env["PORT"] ?? (runner.http_port === undefined ? undefined : String(runner.http_port))
    // Rate limits: one limit across gateways (Redis) with several runners, memory in one process.
    const RateLimitStoreLive = multiRunner || s.rateLimitStore === "redis"
      ? RateLimits.layerStoreRedis({ ...redisOptions(s.redisUrl), prefix: `${s.redisKeyPrefix}ratelimit:` })
      : RateLimiter.layerStoreMemory
    return HttpServer.layer.pipe(
      Layer.provide(ConversationsLayer),
      Layer.provide(TopologyLive),
      Layer.provide(RateLimitStoreLive),
      Layer.provide(MetricsLive),
      Layer.provide(RunnerStatus.layerView.pipe(Layer.provide(SqlLive))),
      Layer.provide(SqlLive),
      Layer.provide(Layer.setConfigProvider(ConfigProvider.orElse(ConfigProvider.fromJson(port === undefined ? {} : { PORT: port }), () => ConfigProvider.fromEnv())))
    )
  })
)

// No trace exporter is configured, so spans (one per HTTP request, RPC and SQL statement)
// would only cost CPU and memory on every turn. The HTTP server's tracer middleware builds its
// span (URL, redacted headers, attributes) even so, and keeps its frames on the request fiber
// for as long as an SSE response streams: it is switched off per request too.
/** EVENT_LOOP_SLICE_MS (default 2): read before the runtime starts, since the scheduler runs it. */
const eventLoopSliceMs = (() => {
  const raw = process.env.EVENT_LOOP_SLICE_MS
  const ms = raw === undefined ? DEFAULT_SLICE_MS : Number(raw)
  if (Number.isFinite(ms) && ms > 0) return ms
  console.error(`EVENT_LOOP_SLICE_MS must be a positive number of milliseconds, not ${JSON.stringify(String(raw).slice(0, 40))}`)
  return process.exit(2)
})()

// A stop that cannot finish must not hold the process for ever: with the database unreachable,
// the cluster's release of this runner's shards waits for it (in a drill the process was still
// there 80 s after the database came back). Past the drains' time (the API's grace and 10 s
// to store the stopped turns, then the GPUs' grace) and STOP_MARGIN_MS, the process exits with
// code 1, as a crash would: start-up reconciliation repairs what that leaves.
const STOP_MARGIN_MS = 15_000
const stopDeadlineMs = 2 * shutdownGraceMs + ConversationsLive.STOPPED_TURNS_STORE_MS + STOP_MARGIN_MS
for (const signal of ["SIGTERM", "SIGINT"] as const) {
  process.once(signal, () => {
    setTimeout(() => {
      console.error(`stop did not finish within ${stopDeadlineMs} ms of ${signal}: exiting`)
      process.exit(1)
    }, stopDeadlineMs).unref()
  })
}

// Every fiber runs on EventLoopScheduler, so that a burst of fiber work yields the event loop
// to waiting requests every EVENT_LOOP_SLICE_MS.
NodeRuntime.runMain(
  Layer.launch(
    MainLive.pipe(
      HttpMiddleware.withTracerDisabledWhen(() => true),
      Layer.provide(Layer.setTracerEnabled(false))
    )
  ).pipe(Effect.withScheduler(new EventLoopScheduler(eventLoopSliceMs)))
)
