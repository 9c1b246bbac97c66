/**
 * The model call behind a conversation's running summary: the previous summary and the turns
 * after it in, the updated summary out. `layerTest` is a deterministic stand-in (no model);
 * the engine-backed layer is in src/actors/Summaries.ts (it takes a DecodeSlot of a pool).
 *
 * Hierarchical summarisation in the sense of MemGPT's recursive summary (Packer et al. 2023,
 * "MemGPT: Towards LLMs as Operating Systems", §2.2): each summary is written from the one
 * before and the turns since, so its length stays bounded by `summary_max_tokens` however
 * many turns it covers.
 */
import { Context, Effect, Layer } from "effect"
import type { ConversationId } from "./Domain.js"
import type { EngineError } from "./Errors.js"
import { type ChatMessage, encodeOffLoop, type ModelTokenizer } from "./Tokenizer.js"

export interface SummarizeInput {
  readonly conversationId: ConversationId
  /** The pool whose model writes it. */
  readonly pool: string
  /** The summary so far (of the turns before `messages`), null for the first. */
  readonly previous: string | null
  /** The turns to fold in, oldest first. */
  readonly messages: ReadonlyArray<ChatMessage>
  /** The summary's length cap, in tokens. */
  readonly maxTokens: number
}

export class Summarizer extends Context.Tag("chat/Summarizer")<Summarizer, {
  /** The updated summary text. EngineError: the model could not be run (retry later). */
  readonly summarize: (input: SummarizeInput) => Effect.Effect<string, EngineError>
}>() {}

const INSTRUCTIONS = "You keep the running summary of a conversation between a user and an assistant. " +
  "Rewrite the summary so far with the new turns folded in. Keep every fact, name, number, decision, " +
  "preference and open question a later reply may need; drop greetings and small talk. Plain text, no preamble."

/** Turns one summary folds in, at most (the latest). */
const MAX_FOLDED_MESSAGES = 200

/** Characters kept of one message when the request would not fit the summarising model's context. */
const MIN_CLIP_CHARS = 64

/**
 * Token ids of the summarisation request for the model of `tokenizer`: instructions, the
 * previous summary and the new turns, within `maxModelLen - maxTokens`. Long messages are
 * clipped (from 4,000 characters, halving down to MIN_CLIP_CHARS) until it fits; past that the
 * older half of the turns is left out, until it fits (at most MAX_FOLDED_MESSAGES go in).
 */
export const summaryPrompt = (
  tokenizer: ModelTokenizer,
  maxModelLen: number,
  input: Pick<SummarizeInput, "previous" | "messages" | "maxTokens">
): Effect.Effect<Array<number>> =>
  Effect.gen(function*() {
    const room = maxModelLen - input.maxTokens
    // A first summary of a long conversation: its latest turns only (the older ones are far
    // past any prompt's window anyway).
    let messages = input.messages.slice(-MAX_FOLDED_MESSAGES)
    for (let clip = 4000; ;) {
      const cut = (text: string) => text.length <= clip ? text : `${text.slice(0, clip)} …`
      const turns = messages.map((m) => `${m.role === "user" ? "User" : "Assistant"}: ${cut(m.content)}`).join("\n")
      const request = `Summary so far:\n${input.previous === null ? "(none)" : cut(input.previous)}\n\n` +
        `New turns:\n${turns}\n\nWrite the updated summary in at most ${Math.round(input.maxTokens * 0.7)} words.`
      const ids = yield* encodeOffLoop(tokenizer, tokenizer.renderChat([{ role: "system", content: INSTRUCTIONS }, { role: "user", content: request }]))
      if (ids.length <= room || messages.length === 0) return ids
      if (clip > MIN_CLIP_CHARS) clip = Math.max(MIN_CLIP_CHARS, Math.floor(clip / 2))
      else messages = messages.slice(Math.ceil(messages.length / 2))
    }
  })

/** The model's reply as a summary: reasoning (`<think>` blocks) dropped, spaces trimmed. */
export const summaryText = (reply: string): string =>
  reply.replace(/<think>[\s\S]*?(<\/think>|$)/g, "").trim()

/** Characters a `layerTest` summary keeps (its newest). */
const TEST_SUMMARY_CHARS = 600

/**
 * Deterministic summaries without a model: the previous summary followed by each turn's first
 * eight words, cut to its last TEST_SUMMARY_CHARS characters. `calls` counts the calls.
 */
export const layerTest = (calls: { count: number } = { count: 0 }) =>
  Layer.succeed(Summarizer, {
    summarize: (input) =>
      Effect.sync(() => {
        calls.count++
        const lines = input.messages.map((m) => `${m.role}: ${m.content.split(/\s+/).slice(0, 8).join(" ")}`)
        const text = [...(input.previous === null ? [] : [input.previous]), ...lines].join("\n")
        return text.slice(Math.max(0, text.length - TEST_SUMMARY_CHARS))
      })
  })
