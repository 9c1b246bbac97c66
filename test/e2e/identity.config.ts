/**
 * Topology of the identity tests (test/e2e/gateway.test.ts, "identity and ownership"): the
 * default one with two organisations' data rules: acme's turns may be used for training,
 * vault's are never stored at rest.
 */
import type { TopologyInput } from "../../src/runtime/Topology.js"
import base from "../../cluster.config.js"

const config: TopologyInput = {
  ...base,
  orgs: { acme: { training_eligible: true }, vault: { zero_retention: true } }
}

export default config
