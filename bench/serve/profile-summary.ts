/**
 * Summarizes a V8 .cpuprofile (from `npm run bench -- --profile DIR`): self time by function
 * and by module (node_modules package or repository file).
 *
 *   node --import tsx bench/serve/profile-summary.ts FILE.cpuprofile [--top 25]
 */
import { readFileSync } from "node:fs"

interface Node {
  readonly id: number
  readonly callFrame: { readonly functionName: string; readonly url: string; readonly lineNumber: number }
  readonly children?: ReadonlyArray<number>
}
interface Profile {
  readonly nodes: ReadonlyArray<Node>
  readonly samples: ReadonlyArray<number>
  readonly timeDeltas: ReadonlyArray<number>
  readonly startTime: number
  readonly endTime: number
}

const file = process.argv[2]
if (file === undefined) {
  process.stderr.write("usage: profile-summary.ts FILE.cpuprofile [--top N]\n")
  process.exit(2)
}
const topIndex = process.argv.indexOf("--top")
const top = topIndex >= 0 ? Number(process.argv[topIndex + 1]) : 25
const profile = JSON.parse(readFileSync(file, "utf8")) as Profile
const byId = new Map(profile.nodes.map((n) => [n.id, n]))
const self = new Map<number, number>()
for (let i = 0; i < profile.samples.length; i++) {
  const id = profile.samples[i]!
  self.set(id, (self.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0))
}
const total = [...self.values()].reduce((a, b) => a + b, 0)

const moduleOf = (url: string): string => {
  if (url === "") return "(native / V8)"
  const nm = url.lastIndexOf("node_modules/")
  if (nm >= 0) {
    const rest = url.slice(nm + 13).split("/")
    return rest[0]!.startsWith("@") ? `${rest[0]}/${rest[1]}` : rest[0]!
  }
  if (url.startsWith("node:")) return url
  const src = url.indexOf("/src/")
  return src >= 0 ? url.slice(src + 1) : url
}

const fnKey = (n: Node) => `${n.callFrame.functionName || "(anonymous)"} ${moduleOf(n.callFrame.url)}:${n.callFrame.lineNumber + 1}`
const byFn = new Map<string, number>()
const byModule = new Map<string, number>()
for (const [id, t] of self) {
  const n = byId.get(id)!
  byFn.set(fnKey(n), (byFn.get(fnKey(n)) ?? 0) + t)
  const m = n.callFrame.functionName === "(garbage collector)" ? "(garbage collector)" : n.callFrame.functionName === "(idle)" ? "(idle)" : moduleOf(n.callFrame.url)
  byModule.set(m, (byModule.get(m) ?? 0) + t)
}
const print = (title: string, m: Map<string, number>) => {
  process.stdout.write(`${title}\n`)
  for (const [k, t] of [...m].sort((a, b) => b[1] - a[1]).slice(0, top)) {
    process.stdout.write(`  ${((t / total) * 100).toFixed(1).padStart(5)}%  ${(t / 1000).toFixed(0).padStart(7)} ms  ${k}\n`)
  }
}
process.stdout.write(`${file}: ${(total / 1e6).toFixed(1)} s sampled\n`)
print("self time by module:", byModule)
print("self time by function:", byFn)
