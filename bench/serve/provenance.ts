/**
 * What the single-purpose benchmarks (cluster, event-loop, prefix-routing, turn-ttft,
 * long-conversation) share: their numeric `--name N` options, and the command, date, commit
 * and machine that every bench/results file records.
 */
import { execFileSync } from "node:child_process"
import os from "node:os"
import { serviceNodeArgs } from "../../test/support/nodeArgs.js"

/** `--name N` from this process's arguments, else `fallback`. */
export const numberArg = (name: string, fallback: number): number => {
  const argv = process.argv.slice(2)
  const i = argv.indexOf(`--${name}`)
  return i < 0 ? fallback : Number(argv[i + 1])
}

/** `--NAME a,b,c` as ["a", "b", "c"], or `fallback` when the flag is absent. */
export const listArg = (name: string, fallback: ReadonlyArray<string>): Array<string> => {
  const argv = process.argv.slice(2)
  const i = argv.indexOf(`--${name}`)
  return i < 0 ? [...fallback] : (argv[i + 1] ?? "").split(",")
}

/**
 * The record of a run: `command` as given, now, the short commit, the machine, and the Node
 * flags of the services it started (the pool size depends on the machine, and
 * `BENCH_SERVICE_NODE_ARGS` is not in the command).
 */
export const provenance = (command: string) => ({
  command,
  date: new Date().toISOString(),
  commit: execFileSync("git", ["rev-parse", "--short", "HEAD"]).toString().trim(),
  service_node_args: serviceNodeArgs(),
  machine: { cpuModel: os.cpus()[0]?.model, cpuCount: os.cpus().length, node: process.version, os: `${os.type()} ${os.release()}` }
})
