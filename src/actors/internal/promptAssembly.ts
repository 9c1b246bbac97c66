/**
 * Prompt assembly for a conversation's next turn: system prompt + the most recent history
 * that fits + the new user message, through the model's chat template, except that an earlier
 * reply is written as it was generated (`PromptSegments.reply`: Qwen3's template would drop
 * the empty `<think>` block the model saw before it, and every block from there on would miss
 * the prefix cache).
 *
 * With per-message template segments (Tokenizer.promptSegments) each message is encoded once,
 * when it first enters a prompt, and kept in the conversation's state (`historyIds`); a turn
 * then costs the new message's encoding plus a walk back over the messages that fit, never a
 * render of the whole history (which cost ~600 ms at 150 exchanges and blocked the event loop).
 * A message older than every prompt so far is never encoded, so a cold load of a long
 * conversation encodes only its last window. Without segments the prompt is rendered whole,
 * for a few candidate starts found by search.
 */
import { Effect } from "effect"
import { PromptTooLong } from "../../runtime/Errors.js"
import type { LoadedModel } from "../../runtime/Models.js"
import { type ChatMessage, LONG_PIECE_CHARS, type ModelTokenizer } from "../../runtime/Tokenizer.js"

/** What prompt assembly reads and caches of a conversation. */
export interface PromptState {
  readonly systemPrompt: string | null
  readonly history: ReadonlyArray<ChatMessage>
  readonly cache: PromptCache
  /**
   * Index of the oldest history message a prompt may hold (default 0): the ones before it are
   * in the running summary (which the system prompt then carries). Opens an exchange.
   */
  readonly windowStart?: number
}

/** Per-conversation work kept between turns; `emptyPromptCache()` for a new or reloaded one. */
export interface PromptCache {
  /** `middle` segment ids of `history[i]`, encoded when a prompt first reaches back to it. */
  readonly historyIds: Array<Uint32Array | undefined>
  /** How many history messages were checked for a `<think>` block, and whether one had one. */
  numScanned: number
  hasThink: boolean
  /**
   * The system prompt's `first` ids, for that text: it is the same from turn to turn until the
   * summary or the remembered facts change, and may be long.
   */
  system?: { readonly content: string; readonly ids: Array<number> }
  /**
   * The last new user message's `middle` ids: it enters the history after its turn, and the
   * next prompt takes these instead of encoding it again.
   */
  lastUser?: { readonly content: string; readonly ids: Array<number> }
}

export const emptyPromptCache = (): PromptCache => ({ historyIds: [], numScanned: 0, hasThink: false })

/**
 * Room for output a prompt must leave in the context (or less, when max_tokens is less): a
 * prompt that leaves fewer tokens is too long.
 */
export const MIN_NEW_TOKENS = 16

const THINK = "think>"

/**
 * Token ids of the prompt for `state` + `content`, keeping the most recent exchanges (from
 * `state.windowStart` on) that leave room for at least `minNewTokens` and keep the prompt
 * within `budgetTokens` (history never starts mid-exchange; the system prompt and the new
 * message alone may pass the budget, up to the model's context). Fails with PromptTooLong if
 * even the system prompt and the new message alone do not fit the context.
 *
 * Cost: the messages that fit (and one more), never the whole history.
 */
export const buildPrompt = (
  model: LoadedModel,
  state: PromptState,
  content: string,
  minNewTokens: number,
  budgetTokens: number = Infinity
): Effect.Effect<Array<number>, PromptTooLong> => {
  const segments = model.tokenizer.promptSegments
  const limit: Limits = { prompt: model.maxModelLen - minNewTokens, history: Math.min(model.maxModelLen - minNewTokens, budgetTokens) }
  const { cache, history } = state
  for (; cache.numScanned < history.length; cache.numScanned++) {
    if (history[cache.numScanned]!.content.includes(THINK)) cache.hasThink = true
  }
  // The new message and a changed system message (its prompt, summary and facts) go ahead
  // last, right before the synchronous assembly that reads them from the memo (where what
  // other turns memoize meanwhile could push them out).
  const ahead = Effect.zipRight(
    state.systemPrompt === null || cache.system?.content === state.systemPrompt
      ? Effect.void
      : encodeMessageAhead(model.tokenizer, { role: "system", content: state.systemPrompt }, true),
    encodeMessageAhead(model.tokenizer, { role: "user", content }, false)
  )
  if (segments === undefined) return Effect.zipRight(ahead, Effect.suspend(() => buildByRender(model, state, content, limit, history.length)))
  return Effect.zipRight(
    Effect.zipRight(encodeWindow(model.tokenizer, segments, state, limit), ahead),
    Effect.suspend(() => {
      const bySegments = buildBySegments(segments, state, content, limit)
  // A <think> block may change how the template renders other messages (Qwen3 places
  // reasoning by the last query): render then, starting the search where the segments ended.
      if (cache.hasThink || content.includes(THINK)) {
        return buildByRender(model, state, content, limit, "start" in bySegments ? bySegments.start : history.length)
      }
      return "start" in bySegments
        ? Effect.succeed(bySegments.ids)
        : Effect.fail(new PromptTooLong({ num_prompt_tokens: bySegments.numPromptTokens, max_model_len: model.maxModelLen }))
    })
  )
}

