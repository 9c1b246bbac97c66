/**
 * One conversation: its history (older pages load as the user scrolls up), the reply being
 * streamed (resumed by itself after a drop or a reload), the composer, Stop, and Share.
 */
import { useEffect, useLayoutEffect, useRef, useState } from "preact/hooks"
import { ApiError, type Client, type FollowEnd, followTurn, type HistoryPage, type Turn, type TurnEvent, unlessNoContent } from "../lib/api.js"
import { randomId } from "../lib/ids.js"
import { renderMarkdown } from "../lib/markdown.js"
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
  /** The first page of history is shown: before that a sent message would be overwritten by it. */
  const [ready, setReady] = useState(false)
  const [streaming, setStreaming] = useState(false)
  const [draft, setDraft] = useState("")
  const [notice, setNotice] = useState<string | undefined>()
  const [shareLink, setShareLink] = useState<string | undefined>()
  const scroller = useRef<HTMLDivElement>(null)
  const stickToBottom = useRef(true)
  const keepOffset = useRef<number | undefined>(undefined)
  const live = useRef(true)
  /** Aborts this view's requests and streams when it goes (another conversation, sign-out). */
  const aborter = useRef(new AbortController())
  const base = `/v1/conversations/${encodeURIComponent(conversationId)}`

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
  const streamInto = async (open: (lastEventId: string | undefined, attempt: number) => Promise<Response | undefined>, sentAt: number | undefined): Promise<FollowEnd | "failed"> => {
    setStreaming(true)
    let firstAt: number | undefined
    let sawToken = false
    let end: FollowEnd | "failed" = "failed"
    try {
      end = await followTurn(open, {
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
      }, aborter.current.signal)
    } catch (e) {
      if (live.current) patchLast((m) => ({ ...m, streaming: false, note: describeError(e) }))
    } finally {
      if (live.current) {
        setStreaming(false)
        setNotice(undefined)
        patchLast((m) => m.streaming === true ? { ...m, streaming: false } : m)
      }
    }
    return end
  }

  /** The newest page of the history in place of what is shown (the store has the last word). */
  const reloadNewest = () =>
    client.request<HistoryPage>("GET", `${base}?limit=${PAGE}`).then((page) => {
      if (!live.current) return
      setMessages(page.turns.filter((t) => t.role !== "system").map(fromTurn))
      setCursor(page.next_cursor)
    }).catch((e) => live.current && onError(e))

  /** `GET …/stream`: the turn in flight from its start, or after `lastEventId`; undefined for a 204. */
  const openStream = async (lastEventId: string | undefined) =>
    unlessNoContent(await client.open("GET", `${base}/stream`, undefined, lastEventId === undefined ? {} : { "last-event-id": lastEventId }, aborter.current.signal))

  // Open: the newest page; a user turn without its reply means one is being written (maybe
  // by a stream this page lost in a reload): follow it from its start.
  useEffect(() => {
    live.current = true
    aborter.current = new AbortController()
    stickToBottom.current = true
    setMessages([])
    setShareLink(undefined)
    setLoading(true)
    setReady(false)
    client.request<HistoryPage>("GET", `${base}?limit=${PAGE}`).then((page) => {
      if (!live.current) return
      setMessages(page.turns.filter((t) => t.role !== "system").map(fromTurn))
      setCursor(page.next_cursor)
      setLoading(false)
      setReady(true)
      if (page.turns.at(-1)?.role === "user") {
        setMessages((all) => [...all, { key: `pending-${randomId()}`, role: "assistant", content: "", streaming: true }])
        // 204: it ended meanwhile: show the stored reply.
        void streamInto(openStream, undefined).then((end) => end === "nothing" && reloadNewest())
      }
    }).catch((e) => {
      if (live.current) {
        setLoading(false)
        onError(e)
      }
    })
    return () => {
      live.current = false
      aborter.current.abort()
    }
  }, [conversationId])

  const loadOlder = () => {
    if (cursor === null || loading) return
    setLoading(true)
    client.request<HistoryPage>("GET", `${base}?limit=${PAGE}&before=${encodeURIComponent(cursor)}`).then((page) => {
      if (!live.current) return
      const el = scroller.current
      if (el !== null) keepOffset.current = el.scrollHeight - el.scrollTop
      setMessages((all) => [...page.turns.filter((t) => t.role !== "system").map(fromTurn), ...all])
      setCursor(page.next_cursor)
      setLoading(false)
    }).catch((e) => {
      if (!live.current) return
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
    if (content.length === 0 || streaming || !ready) return
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
    const post = () =>
      client.open("POST", `${base}/turns`, { role: "user", content }, { "idempotency-key": idempotencyKey }, aborter.current.signal).then(unlessNoContent)
    let refused = false
    const end = await streamInto(async (lastEventId, attempt) => {
      if (lastEventId !== undefined) return openStream(lastEventId)
      if (attempt === 0) {
        try {
          return await post()
        } catch (e) {
          // Refused (429, moderation, …): nothing was stored.
          if (e instanceof ApiError) refused = true
          throw e
        }
      }
      // Dropped before any token: the same POST again takes the turn if the first never
      // arrived, and answers with its stream if it did. Refused now (the turn is still being
      // set up, its stream expired, a rate limit), the first one may have been taken: follow
      // whatever turn is in flight, else show the history.
      try {
        return await post()
      } catch (e) {
        if (e instanceof ApiError) return openStream(undefined)
        throw e
      }
    }, sentAt)
    onActivity()
    if (!live.current) return
    if (refused) {
      // Give the text back to edit, with the reason under it.
      setMessages((all) => {
        const reply = all.at(-1)
        return [...all.slice(0, -2), { ...all.at(-2)!, note: reply?.note ?? "Not sent" }]
      })
      setDraft(content)
    } else if (end === "nothing") void reloadNewest()
  }

  const stop = () => {
    if (!streaming) return
    client.request("POST", `${base}/cancel`, {}).catch(onError)
  }

  const share = () => {
    client.request<{ share_id: string }>("POST", `${base}/share`, {}).then((s) => {
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
          disabled={!ready}
          onInput={(e) => setDraft((e.target as HTMLTextAreaElement).value)}
          onKeyDown={onKeyDown}
          aria-label="Message"
        />
        {streaming
          ? <button type="button" class="stop" onClick={stop}>Stop</button>
          : <button type="submit" class="send" disabled={!ready || draft.trim().length === 0}>Send</button>}
      </form>
    </section>
  )
}
