/**
 * A single-line progress bar on stderr (TTY), or a plain line every few seconds otherwise.
 */
export interface ProgressState {
  readonly label: string
  /** 0 … 1 */
  readonly fraction: number
  readonly elapsedS: number
  readonly totalS: number
  readonly done: number
  readonly inFlight: number
  readonly tokPerS: number
  readonly errors: number
}

export class Progress {
  private readonly tty = process.stderr.isTTY === true
  private lastPlain = 0
  private active = false

  update(s: ProgressState): void {
    const width = 24
    const filled = Math.round(Math.min(1, Math.max(0, s.fraction)) * width)
    const bar = "█".repeat(filled) + "░".repeat(width - filled)
    const line = `${s.label.padEnd(22)} ${bar} ${(s.fraction * 100).toFixed(0).padStart(3)}% ` +
      `${s.elapsedS.toFixed(1)}${s.totalS > 0 ? `/${s.totalS.toFixed(0)}` : ""}s  done ${s.done}  in flight ${s.inFlight}  ` +
      `${Math.round(s.tokPerS)} tok/s  errors ${s.errors}`
    if (this.tty) {
      const cols = process.stderr.columns ?? 120
      process.stderr.write(`\r${line.slice(0, cols - 1)}\x1b[K`)
      this.active = true
    } else {
      const now = Date.now()
      if (now - this.lastPlain >= 5000) {
        this.lastPlain = now
        process.stderr.write(line + "\n")
      }
    }
  }

  /** Ends the bar's line. */
  finish(): void {
    if (this.tty && this.active) process.stderr.write("\n")
    this.active = false
    this.lastPlain = 0
  }

  log(message: string): void {
    if (this.tty && this.active) process.stderr.write("\r\x1b[K")
    process.stderr.write(message + "\n")
    this.active = false
  }
}
