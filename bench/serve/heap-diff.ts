/**
 * Diff of two V8 heap snapshots by constructor: what a level of idle streams added, per stream.
 *
 *   node --import tsx bench/serve/heap-diff.ts BEFORE.heapsnapshot AFTER.heapsnapshot [N] [TOP]
 *
 * Prints, for the TOP constructors (node type + name) with the most self size added, the count
 * and bytes added, and both divided by N (the number of streams the second snapshot adds).
 * Self sizes only: the retained size of a stream is the sum of what it owns.
 */
import { readFileSync } from "node:fs"

interface Totals { count: number; bytes: number }

const summarize = (file: string): Map<string, Totals> => {
  const snap = JSON.parse(readFileSync(file, "utf8")) as {
    snapshot: { meta: { node_fields: Array<string>; node_types: [Array<string>] } }
    nodes: Array<number>
    strings: Array<string>
  }
  const fields = snap.snapshot.meta.node_fields
  const types = snap.snapshot.meta.node_types[0]
  const width = fields.length
  const typeAt = fields.indexOf("type")
  const nameAt = fields.indexOf("name")
  const sizeAt = fields.indexOf("self_size")
  const out = new Map<string, Totals>()
  for (let i = 0; i < snap.nodes.length; i += width) {
    const type = types[snap.nodes[i + typeAt]!]!
    const raw = snap.strings[snap.nodes[i + nameAt]!]!
    // Strings and code are summed per type; objects per constructor name.
    const name = type === "object" || type === "closure" || type === "native" ? raw.slice(0, 60) : ""
    const key = `${type} ${name}`
    const t = out.get(key) ?? { count: 0, bytes: 0 }
    t.count++
    t.bytes += snap.nodes[i + sizeAt]!
    out.set(key, t)
  }
  return out
}

const [before, after, nArg, topArg] = process.argv.slice(2)
if (before === undefined || after === undefined) {
  console.error("usage: heap-diff.ts BEFORE AFTER [N] [TOP]")
  process.exit(2)
}
const n = Number(nArg ?? 1)
const top = Number(topArg ?? 40)
const a = summarize(before)
const b = summarize(after)
const rows = [...b].map(([key, t]) => {
  const p = a.get(key) ?? { count: 0, bytes: 0 }
  return { key, count: t.count - p.count, bytes: t.bytes - p.bytes }
})
rows.sort((x, y) => y.bytes - x.bytes)
const total = rows.reduce((s, r) => s + r.bytes, 0)
console.log(`total self size added: ${(total / 1024 / 1024).toFixed(1)} MiB = ${(total / n / 1024).toFixed(1)} KB per stream (N=${n})`)
console.log("bytes/stream  count/stream  constructor")
for (const r of rows.slice(0, top)) {
  console.log(`${(r.bytes / n).toFixed(0).padStart(12)}  ${(r.count / n).toFixed(2).padStart(12)}  ${r.key}`)
}
