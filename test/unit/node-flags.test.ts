/**
 * The service's Node flags are written twice, for `npm start`/`serve`/`runner`
 * (scripts/service-node.sh) and for the processes scripts and tests spawn
 * (scripts/nodeFlags.ts): both must start node with the same flags.
 */
import { execFileSync } from "node:child_process"
import { describe, expect, it } from "@effect/vitest"
import { serviceNodeFlags } from "../../scripts/nodeFlags.js"
import { REPO_ROOT } from "../support/engineProcess.js"

describe("the service's Node flags", () => {
  it("are the same from scripts/service-node.sh as from scripts/nodeFlags.ts", () => {
    const out = execFileSync("bash", ["scripts/service-node.sh", "-e", "console.log(JSON.stringify(process.execArgv))"], { cwd: REPO_ROOT, encoding: "utf8" })
    const execArgv = JSON.parse(out) as Array<string>
    expect(execArgv.slice(0, -2)).toEqual(serviceNodeFlags())
  })
})
