/**
 * Starts every runner of a topology as its own process on this machine:
 * `npm run cluster:local` (examples/cluster-local.config.ts), or
 * `node --import tsx scripts/cluster-local.ts CONFIG`. Each runner gets DATA_DIR
 * `.data/<runner>` and its output prefixed with its name; Ctrl-C (SIGINT) or SIGTERM stops
 * them all (each drains its turns first), and the script exits when they have.
 * Needs DATABASE_URL (PostgreSQL), as every multi-runner topology does.
 */
import { spawn } from "node:child_process"
import { resolve } from "node:path"
import { pathToFileURL } from "node:url"
import { tsImport } from "tsx/esm/api"
import { serviceNodeFlags } from "./nodeFlags.js"

const configPath = resolve(process.argv[2] ?? "examples/cluster-local.config.ts")
if (process.env["DATABASE_URL"] === undefined) {
  console.error("cluster-local: set DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/test)")
  process.exit(2)
}
const topology = ((await tsImport(pathToFileURL(configPath).href, import.meta.url)) as { default: { runners: Array<{ name: string; http_port?: number }> } }).default
const children = topology.runners.map((runner) => {
  const child = spawn(process.execPath, [...serviceNodeFlags(), "--import", "tsx", "src/main.ts", "--name", runner.name], {
    env: { ...process.env, CLUSTER_CONFIG: configPath, DATA_DIR: resolve(".data", runner.name), PORT: undefined },
    stdio: ["ignore", "pipe", "pipe"]
  })
  const prefix = `[${runner.name}] `
  for (const out of [child.stdout, child.stderr]) {
    let partial = ""
    out.on("data", (chunk: Buffer) => {
      const lines = (partial + chunk.toString()).split("\n")
      partial = lines.pop() ?? ""
      for (const line of lines) process.stdout.write(prefix + line + "\n")
    })
  }
  if (runner.http_port !== undefined) console.log(`${prefix}HTTP on http://127.0.0.1:${runner.http_port}`)
  return child
})
let stopping = false
const stop = () => {
  if (stopping) return
  stopping = true
  for (const child of children) child.kill("SIGTERM")
}
process.on("SIGINT", stop)
process.on("SIGTERM", stop)
await Promise.all(children.map((child) => new Promise((r) => child.once("exit", r))))
