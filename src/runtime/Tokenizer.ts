/**
 * A model's tokenizer (tokenizer.json via @huggingface/tokenizers) and chat template
 * (tokenizer_config.json's `chat_template` via @huggingface/jinja), plus incremental
 * detokenization for streaming.
 */
import { readFile } from "node:fs/promises"
import { join } from "node:path"
import { Template } from "@huggingface/jinja"
import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers"
import { Effect, Schema } from "effect"
import { StorageError } from "./Errors.js"
import { packMergeRanks } from "./internal/mergeRanks.js"
import { packVocab, vocabArrayView } from "./internal/packedVocab.js"
import { offThreadEncoder } from "./internal/offThreadEncoder.js"
import { byteLevelDetokenizer, type Detokenizer, memoizedEncode, type TokenizerJson } from "./internal/tokenizerFastPaths.js"

export type { Detokenizer } from "./internal/tokenizerFastPaths.js"

export interface ChatMessage {
  readonly role: "system" | "user" | "assistant"
  readonly content: string
}

export interface ModelTokenizer {
  /** Token ids of `text`, no special tokens added (templates carry their own). */
  readonly encode: (text: string) => Array<number>
  /**
   * Encodes the pieces of `text` (the text between added tokens) not memoized yet on a worker
   * thread, when together they are LONG_PIECE_CHARS or more, and memoizes them, so that an
   * `encode` of text holding them that follows soon after does not hold the event loop. Never
   * fails: pieces the worker could not encode are left to `encode`. Does nothing where pieces
   * are not memoized.
   */
  readonly encodeAhead: (text: string) => Effect.Effect<void>
  /**
   * How many pieces of LONG_PIECE_CHARS or more were encoded on the event loop since load:
   * each a stall of up to hundreds of ms that `encodeAhead` did not prevent (a template that
   * writes a message otherwise than its segments, a worker that failed). 0 in a healthy runner.
   */
  readonly numLongPiecesEncodedOnLoop: () => number
  /** Text of `ids`, special tokens skipped. */
  readonly decode: (ids: ReadonlyArray<number>) => string
  /** The prompt string for `messages`, ending with the assistant's generation prompt. */
  readonly renderChat: (messages: ReadonlyArray<ChatMessage>) => string
  /**
   * Records that the assistant message `content` was generated as `ids` (its exact decoding,
   * end-of-sequence token excluded): later prompts that hold it use these ids instead of
   * encoding its text again. Prompts then carry the tokens the model produced, which can
   * differ from a fresh encoding of the same text.
   */
  readonly rememberAssistant: (content: string, ids: ReadonlyArray<number>) => void
  /** Streaming byte-level when exact for this tokenizer, else IncrementalDetokenizer. */
  readonly newDetokenizer: () => Detokenizer
  /**
   * The chat template as per-message token segments, when it is exactly that for this model
   * (checked at load): a prompt is then the concatenation of its messages' ids and the
   * generation prompt, so a conversation re-encodes only its new messages. `undefined` when
   * the template or the tokenizer is not additive; callers render the whole prompt instead.
   */
  readonly promptSegments: PromptSegments | undefined
}

/**
 * A chat template split into per-message pieces: `encode(renderChat(ms))` equals
 * `first(ms[0]) ++ middle(ms[1]) ++ … ++ middle(ms[n-1]) ++ generationPrompt` for every list
 * whose last message is a user message. Each piece ends right after an added token, where the
 * tokenizer splits text anyway, which is why the ids add up.
 */
export interface PromptSegments {
  /** Ids of a message that opens the prompt. */
  readonly first: (message: ChatMessage) => Array<number>
  /** Ids of a message after the first. */
  readonly middle: (message: ChatMessage) => Array<number>
  /** Ids after the last message: the assistant's generation prompt. */
  readonly generationPrompt: ReadonlyArray<number>
  /**
   * Ids of an assistant message after the first as the model generated it: the generation
   * prompt, then the reply and the end of message as `middle` writes them. The template may
   * render an earlier reply otherwise (Qwen3 drops the empty `<think>` block its generation
   * prompt holds); the next prompt then differs from the last one plus its reply right where
   * the reply starts, and no block of the reply or after it is a prefix-cache hit. Equals
   * `middle` where the template writes the two alike.
   */
  readonly reply: (message: ChatMessage) => Array<number>
  /** The text `first` (`opening`) or `middle` and `reply` (otherwise) encode for `message`. */
  readonly text: (message: ChatMessage, opening: boolean) => string
}

const TokenizerConfig = Schema.Struct({
  chat_template: Schema.optional(Schema.Union(Schema.String, Schema.Array(Schema.Struct({ name: Schema.String, template: Schema.String })))),
  bos_token: Schema.optional(Schema.NullOr(Schema.Union(Schema.String, Schema.Struct({ content: Schema.String })))),
  eos_token: Schema.optional(Schema.NullOr(Schema.Union(Schema.String, Schema.Struct({ content: Schema.String }))))
})

