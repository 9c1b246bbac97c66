/**
 * Prompt assembly for a conversation's next turn: system prompt + the most recent history
 * that fits + the new user message, through the model's chat template.
 *
 * With per-message template segments (Tokenizer.promptSegments) each message is encoded once,
 * when it first enters a prompt, and kept in the conversation's state (`historyIds`); a turn
 * then costs the new message's encoding plus a walk back over the messages that fit, never a
 * render of the whole history (which cost ~600 ms at 150 exchanges and blocked the event loop).
 * Without segments the whole prompt is rendered, dropping exchanges until it fits.
 */
import { Effect } from "effect"
import { PromptTooLong } from "../../runtime/Errors.js"
import type { LoadedModel } from "../../runtime/Models.js"
import type { ChatMessage } from "../../runtime/Tokenizer.js"

/** What prompt assembly reads and caches of a conversation. */
export interface PromptState {
  readonly systemPrompt: string | null
  readonly history: ReadonlyArray<ChatMessage>
  /** `middle` segment ids of `history[i]`, filled in lazily (shorter than `history` until then). */
  readonly historyIds: Array<Uint32Array>
}

/**
 * Token ids of the prompt for `state` + `content`, keeping the most recent exchanges that
 * leave room for at least `minNewTokens` (history never starts mid-exchange). Fails with
 * PromptTooLong if even the system prompt and the new message alone do not fit.
 */
export const buildPrompt = (
  model: LoadedModel,
  state: PromptState,
  content: string,
  minNewTokens: number
): Effect.Effect<Array<number>, PromptTooLong> => {
  const segments = model.tokenizer.promptSegments
  const limit = model.maxModelLen - minNewTokens
  // A <think> block anywhere may change how the template renders other messages (Qwen3
  // places reasoning by the last query): render the whole prompt then.
  if (segments === undefined || content.includes("think>") || state.history.some((m) => m.content.includes("think>"))) {
    return buildByRender(model, state, content, limit)
  }
  const { history, historyIds } = state
  for (let i = historyIds.length; i < history.length; i++) historyIds.push(Uint32Array.from(segments.middle(history[i]!)))
  const system = state.systemPrompt === null ? undefined : segments.first({ role: "system", content: state.systemPrompt })
  const user: ChatMessage = { role: "user", content }
  const generation = segments.generationPrompt
  const fixed = (system?.length ?? 0) + generation.length
  // Walk back from the newest message while it fits; `opening` is the first message's ids
  // when there is no system prompt (the template may open a prompt differently).
  const fits = (start: number, userIds: ReadonlyArray<number>): number => {
    let n = fixed + userIds.length
    for (let i = start; i < history.length; i++) n += historyIds[i]!.length
    return n
  }
  let userIds = segments.middle(user)
  // The smallest prompt: no history (the user message then opens it when there is no system prompt).
  const alone = system === undefined ? segments.first(user) : userIds
  if (fixed + alone.length > limit) {
    return Effect.fail(new PromptTooLong({ num_prompt_tokens: fixed + alone.length, max_model_len: model.maxModelLen }))
  }
  let total = fixed + userIds.length
  let start = history.length
  while (start > 0 && total + historyIds[start - 1]!.length <= limit) total += historyIds[--start]!.length
  // Without a system prompt the oldest message kept is encoded as the opener, which may be
  // shorter than its middle form: one more user message may fit that way.
  if (system === undefined && start > 0 && history[start - 1]!.role === "user") {
    if (total + segments.first(history[start - 1]!).length <= limit) start--
  }
  // Never start mid-exchange: the window opens with a user message.
  while (start < history.length && history[start]!.role !== "user") start++
  let opening: ReadonlyArray<number> | undefined
  if (system === undefined) {
    for (;;) {
      if (start === history.length) {
        userIds = alone
        break
      }
      opening = segments.first(history[start]!)
      if (fits(start, userIds) - historyIds[start]!.length + opening.length <= limit) break
      start++
      while (start < history.length && history[start]!.role !== "user") start++
      opening = undefined
    }
  }
  const ids: Array<number> = []
  if (system !== undefined) for (const id of system) ids.push(id)
  for (let i = start; i < history.length; i++) {
    const piece = i === start && opening !== undefined ? opening : historyIds[i]!
    for (const id of piece) ids.push(id)
  }
  for (const id of userIds) ids.push(id)
  for (const id of generation) ids.push(id)
  return Effect.succeed(ids)
}

/** The whole prompt rendered and encoded, dropping the oldest exchanges until it fits. */
const buildByRender = (
  model: LoadedModel,
  state: PromptState,
  content: string,
  limit: number
): Effect.Effect<Array<number>, PromptTooLong> => {
  const system: Array<ChatMessage> = state.systemPrompt === null ? [] : [{ role: "system", content: state.systemPrompt }]
  const history = state.history
  let first = 0
  for (;;) {
    const ids = model.tokenizer.encode(
      model.tokenizer.renderChat([...system, ...history.slice(first), { role: "user", content }])
    )
    if (ids.length <= limit) return Effect.succeed(ids)
    if (first >= history.length) {
      return Effect.fail(new PromptTooLong({ num_prompt_tokens: ids.length, max_model_len: model.maxModelLen }))
    }
    // Drop a whole exchange (user + assistant) so the history never starts mid-exchange.
    first += history[first]?.role === "user" && history[first + 1]?.role === "assistant" ? 2 : 1
  }
}
