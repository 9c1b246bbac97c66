// Worker-thread bootstrap: Node 20 does not run `--import tsx` in worker threads, so the
// TypeScript entry is loaded through tsx's API. Under a build that emitted .js, the .js
// entry sits next to this file and is imported directly.
import { existsSync } from "node:fs"

const js = new URL("./gpuWorkerThreadEntry.js", import.meta.url)
if (existsSync(js)) {
  await import(js.href)
} else {
  const { tsImport } = await import("tsx/esm/api")
  await tsImport("./gpuWorkerThreadEntry.ts", import.meta.url)
}