/**
 * Lets the event loop run its I/O before going on (Effect.yieldNow stays on the microtask
 * queue, where sockets and timers do not get a turn).
 */
const yieldToEventLoop: Effect.Effect<void> = Effect.async<void>((resume) => {
  const handle = setImmediate(() => resume(Effect.void))
  return Effect.sync(() => clearImmediate(handle))
})

/**
 * Encodes a long message's text off the event loop (ModelTokenizer.encodeAhead), so that the
 * synchronous prompt assembly that follows finds it memoized: a message of 65,536 characters
 * takes 150–700 ms to encode. The text is the one the prompt's segments encode for it (as the
 * opening message, or after one); without segments, the message rendered through the template
 * as a prompt holds it (a reply between two user messages). A text the prompt then encodes
 * otherwise only costs the memo a miss: the prompt is encoded on the event loop, as before.
 */
const encodeMessageAhead = (tokenizer: ModelTokenizer, message: ChatMessage, opening: boolean): Effect.Effect<void> => {
  if (message.content.length < LONG_PIECE_CHARS) return Effect.void
  return Effect.suspend(() => {
    let text: string
    try {
      const segments = tokenizer.promptSegments
      text = segments !== undefined
        ? segments.text(message, opening)
        : tokenizer.renderChat(message.role === "assistant" ? [{ role: "user", content: "." }, message, { role: "user", content: "." }] : [message])
    } catch {
      return Effect.void
    }
    return tokenizer.encodeAhead(text)
  })
}

/**
 * Prompt sizes in tokens: `prompt` any prompt (the context less the room to generate),
 * `history` one that holds history (also within the budget).
 */
interface Limits {
  readonly prompt: number
  readonly history: number
}

/**
 * How long (ms) encoding may hold the event loop before it yields: a message is a template
 * render and an encode (~0.1-1 ms), so a count of messages would hold it for anything from
 * 1 to 10 ms; the service's fiber slice (EventLoopScheduler's default) is 2 ms.
 */
const ENCODE_SLICE_MS = 2

/**
 * Encodes the history messages the window can reach that are not encoded yet (a cold load's
 * last window: ~140 messages, ~120 ms), yielding the event loop every ENCODE_SLICE_MS
 * so that other requests are not held up behind it.
 */
const encodeWindow = (tokenizer: ModelTokenizer, segments: Segments, state: PromptState, limit: Limits): Effect.Effect<void> =>
  Effect.gen(function*() {
    const { history } = state
    const { historyIds } = state.cache
    const windowStart = state.windowStart ?? 0
    let total = 0
    let sliceStart = performance.now()
    for (let i = history.length - 1; i >= windowStart && total <= limit.history; i--) {
      let ids = historyIds[i]
      if (ids === undefined) {
        const message = history[i]!
        if (state.cache.lastUser?.content !== message.content) yield* encodeMessageAhead(tokenizer, message, false)
        ids = historyIds[i] = Uint32Array.from(historyPiece(segments, state.cache, history[i]!))
        if (performance.now() - sliceStart >= ENCODE_SLICE_MS) {
          yield* yieldToEventLoop
          sliceStart = performance.now()
        }
      }
      total += ids.length
    }
  })

type Segments = NonNullable<LoadedModel["tokenizer"]["promptSegments"]>

/**
 * A history message's ids after the prompt's first message. A reply is written as the model
 * generated it (`reply`: after the generation prompt), so that the next prompt extends the
 * last one plus its reply and their KV blocks are prefix-cache hits.
 */
const historyPiece = (segments: Segments, cache: PromptCache, message: ChatMessage): Array<number> =>
  message.role === "assistant"
    ? segments.reply(message)
    : message.role === "user" && cache.lastUser?.content === message.content
    ? cache.lastUser.ids
    : segments.middle(message)

