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
import { byteLevelDetokenizer, type Detokenizer, memoizedEncode, type TokenizerJson } from "./internal/tokenizerFastPaths.js"

export type { Detokenizer } from "./internal/tokenizerFastPaths.js"

export interface ChatMessage {
  readonly role: "system" | "user" | "assistant"
  readonly content: string
}

export interface ModelTokenizer {
  /** Token ids of `text`, no special tokens added (templates carry their own). */
  readonly encode: (text: string) => Array<number>
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
    const encodeRaw = (text: string) => tokenizer.encode(text, { add_special_tokens: false }).ids
    const memo = memoizedEncode(tokenizerJson as TokenizerJson, encodeRaw)
    const encode = memo.encode
    // The library rejects an empty list; an empty list is simply no text.
    const decode = (ids: ReadonlyArray<number>) =>
      ids.length === 0 ? "" : tokenizer.decode(ids as Array<number>, { skip_special_tokens: true })
    const byteLevel = byteLevelDetokenizer(tokenizerJson as TokenizerJson, rawConfig as Record<string, unknown>)
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
    return {
      encode,
      decode,
      renderChat,
      rememberAssistant: (content, ids) => {
        if (affix === undefined || memo.split(content).length !== 1) return
        memo.seed(affix.prefix + content + affix.suffix, [...affix.prefixIds, ...ids, ...affix.suffixIds])
      },
      newDetokenizer: byteLevel ?? (() => new IncrementalDetokenizer(decode))
    } satisfies ModelTokenizer
  })

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
