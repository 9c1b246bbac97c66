import { mkdtempSync, writeFileSync } from "node:fs"
import os from "node:os"
import path from "node:path"
import { makeAgent } from "/work/main/bench/serve/client.js"
import { createPrivateDatabase } from "/work/main/bench/serve/database.js"
import { connectInspector, inspectorUrlOf } from "/work/main/bench/serve/inspector.js"
import { runPoint } from "/work/main/bench/serve/loadgen.js"
import { startService } from "/work/main/bench/serve/processes.js"
import { Progress } from "/work/main/bench/serve/progress.js"
import { SHAREGPT_LIKE } from "/work/main/bench/serve/workload.js"
const streams = Number(process.argv[2] ?? 2048)
const db = await createPrivateDatabase("postgres://postgres@127.0.0.1:5432/test")
const service = await startService({ env: { DATABASE_URL: db.url, SHUTDOWN_GRACE_MS: "2000", BENCH_TTFT_P99_MS: "3600000" }, dataDir: mkdtempSync(path.join(os.tmpdir(), "alloc-")), nodeArgs: ["--inspect=127.0.0.1:0"] })
const inspector = (await connectInspector(inspectorUrlOf(service.output())!))!
let tokens0 = 0
setTimeout(async () => {
  await inspector.call("HeapProfiler.enable")
  await inspector.call("HeapProfiler.startSampling", { samplingInterval: 16384, includeObjectsCollectedByMajorGC: true, includeObjectsCollectedByMinorGC: true })
  console.error("sampling")
}, 50_000)
const stopped = new Promise<void>((resolve) => setTimeout(async () => {
  const r = await inspector.call("HeapProfiler.stopSampling")
  writeFileSync("/tmp/alloc.json", JSON.stringify(r["profile"]))
  console.error("written")
  resolve()
}, 72_000))
const point = await runPoint({ host: service.host, port: service.port, agent: makeAgent() }, { kind: "closed", concurrency: streams }, { label: "alloc", warmupMs: 50_000, durationMs: 30_000, workload: SHAREGPT_LIKE, maxInFlight: streams, progress: new Progress(), cpuPids: () => service.pids() })
console.log("tok/s in window", point.outputTokPerS)
await stopped
inspector.close()
await service.stop(); await db.drop(); process.exit(0)
