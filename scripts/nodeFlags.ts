/**
 * The Node flags the service and its runners are started with (README, "Configuration"):
 *
 * - `--max-semi-space-size=32`: a young generation of up to 32 MB a semi-space (V8's default
 *   is 16). With thousands of streams the service allocates ~200 MB/s; 16 MB semi-spaces
 *   scavenged ~9 times a second. Not more: a mark-compact's pause evacuates the young
 *   generation's live objects too (`--trace-gc-nvp`: evacuation was most of each pause, up to
 *   56 ms), so the semi-space bounds that pause, the largest stall left once marking is off the
 *   main thread (below): with 64 MB one run in six had a 61 ms stall at a 47 ms pause; with
 *   32 MB the pauses were 20–39 ms in four runs, for twice the scavenges (each at most
 *   12–17 ms) and ~1.4× the collector's pause time (bench/README.md, "Event-loop delay").
 * - `--v8-pool-size=N`, N = `V8_POOL_SIZE`, else the cores this process may use, at most 4
 *   (Node's default is 4 whatever the machine): V8's collector runs its parallel and
 *   concurrent work on that pool, and on a machine with fewer cores than helpers the main
 *   thread waits for a core behind its own helpers, inside a scavenge or the mark-compact's
 *   pause and while they mark. The cores are `os.availableParallelism()`: on Node 20 the CPU
 *   affinity mask, not a container's CPU quota, and not shared with other processes on the
 *   machine; where those matter, set `V8_POOL_SIZE`.
 * - `--no-incremental-marking-task --incremental-marking-hard-trigger=80`: V8 (11.3) paces a
 *   marking cycle from its tasks to end within ~500 ms of wall time, and the main thread marks
 *   whatever the helpers have not by then (182–338 ms of each cycle's 288–446 ms at 2,048
 *   streams on 2 cores, in steps of up to 22 ms): the event loop's stalls over 50 ms. Without the tasks the
 *   main thread marks only in proportion to what it allocates and the helpers do the rest, but
 *   marking then also starts only when the old generation reaches its limit (the earlier start
 *   at V8's soft limit is itself a task), and once the mark-compact's pause had to finish the
 *   marking: a 1.3 s stall. The hard trigger starts marking, from an allocation, once the old
 *   generation holds 80% of its limit, which leaves the helpers tens of seconds of allocation
 *   to finish in (bench/README.md, "Event-loop delay").
 *
 * scripts/service-node.sh applies the same flags to `npm start`, `npm run serve` and
 * `npm run runner`; test/unit/node-flags.test.ts checks that the two agree.
 */
import os from "node:os"

/** The flags, for `spawn(process.execPath, [...serviceNodeFlags(), entry])`, under `env`. */
export const serviceNodeFlags = (env: NodeJS.ProcessEnv = process.env): Array<string> => {
  // Empty counts as unset, as `${V8_POOL_SIZE:-…}` in the shell script has it.
  const poolSize = env["V8_POOL_SIZE"] || String(Math.min(4, os.availableParallelism()))
  return ["--max-semi-space-size=32", `--v8-pool-size=${poolSize}`, "--no-incremental-marking-task", "--incremental-marking-hard-trigger=80"]
}
