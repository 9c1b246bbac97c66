/**
 * Stop strings over text deltas: what goes out never holds a character of a stop string,
 * however the deltas split it, and held-back text goes out when the generation ends otherwise.
 */
import { describe, expect, it } from "vitest"
import { heldBack, StopStrings } from "../../src/actors/internal/stopStrings.js"

/** Feeds `deltas`; returns what went out and whether a stop string ended it. */
const run = (stops: ReadonlyArray<string>, deltas: ReadonlyArray<string>) => {
  const s = new StopStrings(stops)
  let out = ""
  for (const d of deltas) {
    const cut = s.push(d)
    out += cut.text
    if (cut.stopped) return { out, stopped: true }
  }
  return { out: out + s.flush(), stopped: false }
}

describe("StopStrings", () => {
  it("cuts before a stop string within one delta", () => {
    expect(run(["END"], ["abc", "xyENDzz"])).toEqual({ out: "abcxy", stopped: true })
  })

  it("sends no part of a stop string split across deltas", () => {
    const s = new StopStrings(["dt"])
    expect(s.push("Defined")).toEqual({ text: "Define", stopped: false })
    expect(s.push("to")).toEqual({ text: "", stopped: true })
    expect(run(["<|im_end|>"], ["hi <|", "im_", "end|> more"])).toEqual({ out: "hi ", stopped: true })
  })

  it("releases held text once a later delta rules the stop string out", () => {
    const s = new StopStrings(["dt"])
    expect(s.push("and")).toEqual({ text: "an", stopped: false })
    expect(s.push("a")).toEqual({ text: "da", stopped: false })
  })

  it("flushes held text when the generation ends otherwise", () => {
    expect(run(["\n\nUser:"], ["answer.", "\n\nUs"])).toEqual({ out: "answer.\n\nUs", stopped: false })
  })

  it("takes the earliest of several stop strings, and every split of the text agrees", () => {
    const text = "one two three four"
    for (let i = 0; i <= text.length; i++) {
      for (let j = i; j <= text.length; j++) {
        expect(run(["three", "o t", "four"], [text.slice(0, i), text.slice(i, j), text.slice(j)])).toEqual({ out: "one tw", stopped: true })
        expect(run(["zz", "fourx"], [text.slice(0, i), text.slice(i, j), text.slice(j)])).toEqual({ out: text, stopped: false })
      }
    }
  })

  it("goes on from text a lost slot held back (a failover): the stop string is still found", () => {
    // The lost slot sent "…Define" and held "d"; its successor starts from that.
    const s = new StopStrings(["dt"], "d")
    expect(s.push("to")).toEqual({ text: "", stopped: true })
    const t = new StopStrings(["dt"], "d")
    expect(t.push("a")).toEqual({ text: "da", stopped: false })
    expect(new StopStrings(["dt"], "").push("to")).toEqual({ text: "to", stopped: false })
  })

  it("tells what a lost slot held back from its logged ids' text and its sent text", () => {
    expect(heldBack("It is Defined", "It is Define")).toBe("d")
    expect(heldBack("a\u0000b\n\nUs", "a\uFFFDb")).toBe("\n\nUs")
    expect(heldBack("abc", "abc")).toBe("")
    expect(heldBack("abc", "xyz")).toBe("")
  })
})