const tokenText = (t: string | { readonly content: string } | null | undefined): string =>
  t === undefined || t === null ? "" : typeof t === "string" ? t : t.content

/** Used when a checkpoint ships no chat template (ChatML, as Qwen models use). */
const CHATML_TEMPLATE =
  "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"

/**
 * Pieces this long (UTF-16 code units) are encoded off the event loop by `encodeAhead`: on
 * the main thread they would take up to ~10 ms (CJK text, 10 µs a character), more as they
 * grow.
 */
export const LONG_PIECE_CHARS = 1024

/**
 * `tokenizer.encode(text)` with the long pieces of `text` encoded on a worker thread first
 * (`encodeAhead`): for text that may hold long messages, encoded where the event loop must not
 * wait for it.
 */
export const encodeOffLoop = (tokenizer: ModelTokenizer, text: string): Effect.Effect<Array<number>> =>
  Effect.zipRight(tokenizer.encodeAhead(text), Effect.sync(() => tokenizer.encode(text)))

/**
 * Shrinks what a BPE tokenizer (@huggingface/tokenizers 0.2.0, `BPE`) keeps on the heap, which
 * every major GC of a serving process would otherwise mark again although it never changes:
 * - frees what it reads only while it loads: the merge list, once the library has built its
 *   rank map from it (kept twice, as its model's `merges` and in the tokenizer.json it holds:
 *   ~150 k two-string arrays for Qwen3), and tokenizer.json's vocabulary object (a
 *   151 k-property dictionary, 6 MB), once the library has built its own token → id map and
 *   id → token list and this module its byte table (`byteLevelDetokenizer`);
 * - packs its vocabulary (`packVocab`: token → id and id → token, ~151 k strings fewer) and
 *   its merge ranks (`packMergeRanks`: ~151 k key strings fewer) into typed arrays.
 */
const compactTables = (tokenizer: object, tokenizerJson: unknown) => {
  const model = (tokenizer as {
    model?: { merges?: unknown; bpe_ranks?: unknown; tokens_to_ids?: unknown; vocab?: unknown }
  }).model
  if (model === undefined || !(model.bpe_ranks instanceof Map) || !(model.tokens_to_ids instanceof Map) || !Array.isArray(model.vocab)) return
  if (Array.isArray(model.merges)) model.merges = []
  const vocab = packVocab(model.tokens_to_ids as Map<string, number>, model.vocab as Array<string | undefined>)
  model.bpe_ranks = packMergeRanks(model.bpe_ranks as Map<string, number>, vocab)
  model.tokens_to_ids = vocab
  model.vocab = vocabArrayView(vocab)
  const json = (tokenizerJson as { model?: { merges?: unknown; vocab?: unknown } } | null)?.model
  if (json === undefined) return
  if (Array.isArray(json.merges)) json.merges = []
  json.vocab = {}
}

