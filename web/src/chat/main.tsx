/**
 * The chat page (`/`): sign-in with an API key or token (kept in localStorage), the user's
 * conversations, one conversation's chat, the memory panel, and shared conversations
 * (`#/shared/<id>`). Routes are in the URL hash: `#/c/<conversation_id>`, `#/memory`.
 */
import { render } from "preact"
import { useEffect, useState } from "preact/hooks"
import { ApiError, type Client, type ConversationListItem, makeClient } from "../lib/api.js"
import { chatKey } from "../lib/storage.js"
import { ChatView } from "./ChatView.js"
import { describeError } from "./errors.js"
import { MemoryPanel } from "./MemoryPanel.js"
import { SharedView } from "./SharedView.js"
import "./styles.css"

interface Me {
  readonly user_id: string
  readonly tier: string
  readonly admin: boolean
  readonly default_model: string
  readonly models: ReadonlyArray<string>
}

/** The id in `#/c/<id>` or `#/shared/<id>`, when it is one (ids go into API paths: nothing else may). */
const idIn = (hash: string, prefix: string, pattern: RegExp): string | undefined => {
  if (!hash.startsWith(prefix)) return undefined
  try {
    const id = decodeURIComponent(hash.slice(prefix.length))
    return pattern.test(id) ? id : undefined
  } catch {
    return undefined
  }
}
const CONVERSATION_ID = /^[A-Za-z0-9_-]{1,64}$/
const SHARE_ID = /^share_[0-9a-f]{32}$/

const useHash = (): string => {
  const [hash, setHash] = useState(location.hash)
  useEffect(() => {
    const on = () => setHash(location.hash)
    window.addEventListener("hashchange", on)
    return () => window.removeEventListener("hashchange", on)
  }, [])
  return hash
}

const SignIn = ({ error, onKey }: { error: string | undefined; onKey: (key: string) => void }) => {
  const [draft, setDraft] = useState("")
  return (
    <main class="signin">
      <form onSubmit={(e) => { e.preventDefault(); if (draft.trim() !== "") onKey(draft.trim()) }}>
        <h1>Sign in</h1>
        <p>Paste your API key or access token. It is kept in this browser only.</p>
        {error !== undefined && <div class="banner error" role="alert">{error}</div>}
        <input type="password" autocomplete="off" value={draft} placeholder="API key or token" aria-label="API key or token" onInput={(e) => setDraft((e.target as HTMLInputElement).value)} />
        <button type="submit" disabled={draft.trim() === ""}>Sign in</button>
      </form>
    </main>
  )
}

const Sidebar = ({ me, conversations, more, current, open, onNew, onDelete, onMore, onSignOut }: {
  me: Me
  conversations: ReadonlyArray<ConversationListItem>
  more: boolean
  current: string | undefined
  open: boolean
  onNew: (model: string | undefined) => void
  onDelete: (id: string) => void
  onMore: () => void
  onSignOut: () => void
}) => {
  const [model, setModel] = useState(me.default_model)
  return (
    <nav class={`sidebar${open ? " open" : ""}`} aria-label="Conversations">
      <div class="new">
        <button type="button" class="primary" onClick={() => onNew(model === me.default_model ? undefined : model)}>New chat</button>
        {me.models.length > 1 && (
          <select value={model} aria-label="Model" onChange={(e) => setModel((e.target as HTMLSelectElement).value)}>
            {me.models.map((m) => <option key={m} value={m}>{m}</option>)}
          </select>
        )}
      </div>
      <ul class="conversations">
        {conversations.map((c) => (
          <li key={c.conversation_id} class={c.conversation_id === current ? "current" : ""} data-conversation-id={c.conversation_id}>
            <a href={`#/c/${c.conversation_id}`} title={c.title}>{c.title === "" ? "New conversation" : c.title}</a>
            <button type="button" class="ghost delete" aria-label="Delete conversation" title="Delete" onClick={() => { if (confirm("Delete this conversation? This cannot be undone.")) onDelete(c.conversation_id) }}>×</button>
          </li>
        ))}
      </ul>
      {more && <button type="button" class="ghost" onClick={onMore}>Load more</button>}
      <div class="me">
        <a href="#/memory">Memory</a>
        {me.admin && <a href="/ops">Operations</a>}
        <span class="who" title={me.user_id}>{me.user_id} · {me.tier} tier</span>
        <button type="button" class="ghost" onClick={onSignOut}>Sign out</button>
      </div>
    </nav>
  )
}

