/**
 * Topology of the summary tests (test/e2e/summaries.test.ts): the default one with a small
 * prompt budget, so that a conversation of a few dozen turns outgrows it and is summarised.
 */
import type { TopologyInput } from "../../src/runtime/Topology.js"
import base from "../../cluster.config.js"

const config: TopologyInput = {
  ...base,
  context: { prompt_budget_tokens: 300, summary_max_tokens: 64 }
}

export default config
