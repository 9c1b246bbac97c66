/**
 * One conversation: its history (older pages load as the user scrolls up), the reply being
 * streamed (resumed by itself after a drop or a reload), the composer, Stop, and Share.
 */
import { useEffect, useLayoutEffect, useRef, useState } from "preact/hooks"
import { type Client, followTurn, type HistoryPage, type Turn, type TurnEvent, unlessNoContent } from "../shared/api.js"
import { randomId } from "../shared/ids.js"
import { renderMarkdown } from "../shared/markdown.js"
import { describeError, describeStreamError } from "./errors.js"

interface Message {
  readonly key: string
  readonly role: "user" | "assistant" | "system"
  readonly content: string
  readonly status?: string
  readonly streaming?: boolean
  /** A sentence shown under the message (an error, a stop). */
  readonly note?: string
  readonly stats?: { readonly ttftMs: number | undefined; readonly tokPerS: number | undefined }
}

const PAGE = 30

const fromTurn = (t: Turn): Message => ({
  key: t.turn_id,
  role: t.role,
  content: t.content,
  status: t.status,
  ...(t.status === "cancelled" ? { note: "Stopped" } : t.status === "failed" ? { note: "The reply failed." } : t.status === "filtered" ? { note: "The reply was stopped by content moderation." } : {})
})

const MessageView = ({ m }: { m: Message }) => (
  <div class={`msg ${m.role}${m.streaming === true ? " streaming" : ""}`} data-role={m.role} data-status={m.status ?? ""}>
    {m.role === "assistant"
      ? <div class="body markdown" dangerouslySetInnerHTML={{ __html: renderMarkdown(m.content) }} />
      : <div class="body plain">{m.content}</div>}
    {m.note !== undefined && <div class="note">{m.note}</div>}
    {m.stats !== undefined && (
      <div class="stats" title="time to first token, and output tokens per second">
        {m.stats.ttftMs !== undefined && `TTFT ${Math.round(m.stats.ttftMs)} ms`}
        {m.stats.ttftMs !== undefined && m.stats.tokPerS !== undefined && " · "}
        {m.stats.tokPerS !== undefined && `${m.stats.tokPerS.toFixed(1)} tok/s`}
      </div>
    )}
  </div>
)