/** The prompt by template segments: the ids and the first history message kept, or the size of the smallest prompt. */
const buildBySegments = (
  segments: Segments,
  state: PromptState,
  content: string,
  limits: Limits
): { readonly ids: Array<number>; readonly start: number } | { readonly numPromptTokens: number } => {
  const { history } = state
  const { cache } = state
  const { historyIds } = cache
  const windowStart = state.windowStart ?? 0
  const limit = limits.history
  const idsOf = (i: number): Uint32Array => historyIds[i] ??= Uint32Array.from(historyPiece(segments, cache, history[i]!))
  const systemPrompt = state.systemPrompt
  if (systemPrompt !== null && cache.system?.content !== systemPrompt) {
    cache.system = { content: systemPrompt, ids: segments.first({ role: "system", content: systemPrompt }) }
  }
  const system = systemPrompt === null ? undefined : cache.system!.ids
  const user: ChatMessage = { role: "user", content }
  const generation = segments.generationPrompt
  const fixed = (system?.length ?? 0) + generation.length
  let userIds = cache.lastUser?.content === content ? cache.lastUser.ids : segments.middle(user)
  cache.lastUser = { content, ids: userIds }
  // The smallest prompt: no history (the user message then opens it when there is no system prompt).
  const alone = system === undefined ? segments.first(user) : userIds
  if (fixed + alone.length > limits.prompt) return { numPromptTokens: fixed + alone.length }
  // Walk back from the newest message while it fits.
  let total = fixed + userIds.length
  let start = history.length
  while (start > windowStart && total + idsOf(start - 1).length <= limit) total += idsOf(--start).length
  // Without a system prompt the oldest message kept is encoded as the opener, which may be
  // shorter than its middle form: one more user message may fit that way.
  if (system === undefined && start > windowStart && history[start - 1]!.role === "user") {
    const opener = segments.first(history[start - 1]!)
    if (total + opener.length <= limit) {
      start--
      total += idsOf(start).length
    }
  }
  // Never start mid-exchange: a window cut short opens with a user message. One that starts
  // at the conversation's first message keeps it, whatever its role (an assistant's greeting).
  const skip = () => {
    if (start === 0) return
    while (start < history.length && history[start]!.role !== "user") total -= idsOf(start++).length
  }
  skip()
  let opening: ReadonlyArray<number> | undefined
  if (system === undefined) {
    for (;;) {
      if (start === history.length) {
        userIds = alone
        break
      }
      opening = segments.first(history[start]!)
      if (total - idsOf(start).length + opening.length <= limit) break
      total -= idsOf(start++).length
      skip()
      opening = undefined
    }
  }
  const ids: Array<number> = []
  if (system !== undefined) for (const id of system) ids.push(id)
  for (let i = start; i < history.length; i++) {
    const piece = i === start && opening !== undefined ? opening : idsOf(i)
    for (const id of piece) ids.push(id)
  }
  for (const id of userIds) ids.push(id)
  for (const id of generation) ids.push(id)
  return { ids, start }
}

/**
 * The whole prompt rendered through the chat template and encoded, keeping the longest
 * history that fits: history may start at its first message or at any user message. Assumes
 * a later start never renders longer, and searches from `hint` (the expected start) by
 * doubling steps and then bisection, so that a turn renders a few windows, not every prefix.
 */
const buildByRender = (
  model: LoadedModel,
  state: PromptState,
  content: string,
  limits: Limits,
  hint: number
): Effect.Effect<Array<number>, PromptTooLong> => {
  const system: Array<ChatMessage> = state.systemPrompt === null ? [] : [{ role: "system", content: state.systemPrompt }]
  const { history } = state
  const windowStart = state.windowStart ?? 0
  const starts: Array<number> = []
  for (let i = windowStart; i < history.length; i++) if (i === windowStart || history[i]!.role === "user") starts.push(i)
  starts.push(history.length) // no history
  const rendered = new Map<number, Array<number>>()
  const idsAt = (k: number): Array<number> => {
    let ids = rendered.get(k)
    if (ids === undefined) {
      const messages = [...system, ...history.slice(starts[k]), { role: "user" as const, content }]
      rendered.set(k, ids = model.tokenizer.encode(model.tokenizer.renderChat(messages)))
    }
    return ids
  }
  const last = starts.length - 1
  // Without history only the context bounds the prompt (a later start is never longer, so
  // `fits` stays monotone).
  const fits = (k: number) => idsAt(k).length <= (k === last ? limits.prompt : limits.history)
  let k0 = starts.findIndex((i) => i >= hint)
  if (k0 < 0) k0 = last
  // Invariant once found: fits(hi), and lo < 0 or !fits(lo).
  let lo = -1
  let hi = k0
  if (fits(k0)) {
    for (let step = 1; hi > 0; step *= 2) {
      const k = Math.max(0, hi - step)
      if (!fits(k)) {
        lo = k
        break
      }
      hi = k
    }
  } else {
    lo = k0
    for (let step = 1;; step *= 2) {
      const k = Math.min(last, lo + step)
      if (fits(k)) {
        hi = k
        break
      }
      if (k === last) {
        return Effect.fail(new PromptTooLong({ num_prompt_tokens: idsAt(last).length, max_model_len: model.maxModelLen }))
      }
      lo = k
    }
  }
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1
    if (fits(mid)) hi = mid
    else lo = mid
  }
  return Effect.succeed(idsAt(hi))
}
