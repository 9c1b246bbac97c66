/**
 * The Node flags of every service or runner process the tests and benches start: those it is
 * run with in production (`npm start`, `npm run runner`, `npm run cluster:local`: a young
 * generation of up to 64 MB a semi-space; README, "Configuration"), then
 * `BENCH_SERVICE_NODE_ARGS` (space-separated), e.g. `--cpu-prof` or `--trace-gc` to look into
 * a bench.
 */
export const serviceNodeArgs = (): Array<string> => [
  "--max-semi-space-size=64",
  ...(process.env["BENCH_SERVICE_NODE_ARGS"] ?? "").split(" ").filter((a) => a !== "")
]