/** Loads `tokenizer.json` and `tokenizer_config.json` from a Hugging Face model directory. */
export const load = (modelDir: string): Effect.Effect<ModelTokenizer, StorageError> =>
  Effect.gen(function*() {
    const read = (name: string) =>
      Effect.tryPromise({
        try: () => readFile(join(modelDir, name), "utf8").then((s) => JSON.parse(s) as unknown),
        catch: (e) => new StorageError({ message: `cannot read ${name} in ${modelDir}: ${String(e)}` })
      })
    const tokenizerJson = yield* read("tokenizer.json")
    const rawConfig = yield* read("tokenizer_config.json")
    const config = yield* Schema.decodeUnknown(TokenizerConfig)(rawConfig).pipe(
      Effect.mapError((e) => new StorageError({ message: `bad tokenizer_config.json: ${e.message}` }))
    )
    const tokenizer = new HfTokenizer(tokenizerJson as object, rawConfig as object)
    const source = config.chat_template === undefined
      ? CHATML_TEMPLATE
      : typeof config.chat_template === "string"
      ? config.chat_template
      : config.chat_template.find((t) => t.name === "default")?.template ?? config.chat_template[0]?.template ?? CHATML_TEMPLATE
    const template = new Template(source)
    const bos = tokenText(config.bos_token)
    const eos = tokenText(config.eos_token)
    let numLongOnLoop = 0
    const encodeRaw = (text: string) => {
      if (text.length >= LONG_PIECE_CHARS) numLongOnLoop++
      return tokenizer.encode(text, { add_special_tokens: false }).ids
    }
    const memo = memoizedEncode(tokenizerJson as TokenizerJson, encodeRaw)
    const encode = memo.encode
    const offThread = offThreadEncoder(modelDir)
    const encodeAhead = (text: string): Effect.Effect<void> => {
      if (!memo.memoized || text.length < LONG_PIECE_CHARS) return Effect.void
      // Added tokens inside the text cut it into pieces: many short ones cost as much as one
      // long one, so what counts is the length of those not memoized yet, together.
      const pieces = memo.split(text).filter((p, i) => i % 2 === 0 && p.length > 0 && !memo.has(p))
      if (pieces.reduce((n, p) => n + p.length, 0) < LONG_PIECE_CHARS) return Effect.void
      return Effect.tryPromise((signal) => offThread.encode(pieces, signal)).pipe(
        Effect.tap((encoded) => {
          for (const [i, piece] of pieces.entries()) memo.seed(piece, Array.from(encoded[i]!))
        }),
        Effect.ignore
      )
    }
    // The library rejects an empty list; an empty list is simply no text.
    const decode = (ids: ReadonlyArray<number>) =>
      ids.length === 0 ? "" : tokenizer.decode(ids as Array<number>, { skip_special_tokens: true })
    const byteLevel = byteLevelDetokenizer(tokenizerJson as TokenizerJson, rawConfig as Record<string, unknown>)
    compactTables(tokenizer, tokenizerJson)
    const renderChat = (messages: ReadonlyArray<ChatMessage>) =>
      template.render({
        messages: messages.map((m) => ({ role: m.role, content: m.content })),
        add_generation_prompt: true,
        enable_thinking: false,
        bos_token: bos,
        eos_token: eos
      })
    // Where an earlier assistant message's content sits in a rendered prompt: the piece
    // (text between added tokens) that holds it, as prefix + content + suffix.
    const marker = "\u0001assistant-content\u0001"
    const piece = memo.memoized
      ? memo.split(renderChat([{ role: "user", content: "u" }, { role: "assistant", content: marker }, { role: "user", content: "v" }]))
        .find((p, i) => i % 2 === 0 && p.includes(marker))
      : undefined
    const affix = piece === undefined ? undefined : (() => {
      const prefix = piece.slice(0, piece.indexOf(marker))
      const suffix = piece.slice(piece.indexOf(marker) + marker.length)
      return { prefix, suffix, prefixIds: encodeRaw(prefix), suffixIds: encodeRaw(suffix) }
    })()
    const promptSegments = memo.memoized ? derivePromptSegments(renderChat, encode, memo.split) : undefined
    return {
      encode,
      encodeAhead,
      numLongPiecesEncodedOnLoop: () => numLongOnLoop,
      decode,
      renderChat,
      promptSegments,
      rememberAssistant: (content, ids) => {
        if (affix === undefined || memo.split(content).length !== 1) return
        memo.seed(affix.prefix + content + affix.suffix, [...affix.prefixIds, ...ids, ...affix.suffixIds])
      },
      newDetokenizer: byteLevel ?? (() => new IncrementalDetokenizer(decode))
    } satisfies ModelTokenizer
  })

/**
 * Finds the per-message pieces of a chat template by rendering marker messages, then checks
 * them on sample conversations (with and without a system prompt) against the full render,
 * as strings and as ids. The text between two messages is split right after its first added
 * token, so every piece ends with an added token, where the tokenizer splits anyway.
 */