export const ChatView = ({ client, conversationId, model, onError, onActivity }: {
  client: Client
  conversationId: string
  model: string | undefined
  onError: (e: unknown) => void
  /** A turn was sent (`content`; the list shows the first as the title), or its reply ended (no argument). */
  onActivity: (content?: string) => void
}) => {
  const [messages, setMessages] = useState<ReadonlyArray<Message>>([])
  const [cursor, setCursor] = useState<string | null>(null)
  const [loading, setLoading] = useState(true)
  const [streaming, setStreaming] = useState(false)
  const [draft, setDraft] = useState("")
  const [notice, setNotice] = useState<string | undefined>()
  const [shareLink, setShareLink] = useState<string | undefined>()
  const scroller = useRef<HTMLDivElement>(null)
  const stickToBottom = useRef(true)
  const keepOffset = useRef<number | undefined>(undefined)
  const live = useRef(true)

  const scrollToBottom = () => {
    const el = scroller.current
    if (el !== null && stickToBottom.current) el.scrollTop = el.scrollHeight
  }
  useLayoutEffect(() => {
    const el = scroller.current
    if (el === null) return
    if (keepOffset.current !== undefined) {
      // Older turns were put above: keep what the user was looking at in place.
      el.scrollTop = el.scrollHeight - keepOffset.current
      keepOffset.current = undefined
    } else scrollToBottom()
  }, [messages])

  /** Updates the reply being streamed (the last message). */
  const patchLast = (f: (m: Message) => Message) =>
    setMessages((all) => all.length === 0 ? all : [...all.slice(0, -1), f(all[all.length - 1]!)])

  /** Reads a turn's events into the last message, timing its first token and rate. */
  const streamInto = async (open: (lastEventId: string | undefined, attempt: number) => Promise<Response | undefined>, sentAt: number | undefined) => {
    setStreaming(true)
    let firstAt: number | undefined
    let sawToken = false
    try {
      await followTurn(open, {
        onReconnect: (n) => live.current && setNotice(`Connection lost; resuming the reply (attempt ${n})…`),
        onEvent: (e: TurnEvent) => {
          if (!live.current) return
          setNotice(undefined)
          if (e.kind === "token") {
            if (!sawToken) firstAt = performance.now()
            sawToken = true
            patchLast((m) => ({ ...m, content: m.content + e.text }))
          } else if (e.kind === "done") {
            const now = performance.now()
            const seconds = firstAt === undefined ? 0 : (now - firstAt) / 1000
            const stats = {
              ttftMs: sentAt === undefined || firstAt === undefined ? undefined : firstAt - sentAt,
              tokPerS: seconds > 0 && e.usage.completion_tokens > 1 ? (e.usage.completion_tokens - 1) / seconds : undefined
            }
            const note = e.finishReason === "cancelled"
              ? "Stopped"
              : e.finishReason === "content_filter"
              ? "The reply was stopped by content moderation."
              : e.finishReason === "length"
              ? "The reply reached its length limit."
              : undefined
            patchLast((m) => ({ ...m, key: e.turnId, streaming: false, stats, ...(note === undefined ? {} : { note }) }))
          } else {
            patchLast((m) => ({ ...m, streaming: false, note: describeStreamError(e.code, e.message) }))
          }
        }
      })
    } catch (e) {
      if (live.current) patchLast((m) => ({ ...m, streaming: false, note: describeError(e) }))
    } finally {
      if (live.current) {
        setStreaming(false)
        setNotice(undefined)
        patchLast((m) => m.streaming === true ? { ...m, streaming: false } : m)
      }
    }
  }

  // Open: the newest page; a user turn without its reply means one is being written (maybe
  // by a stream this page lost in a reload): follow it from its start.
  useEffect(() => {
    live.current = true
    stickToBottom.current = true
    setMessages([])
    setShareLink(undefined)
    setLoading(true)
    client.request<HistoryPage>("GET", `/v1/conversations/${conversationId}?limit=${PAGE}`).then((page) => {
      if (!live.current) return
      setMessages(page.turns.filter((t) => t.role !== "system").map(fromTurn))
      setCursor(page.next_cursor)
      setLoading(false)
      if (page.turns.at(-1)?.role === "user") {
        setMessages((all) => [...all, { key: `pending-${randomId()}`, role: "assistant", content: "", streaming: true }])
        void streamInto(async (lastEventId) =>
          unlessNoContent(await client.open("GET", `/v1/conversations/${conversationId}/stream`, undefined, lastEventId === undefined ? {} : { "last-event-id": lastEventId })), undefined).then(() =>
          // 204 (it ended meanwhile) leaves an empty reply: show the stored one.
          setMessages((all) => {
            if (all.at(-1)?.content !== "") return all
            void client.request<HistoryPage>("GET", `/v1/conversations/${conversationId}?limit=${PAGE}`).then((p) =>
              live.current && setMessages(p.turns.filter((t) => t.role !== "system").map(fromTurn)))
            return all
          })
        )
      }
    }).catch((e) => {
      if (live.current) {
        setLoading(false)
        onError(e)
      }
    })
    return () => {
      live.current = false
    }
  }, [conversationId])

  const loadOlder = () => {
    if (cursor === null || loading) return
    setLoading(true)
    client.request<HistoryPage>("GET", `/v1/conversations/${conversationId}?limit=${PAGE}&before=${encodeURIComponent(cursor)}`).then((page) => {
      if (!live.current) return
      const el = scroller.current
      if (el !== null) keepOffset.current = el.scrollHeight - el.scrollTop
      setMessages((all) => [...page.turns.filter((t) => t.role !== "system").map(fromTurn), ...all])
      setCursor(page.next_cursor)
      setLoading(false)
    }).catch((e) => {
      setLoading(false)
      onError(e)
    })
  }

  const onScroll = () => {
    const el = scroller.current
    if (el === null) return
    stickToBottom.current = el.scrollHeight - el.scrollTop - el.clientHeight < 40
    if (el.scrollTop < 60) loadOlder()
  }

  const send = async () => {
    const content = draft.trim()
    if (content.length === 0 || streaming) return
    const idempotencyKey = randomId()
    setDraft("")
    stickToBottom.current = true
    setMessages((all) => [
      ...all,
      { key: `user-${idempotencyKey}`, role: "user", content },
      { key: `pending-${idempotencyKey}`, role: "assistant", content: "", streaming: true }
    ])
    const sentAt = performance.now()
    onActivity(content)
    let failedBeforeStream = false
    await streamInto(async (lastEventId) => {
      try {
        // Before any token, the same POST again: the server knows the key and answers with
        // that turn's stream if the first one got through.
        if (lastEventId === undefined) {
          return unlessNoContent(await client.open("POST", `/v1/conversations/${conversationId}/turns`, { role: "user", content }, { "idempotency-key": idempotencyKey }))
        }
        return unlessNoContent(await client.open("GET", `/v1/conversations/${conversationId}/stream`, undefined, { "last-event-id": lastEventId }))
      } catch (e) {
        if (lastEventId === undefined && !(e instanceof TypeError)) failedBeforeStream = true
        throw e
      }
    }, sentAt)
    onActivity()
    if (failedBeforeStream && live.current) {
      // Refused (429, moderation, …): nothing was stored; give the text back to edit.
      setMessages((all) => {
        const reply = all.at(-1)
        return [...all.slice(0, -2), { ...all.at(-2)!, note: reply?.note ?? "Not sent" }]
      })
      setDraft(content)
    }
  }

  const stop = () => {
    if (!streaming) return
    client.request("POST", `/v1/conversations/${conversationId}/cancel`, {}).catch(onError)
  }

  const share = () => {
    client.request<{ share_id: string }>("POST", `/v1/conversations/${conversationId}/share`, {}).then((s) => {
      const link = `${location.origin}/#/shared/${s.share_id}`
      setShareLink(link)
      navigator.clipboard?.writeText(link).catch(() => {})
    }).catch(onError)
  }

  const onKeyDown = (e: KeyboardEvent) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault()
      void send()
    }
  }
  // Esc stops the reply wherever the focus is.
  useEffect(() => {
    const onEsc = (e: KeyboardEvent) => e.key === "Escape" && stop()
    window.addEventListener("keydown", onEsc)
    return () => window.removeEventListener("keydown", onEsc)
  })

  return (
    <section class="chat">
      <header class="chat-head">
        <span class="model" title="model">{model ?? ""}</span>
        <button type="button" class="ghost" onClick={share} title="Make a read-only link to this conversation">Share</button>
      </header>
      {shareLink !== undefined && (
        <div class="share-link">
          Read-only link (copied): <a href={shareLink} target="_blank" rel="noopener noreferrer">{shareLink}</a>
        </div>
      )}
      <div class="messages" ref={scroller} onScroll={onScroll}>
        {cursor !== null && <div class="older">{loading ? "Loading older messages…" : <button type="button" class="ghost" onClick={loadOlder}>Load older messages</button>}</div>}
        {messages.length === 0 && !loading && <div class="empty">Send a message to start.</div>}
        {messages.map((m) => <MessageView key={m.key} m={m} />)}
      </div>
      {notice !== undefined && <div class="notice" role="status">{notice}</div>}
      <form class="composer" onSubmit={(e) => { e.preventDefault(); void send() }}>
        <textarea
          value={draft}
          placeholder="Message (Enter to send, Shift+Enter for a new line, Esc to stop)"
          rows={2}
          maxLength={100_000}
          onInput={(e) => setDraft((e.target as HTMLTextAreaElement).value)}
          onKeyDown={onKeyDown}
          aria-label="Message"
        />
        {streaming
          ? <button type="button" class="stop" onClick={stop}>Stop</button>
          : <button type="submit" class="send" disabled={draft.trim().length === 0}>Send</button>}
      </form>
    </section>
  )
}
