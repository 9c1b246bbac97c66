/**
 * The Node flags of every service or runner process the tests and benches start: those it is
 * run with in production (scripts/nodeFlags.ts), then `BENCH_SERVICE_NODE_ARGS`
 * (space-separated; a later flag overrides an earlier one), e.g. `--cpu-prof` or `--trace-gc`
 * to look into a bench.
 */
import { serviceNodeFlags } from "../../scripts/nodeFlags.js"

export const serviceNodeArgs = (): Array<string> => [
  ...serviceNodeFlags(),
  ...(process.env["BENCH_SERVICE_NODE_ARGS"] ?? "").split(" ").filter((a) => a !== "")
]