const derivePromptSegments = (
  renderChat: (messages: ReadonlyArray<ChatMessage>) => string,
  encode: (text: string) => Array<number>,
  split: (text: string) => Array<string>
): PromptSegments | undefined => {
  const m1 = "\u0002m1\u0002"
  const m2 = "\u0002m2\u0002"
  const m3 = "\u0002m3\u0002"
  const between = (text: string, a: string, b: string) => {
    const i = text.indexOf(a)
    const j = text.lastIndexOf(b)
    return i < 0 || j < i + a.length ? undefined : text.slice(i + a.length, j)
  }
  /** `joint` = post + pre, split right after its first added token. */
  const splitJoint = (joint: string): { post: string; pre: string } | undefined => {
    const parts = split(joint)
    if (parts.length < 2) return undefined
    const end = parts[0]!.length + parts[1]!.length
    return { post: joint.slice(0, end), pre: joint.slice(end) }
  }
  try {
    // Between two messages the template writes post(previous) + pre(next); the user
    // message's post and pre must be the same next to any message.
    let postUser: string | undefined
    let preUser: string | undefined
    for (const role of ["user", "assistant"] as const) {
      const r = renderChat([{ role: "user", content: m1 }, { role, content: m2 }, { role: "user", content: m3 }])
      const ja = splitJoint(between(r, m1, m2) ?? "")
      const jb = splitJoint(between(r, m2, m3) ?? "")
      if (ja === undefined || jb === undefined) return undefined
      postUser ??= ja.post
      preUser ??= jb.pre
      if (ja.post !== postUser || jb.pre !== preUser) return undefined
    }
    const sys = renderChat([{ role: "system", content: m2 }, { role: "user", content: m3 }])
    const jsys = splitJoint(between(sys, m2, m3) ?? "")
    if (jsys === undefined || jsys.pre !== preUser) return undefined
    const alone = renderChat([{ role: "user", content: m3 }])
    const tail = alone.slice(alone.lastIndexOf(m3) + m3.length)
    if (!tail.startsWith(postUser!)) return undefined
    const generation = tail.slice(postUser!.length)
    // A message's piece is cut out of a render of it between two marker messages (or before
    // one, for the opening message): whatever the template does to content (Qwen3 drops an
    // earlier reply's <think> block) is then done here too.
    const text = (m: ChatMessage, first: boolean) => {
      if (first) {
        const r = renderChat([m, { role: "user", content: m3 }])
        return r.slice(0, r.lastIndexOf(m3) - preUser!.length)
      }
      const r = renderChat([{ role: "user", content: m1 }, m, { role: "user", content: m3 }])
      return r.slice(r.indexOf(m1) + m1.length + postUser!.length, r.lastIndexOf(m3) - preUser!.length)
    }
    const middle = (m: ChatMessage) => encode(text(m, false))
    const generationPrompt = encode(generation)
    // What the template writes before a reply's text; the generation prompt starts with it
    // and may add more (an empty <think> block).
    const replyText = text({ role: "assistant", content: m2 }, false)
    const replyHead = replyText.slice(0, replyText.indexOf(m2))
    const replyHeadIds = generation.startsWith(replyHead) && generation.length > replyHead.length ? encode(replyHead) : undefined
    const segments: PromptSegments = {
      first: (m) => encode(text(m, true)),
      middle,
      generationPrompt,
      reply: (m) => {
        const ids = middle(m)
        if (replyHeadIds === undefined || replyHeadIds.some((id, i) => ids[i] !== id)) return ids
        return [...generationPrompt, ...ids.slice(replyHeadIds.length)]
      },
      text
    }
    // Checked on sample conversations, with and without a system prompt.
    const sample: Array<ChatMessage> = [
      { role: "system", content: "You are terse.\nAnswer in English." },
      { role: "user", content: "Hi there! <b>bold</b>" },
      { role: "assistant", content: "Hello. How can I help?" },
      { role: "user", content: "Tell me\n\na story, 2 lines." },
      { role: "assistant", content: "<think>\nplan\n</think>\n\n Once upon a time…\nThe end." },
      { role: "user", content: "thanks" }
    ]
    for (const messages of [sample, sample.slice(1), sample.slice(3)]) {
      const rendered = renderChat(messages)
      if (messages.map((m, i) => text(m, i === 0)).join("") + generation !== rendered) return undefined
      const ids = [...messages.flatMap((m, i) => i === 0 ? segments.first(m) : segments.middle(m)), ...segments.generationPrompt]
      const expected = encode(rendered)
      if (ids.length !== expected.length || ids.some((id, i) => id !== expected[i])) return undefined
    }
    return segments
  } catch {
    return undefined
  }
}

/**
 * Turns a growing list of token ids into text deltas without ever emitting a broken UTF-8
 * sequence: a multi-byte character split over several byte-level tokens decodes to U+FFFD
 * until its last token arrives, so such a delta is held back. Algorithm of Hugging Face
 * text-generation-inference / vLLM `detokenize_incrementally` (prefix and read offsets).
 */
export class IncrementalDetokenizer implements Detokenizer {
  private readonly ids: Array<number> = []
  private prefixOffset = 0
  private readOffset = 0

  constructor(private readonly decode: (ids: ReadonlyArray<number>) => string) {}

  /** Appends one token; returns the newly completed text ("" while a character is incomplete). */
  push(tokenId: number): string {
    this.ids.push(tokenId)
    const prefixText = this.decode(this.ids.slice(this.prefixOffset, this.readOffset))
    const newText = this.decode(this.ids.slice(this.prefixOffset))
    if (newText.length > prefixText.length && !newText.endsWith("\uFFFD")) {
      this.prefixOffset = this.readOffset
      this.readOffset = this.ids.length
      return newText.slice(prefixText.length)
    }
    return ""
  }

  /** Whatever is still held back at the end of the stream (may contain U+FFFD). */
  flush(): string {
    const prefixText = this.decode(this.ids.slice(this.prefixOffset, this.readOffset))
    const rest = this.decode(this.ids.slice(this.prefixOffset))
    this.prefixOffset = this.readOffset = this.ids.length
    return rest.length > prefixText.length ? rest.slice(prefixText.length) : ""
  }
}
