/**
 * Stop strings over a stream of text deltas (OpenAI's `stop`): the text before the first
 * occurrence of any stop string goes out, and no character of the stop string does, even when
 * it is split across deltas. So text that could be the start of a stop string is held back
 * until a later delta tells: vLLM's detokenizer holds back the longest stop string's length
 * less one; this holds back only the longest suffix that begins some stop string.
 */
export class StopStrings {
  private held = ""

  /** @param stops the stop strings, each non-empty. */
  constructor(private readonly stops: ReadonlyArray<string>) {}

  /**
   * The text of the next delta that can go out now. `stopped`: a stop string begins at the end
   * of `text`, and the generation should end there.
   */
  push(delta: string): { readonly text: string; readonly stopped: boolean } {
    const text = this.held + delta
    let at = -1
    for (const stop of this.stops) {
      const i = text.indexOf(stop)
      if (i >= 0 && (at < 0 || i < at)) at = i
    }
    if (at >= 0) {
      this.held = ""
      return { text: text.slice(0, at), stopped: true }
    }
    const hold = this.longestStopPrefixAtEnd(text)
    this.held = text.slice(text.length - hold)
    return { text: text.slice(0, text.length - hold), stopped: false }
  }

  /** The text held back, for a generation that ends for another reason; empties it. */
  flush(): string {
    const held = this.held
    this.held = ""
    return held
  }

  /** Length of the longest suffix of `text` that is a proper prefix of a stop string. */
  private longestStopPrefixAtEnd(text: string): number {
    let best = 0
    for (const stop of this.stops) {
      for (let n = Math.min(stop.length - 1, text.length); n > best; n--) {
        if (text.endsWith(stop.slice(0, n))) {
          best = n
          break
        }
      }
    }
    return best
  }
}
