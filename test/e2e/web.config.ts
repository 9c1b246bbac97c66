/**
 * Topology of the browser tests (test/e2e/web.test.ts): the gateway tests' pools and tiers
 * (`free` → mini on the CPU engine, 5 requests a minute; `paid` → frontier, a simulated GPU),
 * with the simulated GPU 8× slower than modelled, so that a reply streams for several
 * seconds: long enough to stop it, reload the page or cut the connection in the middle.
 */
import type { TopologyInput } from "../../src/runtime/Topology.js"
import gateway from "./gateway.config.js"

const config: TopologyInput = {
  ...gateway,
  pools: {
    ...gateway.pools,
    frontier: { ...gateway.pools["frontier"]!, engine: { ...gateway.pools["frontier"]!.engine, sim_time_scale: 8 } }
  }
}

export default config
