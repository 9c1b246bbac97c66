/**
 * `BENCH_SERVICE_NODE_ARGS` (space-separated): Node flags added to every service or runner
 * process the tests and benches start, e.g. `--cpu-prof` or `--trace-gc` to look into a bench.
 */
export const serviceNodeArgs = (): Array<string> =>
  (process.env["BENCH_SERVICE_NODE_ARGS"] ?? "").split(" ").filter((a) => a !== "")
