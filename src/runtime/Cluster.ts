/**
 * The cluster runner of this process. Here: the single-runner deployment (`SingleRunner`:
 * Sharding with SqlMessageStorage and SqlRunnerStorage on PostgreSQL, no socket server), which
 * owns the default shard group (Conversation entities) and one shard group per GPU it hosts
 * (GpuScheduler and DecodeSlot entities, whose ids start with the GPU id).
 */
import { SingleRunner } from "@effect/cluster"
import { Duration } from "effect"
import type { Topology } from "./Topology.js"

export const layerSingle = (topology: Topology, runnerName: string) => {
  const allGpus = topology.runners.flatMap((r) => r.gpus)
  const ownGpus = topology.runners.find((r) => r.name === runnerName)?.gpus ?? []
  // Every option is given explicitly: SingleRunner otherwise reads ShardingConfig from
  // environment variables such as PORT, which belong to the HTTP server.
  return SingleRunner.layer({
    runnerStorage: "sql",
    shardingConfig: {
      shardsPerGroup: 16,
      availableShardGroups: ["default", ...allGpus],
      assignedShardGroups: ["default", ...ownGpus],
      entityMailboxCapacity: 4096,
      entityMaxIdleTime: Duration.minutes(5),
      // KV blocks of a GPU runner must be freed fast on shutdown.
      entityTerminationTimeout: Duration.seconds(2),
      shardLockExpiration: Duration.seconds(6),
      shardLockRefreshInterval: Duration.seconds(1),
      refreshAssignmentsInterval: Duration.seconds(1),
      // Local entities: skip the encode/decode round trip that would simulate a remote
      // runner (every stream chunk paid it: ~2x CPU per token at 64 streams, measured).
      simulateRemoteSerialization: process.env["CLUSTER_SIMULATE_REMOTE_SERIALIZATION"] === "1"
    }
  })
}
