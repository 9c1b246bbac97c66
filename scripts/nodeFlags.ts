/**
 * The Node flags the service and its runners are started with (README, "Configuration"):
 *
 * - `--max-semi-space-size=32`: a young generation of up to 32 MB a semi-space (V8's default
 *   is 16, which scavenged ~9 times a second at ~200 MB/s of allocation). Not more: a
 *   mark-compact's pause evacuates the young generation's live objects too, so the semi-space
 *   bounds that pause (with 64 MB: up to 47 ms, and a 61 ms stall in one run of six).
 * - `--v8-pool-size=N`, N = `V8_POOL_SIZE`, else the cores this process may use, at most 4
 *   (Node's default is 4 whatever the machine): V8's collector runs its parallel and
 *   concurrent work on that pool, and on a machine with fewer cores than helpers the main
 *   thread waits for a core behind its own helpers, inside a scavenge or the mark-compact's
 *   pause and while they mark. The cores are `os.availableParallelism()`: on Node 20 the CPU
 *   affinity mask, not a container's CPU quota, and not shared with other processes on the
 *   machine; where those matter, set `V8_POOL_SIZE`.
 * - `--no-incremental-marking-task --incremental-marking-hard-trigger=80`: V8 11.3's marking
 *   tasks pace a cycle to end in ~500 ms, and the main thread marks whatever the helpers have
 *   not by then (182–338 ms of each cycle at 2,048 streams on 2 cores: the event loop's
 *   stalls). Without them it marks in step with its allocation; the hard trigger then starts
 *   marking at 80% of the old generation's limit, since the usual earlier start is a task too.
 *
 * README ("Configuration") and bench/README.md ("Event-loop delay") have the measurements.
 *
 * scripts/service-node.sh applies the same flags to `npm start`, `npm run serve` and
 * `npm run runner`; test/unit/node-flags.test.ts checks that the two agree.
 */
import os from "node:os"

/** The flags, for `spawn(process.execPath, [...serviceNodeFlags(), entry])`, under `env`. */
export const serviceNodeFlags = (env: NodeJS.ProcessEnv = process.env): Array<string> => {
  // Empty counts as unset, as `${V8_POOL_SIZE:-…}` in the shell script has it.
  const poolSize = env["V8_POOL_SIZE"] || String(Math.min(4, os.availableParallelism()))
  return [
    "--max-semi-space-size=32",
    `--v8-pool-size=${poolSize}`,
    "--no-incremental-marking-task",
    "--incremental-marking-hard-trigger=80"
  ]
}
