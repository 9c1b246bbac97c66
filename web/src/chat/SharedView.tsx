/** A shared conversation (`#/shared/<share_id>`): read-only, no sign-in needed. */
import { useEffect, useState } from "preact/hooks"
import { makeClient, type Turn } from "../lib/api.js"
import { renderMarkdown } from "../lib/markdown.js"
import { describeError } from "./errors.js"

export const SharedView = ({ shareId }: { shareId: string }) => {
  const [turns, setTurns] = useState<ReadonlyArray<Turn> | undefined>()
  const [error, setError] = useState<string | undefined>()
  useEffect(() => {
    makeClient(undefined).request<{ turns: ReadonlyArray<Turn> }>("GET", `/v1/shared/${encodeURIComponent(shareId)}`)
      .then((s) => setTurns(s.turns))
      .catch((e) => setError(describeError(e)))
  }, [shareId])
  return (
    <main class="shared">
      <header class="chat-head"><span>Shared conversation (read-only)</span><a href="/">Open the chat</a></header>
      {error !== undefined && <div class="banner error">{error}</div>}
      <div class="messages">
        {(turns ?? []).filter((t) => t.role !== "system").map((t) => (
          <div key={t.turn_id} class={`msg ${t.role}`} data-role={t.role}>
            {t.role === "assistant"
              ? <div class="body markdown" dangerouslySetInnerHTML={{ __html: renderMarkdown(t.content) }} />
              : <div class="body plain">{t.content}</div>}
          </div>
        ))}
      </div>
    </main>
  )
}