const App = () => {
  const hash = useHash()
  const [key, setKey] = useState(chatKey.get())
  const [client, setClient] = useState<Client>(() => makeClient(key))
  const [me, setMe] = useState<Me | undefined>()
  const [signInError, setSignInError] = useState<string | undefined>()
  const [needsKey, setNeedsKey] = useState(false)
  const [conversations, setConversations] = useState<ReadonlyArray<ConversationListItem>>([])
  const [cursor, setCursor] = useState<string | null>(null)
  const [banner, setBanner] = useState<string | undefined>()
  const [menuOpen, setMenuOpen] = useState(false)

  const onError = (e: unknown) => {
    if (e instanceof ApiError && e.status === 401) {
      setMe(undefined)
      setNeedsKey(true)
      setSignInError(describeError(e))
      return
    }
    setBanner(describeError(e))
  }
  const refreshList = (c: Client = client) =>
    c.request<{ data: ReadonlyArray<ConversationListItem>; next_cursor: string | null }>("GET", "/v1/conversations?limit=30").then((page) => {
      setConversations(page.data)
      setCursor(page.next_cursor)
    }).catch(onError)

  useEffect(() => {
    const c = makeClient(key)
    setClient(c)
    c.request<Me>("GET", "/v1/me").then((m) => {
      setMe(m)
      setNeedsKey(false)
      setSignInError(undefined)
      void refreshList(c)
    }).catch((e) => {
      if (e instanceof ApiError && e.status === 401) {
        setNeedsKey(true)
        setSignInError(key === undefined ? undefined : describeError(e))
      } else setBanner(describeError(e))
    })
  }, [key])

  if (hash.startsWith("#/shared/")) {
    const shareId = idIn(hash, "#/shared/", SHARE_ID)
    return shareId === undefined ? <main class="loading">This link is not valid.</main> : <SharedView shareId={shareId} />
  }
  if (needsKey) return <SignIn error={signInError} onKey={(k) => { chatKey.set(k); setKey(k) }} />
  if (me === undefined) return <main class="loading">{banner ?? "Loading…"}</main>

  const current = idIn(hash, "#/c/", CONVERSATION_ID)
  const currentModel = conversations.find((c) => c.conversation_id === current)?.model
  const create = (model: string | undefined) =>
    client.request<{ conversation_id: string; model: string }>("POST", "/v1/conversations", model === undefined ? {} : { model }).then((c) => {
      setConversations((all) => [{ conversation_id: c.conversation_id, model: c.model, title: "", created_at_ms: Date.now() }, ...all])
      setMenuOpen(false)
      location.hash = `#/c/${c.conversation_id}`
    }).catch(onError)
  /** A new conversation's first message is its title at once (the server's list agrees after the turn). */
  const titleIfNew = (id: string, content: string) =>
    setConversations((all) => all.map((c) => c.conversation_id === id && c.title === "" ? { ...c, title: content.slice(0, 100) } : c))
  const remove = (id: string) =>
    client.request("DELETE", `/v1/conversations/${encodeURIComponent(id)}`).then(() => {
      setConversations((all) => all.filter((c) => c.conversation_id !== id))
      if (id === current) location.hash = ""
    }).catch(onError)
  const more = () => {
    if (cursor === null) return
    client.request<{ data: ReadonlyArray<ConversationListItem>; next_cursor: string | null }>("GET", `/v1/conversations?limit=30&before=${encodeURIComponent(cursor)}`)
      .then((page) => {
        setConversations((all) => [...all, ...page.data])
        setCursor(page.next_cursor)
      }).catch(onError)
  }

  return (
    <div class="layout">
      <button type="button" class="menu ghost" aria-label="Conversations" onClick={() => setMenuOpen(!menuOpen)}>☰</button>
      <Sidebar
        me={me}
        conversations={conversations}
        more={cursor !== null}
        current={current}
        open={menuOpen}
        onNew={(m) => void create(m)}
        onDelete={(id) => void remove(id)}
        onMore={more}
        onSignOut={() => { chatKey.set(undefined); setMe(undefined); setKey(undefined); setNeedsKey(true) }}
      />
      <main class="main" onClick={() => setMenuOpen(false)}>
        {banner !== undefined && (
          <div class="banner error" role="alert">
            <span>{banner}</span>
            <button type="button" class="ghost" aria-label="Dismiss" onClick={() => setBanner(undefined)}>×</button>
          </div>
        )}
        {hash === "#/memory"
          ? <MemoryPanel client={client} onError={onError} onClose={() => history.back()} />
          : current !== undefined
          ? <ChatView key={current} client={client} conversationId={current} model={currentModel === undefined ? undefined : `${currentModel} · ${me.tier} tier`} onError={onError} onActivity={(content) => content === undefined ? void refreshList() : titleIfNew(current, content)} />
          : (
            <section class="welcome">
              <h1>Chat</h1>
              <p>Start a new chat, or pick one from the list.</p>
              <button type="button" class="primary" onClick={() => void create(undefined)}>New chat</button>
            </section>
          )}
      </main>
    </div>
  )
}

render(<App />, document.getElementById("app")!)
