import { randomInt } from "node:crypto"

/** A pool's GPUs in the order admission asks them: `preferred` first (if in the pool), the rest shuffled (Fisher–Yates). */
export const gpuOrder = (gpuIds: ReadonlyArray<string>, preferred?: string | undefined): Array<string> => {
  const rest = gpuIds.filter((g) => g !== preferred)
  for (let i = rest.length - 1; i > 0; i--) {
    const j = randomInt(i + 1)
    ;[rest[i], rest[j]] = [rest[j]!, rest[i]!]
  }
  return preferred !== undefined && gpuIds.includes(preferred) ? [preferred, ...rest] : rest
}
