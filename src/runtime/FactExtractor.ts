/**
 * The model call that mines a conversation for durable facts about its user (preferences,
 * name, places, constraints) for their long-term memory. `layerTest` is a deterministic
 * stand-in; the engine-backed layer is in src/actors/FactExtraction.ts.
 *
 * The prompt follows the memory-extraction step of Mem0 (Chhikara et al. 2025, "Mem0:
 * Building Production-Ready AI Agents with Scalable Long-Term Memory", §2.1): the recent
 * exchanges and the facts already kept in, new candidate facts out, one per line; equal
 * facts are merged by the store (case and surrounding spaces ignored).
 */
import { Context, Effect, Layer } from "effect"
import { type ConversationId, hasVisibleCharacter } from "./Domain.js"
import type { EngineError } from "./Errors.js"
import { type ChatMessage, encodeOffLoop, type ModelTokenizer } from "./Tokenizer.js"

export interface ExtractInput {
  readonly conversationId: ConversationId
  /** The pool whose model mines it. */
  readonly pool: string
  /** The recent turns, oldest first. */
  readonly messages: ReadonlyArray<ChatMessage>
  /** The facts the user has already (not to be repeated). */
  readonly existing: ReadonlyArray<string>
}

export class FactExtractor extends Context.Tag("chat/FactExtractor")<FactExtractor, {
  /** New facts, at most MAX_FACTS. EngineError: the model could not be run (retry later). */
  readonly extract: (input: ExtractInput) => Effect.Effect<ReadonlyArray<string>, EngineError>
}>() {}

/** Facts taken from one conversation at a time, at most. */
export const MAX_FACTS = 5
/** Tokens the model may write. */
export const EXTRACTION_MAX_TOKENS = 160

const INSTRUCTIONS = "You keep long-term memory about a user. From the conversation, list facts about the user " +
  "that will still be true and useful in later conversations: preferences, name, location, job, constraints. " +
  "Only facts the user stated. One per line, starting with \"- \". Do not repeat known facts. If there are none, write NONE."

/** Token ids of the extraction request, within `maxModelLen - EXTRACTION_MAX_TOKENS` (messages clipped, oldest dropped). */
export const extractionPrompt = (tokenizer: ModelTokenizer, maxModelLen: number, input: Pick<ExtractInput, "messages" | "existing">): Effect.Effect<Array<number>> =>
  Effect.gen(function*() {
    const room = maxModelLen - EXTRACTION_MAX_TOKENS
    let messages = input.messages
    // The newest known facts only: a user with many must still be mined.
    let existing = input.existing.slice(-50)
    for (let clip = 2000; ;) {
      const cut = (text: string) => text.length <= clip ? text : `${text.slice(0, clip)} …`
      const request = `Known facts:\n${existing.length === 0 ? "(none)" : existing.map((f) => `- ${cut(f)}`).join("\n")}\n\n` +
        `Conversation:\n${messages.map((m) => `${m.role === "user" ? "User" : "Assistant"}: ${cut(m.content)}`).join("\n")}\n\nNew facts:`
      const ids = yield* encodeOffLoop(tokenizer, tokenizer.renderChat([{ role: "system", content: INSTRUCTIONS }, { role: "user", content: request }]))
      if (ids.length <= room || messages.length === 0) return ids
      if (clip > 64) clip = Math.floor(clip / 2)
      else if (existing.length > 0) existing = existing.slice(Math.ceil(existing.length / 2))
      else messages = messages.slice(Math.ceil(messages.length / 2))
    }
  })

/**
 * The facts of a model's reply: its "- " lines (reasoning dropped), 3 to 200 characters,
 * not one of `existing` (ignoring case), at most MAX_FACTS.
 */
export const parseFacts = (reply: string, existing: ReadonlyArray<string>): Array<string> => {
  const known = new Set(existing.map((f) => f.trim().toLowerCase()))
  const facts: Array<string> = []
  for (const line of reply.replace(/<think>[\s\S]*?(<\/think>|$)/g, "").split("\n")) {
    const m = /^\s*[-*•]\s+(.+?)\s*$/.exec(line)
    const fact = m?.[1]
    if (fact === undefined || fact.length < 3 || fact.length > 200 || /^none\.?$/i.test(fact) || !hasVisibleCharacter(fact)) continue
    if (known.has(fact.toLowerCase())) continue
    known.add(fact.toLowerCase())
    facts.push(fact)
    if (facts.length === MAX_FACTS) break
  }
  return facts
}

/**
 * Deterministic facts without a model: each user sentence that starts with "I " or "My "
 * (as `parseFacts` would take a model's lines). `calls` counts the calls.
 */
export const layerTest = (calls: { count: number } = { count: 0 }) =>
  Layer.succeed(FactExtractor, {
    extract: (input) =>
      Effect.sync(() => {
        calls.count++
        const lines = input.messages
          .filter((m) => m.role === "user")
          .flatMap((m) => m.content.split(/(?<=[.!?])\s+/))
          .filter((s) => /^(I|My) /.test(s))
          .map((s) => `- ${s.replace(/[.!?]+$/, "")}`)
        return parseFacts(lines.join("\n"), input.existing)
      })
  })
