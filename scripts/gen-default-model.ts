/**
 * Generates the default tiny Qwen3 model into the data directory (once) and prints its path.
 *   DATA_DIR=.data tsx scripts/gen-default-model.ts
 */
import { ensureDefaultModel } from "../src/runtime/DefaultModel.js"

const started = performance.now()
const dir = ensureDefaultModel(process.env["DATA_DIR"] ?? ".data")
process.stderr.write(`default model ready in ${((performance.now() - started) / 1000).toFixed(2)} s\n`)
process.stdout.write(dir + "\n")
