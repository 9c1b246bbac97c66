/** Linux /proc readings of a process: resident memory and CPU time. */
import { readFileSync } from "node:fs"

/** VmRSS of `pid` in bytes (from /proc/<pid>/status), or NaN. */
export const rssBytes = (pid: number): number => {
  try {
    const m = /VmRSS:\s+(\d+)\s+kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))
    return m === null ? NaN : Number(m[1]) * 1024
  } catch {
    return NaN
  }
}

/** utime + stime of `pid` in seconds (clock ticks of 1/100 s), or NaN. */
export const cpuSeconds = (pid: number): number => {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8")
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ")
    return (Number(rest[11]) + Number(rest[12])) / 100
  } catch {
    return NaN
  }
}

/** Direct children of `pid`. */
export const childrenOf = (pid: number): Array<number> => {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim().split(/\s+/).filter((s) => s.length > 0).map(Number)
  } catch {
    return []
  }
}

export const commandOf = (pid: number): string => {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").replace(/\0/g, " ").trim()
  } catch {
    return ""
  }
}

/** CPU seconds of several named processes; `sample()` returns cores used since the last call. */
export class CpuMeter {
  private last: Map<string, number> = new Map()
  private lastAt = 0
  constructor(private readonly pids: () => Record<string, number>) {}

  start(): void {
    this.lastAt = performance.now()
    this.last = new Map(Object.entries(this.pids()).map(([k, pid]) => [k, cpuSeconds(pid)]))
  }

  /** Cores used per process since `start()` (1.0 = one core busy the whole time). */
  stop(): Record<string, number> {
    const elapsed = (performance.now() - this.lastAt) / 1000
    const out: Record<string, number> = {}
    for (const [k, pid] of Object.entries(this.pids())) {
      const before = this.last.get(k)
      const now = cpuSeconds(pid)
      if (before !== undefined && Number.isFinite(before) && Number.isFinite(now) && elapsed > 0) out[k] = (now - before) / elapsed
    }
    return out
  }
}
