/**
 * The service's Node flags are written twice, for `npm start`/`serve`/`runner`
 * (scripts/service-node.sh) and for the processes scripts and tests spawn
 * (scripts/nodeFlags.ts): both must start node with the same flags, V8_POOL_SIZE set or not.
 */
import { execFileSync } from "node:child_process"
import { describe, expect, it } from "@effect/vitest"
import { serviceNodeFlags } from "../../scripts/nodeFlags.js"
import { REPO_ROOT } from "../support/engineProcess.js"

/** The flags node gets from scripts/service-node.sh, and those of nodeFlags.ts, under `env`. */
const bothWith = (env: Record<string, string | undefined>): { launcher: Array<string>; spawner: Array<string> } => {
  const merged = { ...process.env, ...env }
  if (env["V8_POOL_SIZE"] === undefined) delete merged["V8_POOL_SIZE"]
  const out = execFileSync("bash", ["scripts/service-node.sh", "-e", "console.log(JSON.stringify(process.execArgv))"], { cwd: REPO_ROOT, encoding: "utf8", env: merged })
  // The last two are `-e` and its script.
  return { launcher: (JSON.parse(out) as Array<string>).slice(0, -2), spawner: serviceNodeFlags(merged) }
}

describe("the service's Node flags", () => {
  it("are the same from scripts/service-node.sh as from scripts/nodeFlags.ts", () => {
    const { launcher, spawner } = bothWith({ V8_POOL_SIZE: undefined })
    expect(launcher).toEqual(spawner)
  })

  it("agree on V8_POOL_SIZE, set or empty", () => {
    const set = bothWith({ V8_POOL_SIZE: "3" })
    expect(set.launcher).toEqual(set.spawner)
    expect(set.spawner).toContain("--v8-pool-size=3")
    const empty = bothWith({ V8_POOL_SIZE: "" })
    expect(empty.launcher).toEqual(empty.spawner)
  })
})
