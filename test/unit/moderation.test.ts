import { describe, expect, it } from "vitest"
import { blocklistClassifier, isRepetitive, repetitionGuard } from "../../src/runtime/Moderation.js"
import * as Moderation from "../../src/runtime/Moderation.js"
import { Effect } from "effect"

describe("moderation", () => {
  it("the blocklist matches whole words and phrases, case-insensitively, in any script", () => {
    const c = blocklistClassifier(["badword", "two words", "Сейчас"])
    expect(c.classify("a BadWord here").flagged).toBe(true)
    expect(c.classify("badwords").flagged).toBe(false)
    expect(c.classify("xbadword").flagged).toBe(false)
    expect(c.classify("say two words.").flagged).toBe(true)
    expect(c.classify("say two   words").flagged).toBe(true)
    expect(c.classify("say two\nwords").flagged).toBe(true)
    expect(c.classify("say twowords").flagged).toBe(false)
    expect(c.classify("и сейчас").flagged).toBe(true)
    expect(blocklistClassifier([]).classify("anything").flagged).toBe(false)
    // Invisible format characters and compatibility forms do not hide a word that shows as it.
    for (const hidden of ["bad\u200bword", "b\u200dadword", "bad\u00adword", "\uff42\uff41\uff44\uff57\uff4f\uff52\uff44", "bad\u2060word!"]) {
      expect(c.classify(`say ${hidden} please`).flagged).toBe(true)
    }
    expect(c.classify("bad\u200bwords").flagged).toBe(false)
    // ... nor stop one from separating words (U+200B does in Thai), as written or folded.
    expect(c.classify("foo\u200bbadword\u200bbar").flagged).toBe(true)
    expect(c.classify("\u2122badword").flagged).toBe(true)
    expect(c.classify("bad\ufff9word").flagged).toBe(true)
    // A mark is part of its word: with मार (beat) blocked, कुमार (Kumar) and बीमार (sick) are not findings.
    const hindi = blocklistClassifier(["मार"])
    expect(hindi.classify("मेरा नाम कुमार है").flagged).toBe(false)
    expect(hindi.classify("मैं बीमार हूँ").flagged).toBe(false)
    expect(hindi.classify("उसे मार दो").flagged).toBe(true)
    expect(blocklistClassifier(["قتل"]).classify("مُقتل").flagged).toBe(false)
    // Regex characters in a phrase are literal.
    expect(blocklistClassifier(["a.b"]).classify("axb").flagged).toBe(false)
  })

  it("the divergence guard flags a prompt that is one short string repeated, not ordinary text", () => {
    expect(isRepetitive("poem ".repeat(60))).toBe(true)
    expect(isRepetitive("company company company ".repeat(12))).toBe(true)
    expect(isRepetitive("a".repeat(500))).toBe(true)
    expect(isRepetitive("poem ".repeat(20))).toBe(false) // too short to matter
    const prose = "The paged KV cache stores keys and values in fixed-size blocks, so that sequences of any length share the memory without fragmentation; a block table maps each sequence's positions to its blocks."
    expect(isRepetitive(prose.repeat(2))).toBe(false)
    expect(isRepetitive("x".repeat(100) + prose)).toBe(false)
  })

  it("the repetition guard stops a loop of an n-gram (n ≤ 8) at 16 repeats and 64 tokens, never varied output", () => {
    const firstStop = (ids: ReadonlyArray<number>) => {
      const guard = repetitionGuard()
      return ids.findIndex((id) => guard.push(id))
    }
    // One token: 64 in a row (40 zeros in a list are not a loop).
    expect(firstStop([5, 6, ...Array(40).fill(7)])).toBe(-1)
    expect(firstStop([5, 6, ...Array(80).fill(7)])).toBe(2 + 63)
    // A 3-gram: 64 tokens (more than 16 repeats).
    const tri = Array.from({ length: 30 }, () => [1, 2, 3]).flat()
    expect(firstStop([9, ...tri])).toBe(1 + 63)
    // A 5-gram: 16 repeats = 80 tokens.
    const five = Array.from({ length: 20 }, () => [1, 2, 3, 4, 5]).flat()
    expect(firstStop(five)).toBe(79)
    // 15 repeats of a 4-gram then something else: no stop.
    expect(firstStop([...Array.from({ length: 15 }, () => [1, 2, 3, 4]).flat(), 99, 98])).toBe(-1)
    // A 9-gram loop is longer than the guard looks for.
    expect(firstStop(Array.from({ length: 20 }, () => [1, 2, 3, 4, 5, 6, 7, 8, 9]).flat())).toBe(-1)
    let x = 1
    expect(firstStop(Array.from({ length: 5000 }, () => (x = (x * 48271) % 2147483647) % 1000))).toBe(-1)
  })

  it("the output check flags only a finding that ends in the newest delta, with the text before and after it as its boundaries", () =>
    Effect.gen(function*() {
      const moderation = yield* Moderation.Moderation
      // "class" cut so that the window starts inside it: "ass" there is no word.
      const text = "I booked first class seats on the train, and a glass of water. "
      for (let size = 1; size <= 7; size++) {
        const check = moderation.outputCheck()
        const deltas = Array.from({ length: Math.ceil(text.length / size) }, (_, i) => text.slice(i * size, (i + 1) * size))
        expect(deltas.map((d) => check.push(d)).every((v) => v === undefined), `deltas of ${size}`).toBe(true)
      }
      // A word at the end of a delta is held until the next one shows whether it goes on.
      const check = moderation.outputCheck()
      expect(["a first ", "class ", "kick in the "].map((d) => check.push(d))).toEqual([undefined, undefined, undefined])
      expect(check.push("ass")).toBeUndefined()
      expect(check.holding).toBe(true)
      expect(check.push(".")).toEqual({ flagged: true, category: "blocklist" })
      const longer = moderation.outputCheck()
      expect(["the ", "ass", "ess", "ment"].map((d) => [longer.push(d), longer.holding])).toEqual([
        [undefined, false], [undefined, true], [undefined, false], [undefined, false]
      ])
      const ending = moderation.outputCheck()
      expect(ending.push("the ass")).toBeUndefined()
      expect(ending.push("", true)).toEqual({ flagged: true, category: "blocklist" })
      expect(moderation.outputCheck().push("the ass", true)).toEqual({ flagged: true, category: "blocklist" })
    }).pipe(Effect.provide(Moderation.layer(blocklistClassifier(["ass"]))), Effect.runPromise))

  it("an output check keeps a bounded tail of the turn: nothing for an empty blocklist, 512 characters for a classifier without its own check", () =>
    Effect.gen(function*() {
      // An empty blocklist's window was 0 characters, and slice(-0) kept the whole turn.
      const windows: Array<number> = []
      const spy: Moderation.Classifier = { classify: (text) => (windows.push(text.length), Moderation.pass) }
      const check = Moderation.layer(spy).pipe((layer) => Effect.runSync(Effect.provide(Moderation.Moderation, layer))).outputCheck()
      for (let i = 0; i < 2000; i++) check.push("ab")
      expect(Math.max(...windows)).toBeLessThanOrEqual(512 + 2)
      const empty = yield* Moderation.Moderation
      const none = empty.outputCheck()
      for (let i = 0; i < 100; i++) expect(none.push("ab")).toBeUndefined()
      expect(none.holding).toBe(false)
    }).pipe(Effect.provide(Moderation.layer(blocklistClassifier([]))), Effect.runPromise))

  it("the output check sees a phrase split across deltas, and the input check both classifier and guard", () =>
    Effect.gen(function*() {
      const moderation = yield* Moderation.Moderation
      const check = moderation.outputCheck()
      expect(check.push("this is two")).toBeUndefined()
      expect(check.push(" wor")).toBeUndefined()
      expect(check.push("ds!")).toEqual({ flagged: true, category: "blocklist" })
      // Split by format characters and a run of spaces, one character a delta.
      const spaced = moderation.outputCheck()
      const deltas = [..."then t\u200bw\u200bo    w\u200bo\u200br\u200bd\u200bs."]
      expect(deltas.map((d) => spaced.push(d)).find((v) => v !== undefined)).toEqual({ flagged: true, category: "blocklist" })
      // However long the invisible or blank stretch: the check keeps folded text.
      for (const gap of ["\u{E0020}".repeat(3), "\u200b".repeat(50)]) {
        const hidden = moderation.outputCheck()
        expect([..."so two words.".replaceAll(/(?<=\S)(?=\S)/gu, gap)].map((d) => hidden.push(d)).some((v) => v !== undefined), JSON.stringify(gap)).toBe(true)
      }
      const wide = moderation.outputCheck()
      expect(["two", ...Array.from({ length: 45 }, () => " "), "words", "."].map((d) => wide.push(d)).some((v) => v !== undefined)).toBe(true)
      expect(moderation.checkInput("tell me two words").flagged).toBe(true)
      expect(moderation.checkInput("poem ".repeat(100))).toEqual({ flagged: true, category: "repetitive_prompt" })
      expect(moderation.checkInput("hello there").flagged).toBe(false)
    }).pipe(Effect.provide(Moderation.layer(blocklistClassifier(["two words"]))), Effect.runPromise))
})
