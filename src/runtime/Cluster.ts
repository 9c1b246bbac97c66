/**
 * The cluster runner of this process.
 *
 * - `layerSingle`: the one-runner deployment (as @effect/cluster's `SingleRunner`: Sharding with
 *   SqlMessageStorage and SqlRunnerStorage, no socket server).
 * - `layerSocket`: one runner of several processes. Runners reach each other over TCP
 *   (`cluster_port` of the topology, TCP_NODELAY on both ends: entity messages are small and
 *   latency-bound), register in SqlRunnerStorage and keep undelivered messages in
 *   SqlMessageStorage, both in the PostgreSQL of DATABASE_URL.
 *
 * Shard groups: "default" holds the Conversation entities and is assigned to gateway runners;
 * each GPU is a shard group of its own (its GpuScheduler and DecodeSlot entities, whose ids
 * start with the GPU id), assigned only to the runner that hosts that GPU's engine.
 *
 * In both, the shard lock calls run at URGENT_PRIORITY (internal/urgentShardLocks.ts).
 */
import { RunnerAddress, RunnerHealth, Runners, Sharding, ShardingConfig, SocketRunner, SqlMessageStorage, SqlRunnerStorage } from "@effect/cluster"
import * as NodeSocket from "@effect/platform-node/NodeSocket"
import * as NodeSocketServer from "@effect/platform-node/NodeSocketServer"
import { RpcClient, RpcSerialization } from "@effect/rpc"
import { Socket } from "@effect/platform"
import type { SqlClient } from "@effect/sql"
import { Duration, Effect, Layer, Option } from "effect"
import { layerUrgentShardLocks } from "./internal/urgentShardLocks.js"
import { runnerNamed, type Topology } from "./Topology.js"

/**
 * Shard ownership timings. A dead runner's shards move after its lock expires: with a 4 s
 * expiration and assignments re-read every 1 s, they are reassigned within ~5 s of a crash.
 * A refresh must answer within its interval (1.5 s) or the runner gives up all its shards:
 * at 1 s a loaded PostgreSQL on a 2-core machine missed it.
 */
/** Shards in each shard group. */
export const SHARDS_PER_GROUP = 16

const timings = {
  shardsPerGroup: SHARDS_PER_GROUP,
  entityMailboxCapacity: 4096,
  entityMaxIdleTime: Duration.minutes(5),
  // KV blocks of a GPU runner must be freed fast on shutdown.
  entityTerminationTimeout: Duration.seconds(2),
  shardLockExpiration: Duration.seconds(4),
  shardLockRefreshInterval: Duration.millis(1500),
  refreshAssignmentsInterval: Duration.seconds(1),
  runnerHealthCheckInterval: Duration.seconds(1),
  sendRetryInterval: Duration.millis(100),
  entityMessagePollInterval: Duration.millis(500),
  entityReplyPollInterval: Duration.millis(100)
} as const

/** Shard groups: every GPU's, and the ones `runnerName` owns. */
const shardGroups = (topology: Topology, runnerName: string) => {
  const runner = runnerNamed(topology, runnerName)
  return {
    availableShardGroups: ["default", ...topology.runners.flatMap((r) => r.gpus)],
    assignedShardGroups: [...(runner?.roles.includes("gateway") ? ["default"] : []), ...(runner?.gpus ?? [])]
  }
}

export const layerSingle = (topology: Topology, runnerName: string) =>
  // As @effect/cluster's SingleRunner.layer with "sql" runner storage (the same layers, config
  // from the environment overridden by these options), its shard locks made urgent.
  Sharding.layer.pipe(
    Layer.provideMerge(Runners.layerNoop),
    Layer.provideMerge(SqlMessageStorage.layer),
    Layer.provide([layerUrgentShardLocks({ soleRunner: true }).pipe(Layer.provide(Layer.orDie(SqlRunnerStorage.layer))), RunnerHealth.layerNoop]),
    Layer.provide(ShardingConfig.layerFromEnv({
      ...timings,
      // No other runner takes shards over here: a longer expiration only guards against a
      // refresh delayed by a busy event loop.
      shardLockExpiration: Duration.seconds(6),
      ...shardGroups(topology, runnerName),
      // Local entities: skip the encode/decode round trip that would simulate a remote
      // runner (every stream chunk paid it: ~2x CPU per token at 64 streams, measured).
      simulateRemoteSerialization: process.env["CLUSTER_SIMULATE_REMOTE_SERIALIZATION"] === "1"
    }))
  )

/** Connects to a runner's cluster port, with TCP_NODELAY. */
const layerClientProtocol = Layer.effect(
  Runners.RpcClientProtocol,
  Effect.gen(function*() {
    const serialization = yield* RpcSerialization.RpcSerialization
    return (address: RunnerAddress.RunnerAddress) =>
      Effect.gen(function*() {
        const socket = yield* NodeSocket.makeNet({ openTimeout: 1000, timeout: 5500, host: address.host, port: address.port, noDelay: true })
        return yield* RpcClient.makeProtocolSocket().pipe(
          Effect.provideService(Socket.Socket, socket),
          Effect.provideService(RpcSerialization.RpcSerialization, serialization)
        )
      }).pipe(Effect.orDie)
  })
)

/**
 * Runner `runnerName` of a multi-process topology. Requires a SqlClient (PostgreSQL) for the
 * message store, and takes `runnerSql` for the runners' registry and shard locks: both are
 * shared between runners through PostgreSQL.
 */
export const layerSocket = <E, R>(
  topology: Topology,
  runnerName: string,
  /**
   * The runner storage's own SQL client (shard locks, the runner registry): a lock refresh
   * must answer within its interval, so it must not queue behind the message storage's
   * statements (a refresh that missed it under load made the runner give up every shard).
   */
  runnerSql: Layer.Layer<SqlClient.SqlClient, E, R>
) => {
  const runner = runnerNamed(topology, runnerName)!
  const address = RunnerAddress.make(runner.host ?? "127.0.0.1", runner.cluster_port!)
  const config = ShardingConfig.layer({
    ...timings,
    ...shardGroups(topology, runnerName),
    runnerAddress: Option.some(address),
    runnerListenAddress: Option.some(RunnerAddress.make("0.0.0.0", address.port))
  })
  const server = NodeSocketServer.layer({ host: "0.0.0.0", port: address.port, noDelay: true })
  const health = RunnerHealth.layerPing.pipe(Layer.provide(Runners.layerRpc), Layer.provide(layerClientProtocol))
  return SocketRunner.layer.pipe(
    Layer.provide([server, layerClientProtocol, health]),
    Layer.provideMerge(Layer.orDie(SqlMessageStorage.layer)),
    Layer.provide(layerUrgentShardLocks({ soleRunner: false }).pipe(Layer.provide(Layer.orDie(SqlRunnerStorage.layer)), Layer.provide(runnerSql))),
    Layer.provide(config),
    Layer.provide(RpcSerialization.layerMsgPack)
  )
}
