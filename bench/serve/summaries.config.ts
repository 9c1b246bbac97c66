/**
 * Benchmark topology of bench/serve/summaries.ts: the CPU one (cpu.config.ts) with running
 * summaries, a prompt budget of BENCH_PROMPT_BUDGET tokens (default 1024; "0": no summaries,
 * the prompt fills the model's 4,096-token context).
 */
import type { TopologyInput } from "../../src/runtime/Topology.js"
import cpu from "./cpu.config.js"

const budget = Number(process.env["BENCH_PROMPT_BUDGET"] ?? 1024)

const config: TopologyInput = {
  ...cpu,
  ...(budget > 0 ? { context: { prompt_budget_tokens: budget, summary_max_tokens: 128 } } : {})
}

export default config
