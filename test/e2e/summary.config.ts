/**
 * Topology of the summary tests (test/e2e/summaries.test.ts): the default one with a small
 * prompt budget, so that a conversation of a few dozen turns outgrows it and is summarised,
 * and fact mining after 1 s idle.
 */
import type { TopologyInput } from "../../src/runtime/Topology.js"
import base from "../../cluster.config.js"

const config: TopologyInput = {
  ...base,
  context: { prompt_budget_tokens: 300, summary_max_tokens: 64 },
  // Facts are mined from a conversation idle for 1 s (the tiny model's are meaningless).
  memory: { extract_after_idle_s: 1 }
}

export default config
