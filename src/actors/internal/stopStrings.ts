/**
 * Stop strings over a stream of text deltas (OpenAI's `stop`): the text before the first
 * occurrence of any stop string goes out, and no character of the stop string does, even when
 * it is split across deltas. So text that could be the start of a stop string is held back
 * until a later delta tells: vLLM's detokenizer holds back the longest stop string's length
 * less one; this holds back only the longest suffix that begins some stop string.
 */
export class StopStrings {
  /** Every proper prefix of every stop string, longest first: what may be held back. */
  private readonly prefixes: ReadonlyArray<string>
  private held: string

  /**
   * @param stops the stop strings, each non-empty.
   * @param held text already held back (a failover goes on where the lost slot held some):
   *   what the lost slot generated but did not send, which may begin a stop string.
   */
  constructor(private readonly stops: ReadonlyArray<string>, held = "") {
    const prefixes = new Set(stops.flatMap((stop) => Array.from({ length: stop.length - 1 }, (_, n) => stop.slice(0, n + 1))))
    this.prefixes = [...prefixes].sort((a, b) => b.length - a.length)
    // A slot holds back only what could begin a stop string: keep no more than that.
    this.held = held.slice(held.length - this.longestStopPrefixAtEnd(held))
  }

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
    for (const prefix of this.prefixes) if (text.endsWith(prefix)) return prefix.length
    return 0
  }
}

/**
 * What a lost slot held back, for the slot that takes its turn over: its logged ids decode to
 * `decoded`, of which it sent `sent` (U+0000 went out as U+FFFD, one character for one); the
 * rest is what it held. "" when `sent` is not how `decoded` begins.
 */
export const heldBack = (decoded: string, sent: string): string => {
  const text = decoded.replaceAll("\u0000", "\uFFFD")
  return text.startsWith(sent) ? text.slice(sent.length) : ""
}
