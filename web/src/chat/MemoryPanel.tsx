/** The user's long-term memory: the facts the assistant keeps about them; add and remove. */
import { useEffect, useState } from "preact/hooks"
import type { Client, MemoryFact } from "../lib/api.js"

export const MemoryPanel = ({ client, onError, onClose }: { client: Client; onError: (e: unknown) => void; onClose: () => void }) => {
  const [facts, setFacts] = useState<ReadonlyArray<MemoryFact> | undefined>()
  const [draft, setDraft] = useState("")
  const apply = (update: { add?: Array<string>; remove?: Array<string> }) =>
    client.request<{ facts: ReadonlyArray<MemoryFact> }>("PATCH", "/v1/users/me/memory", update).then((m) => setFacts(m.facts)).catch(onError)
  useEffect(() => {
    client.request<{ facts: ReadonlyArray<MemoryFact> }>("GET", "/v1/users/me/memory").then((m) => setFacts(m.facts)).catch(onError)
  }, [client])
  const add = (e: Event) => {
    e.preventDefault()
    const fact = draft.trim()
    if (fact.length === 0) return
    setDraft("")
    void apply({ add: [fact] })
  }
  return (
    <section class="memory panel" aria-label="Memory">
      <header class="chat-head">
        <span>Memory</span>
        <button type="button" class="ghost" onClick={onClose}>Close</button>
      </header>
      <p class="hint">What the assistant remembers about you across conversations. Say “remember that …” in a chat, or add a fact here.</p>
      <form class="memory-add" onSubmit={add}>
        <input value={draft} maxLength={500} placeholder="A fact to remember" aria-label="New fact" onInput={(e) => setDraft((e.target as HTMLInputElement).value)} />
        <button type="submit" disabled={draft.trim().length === 0}>Add</button>
      </form>
      {facts === undefined ? <p>Loading…</p> : facts.length === 0 ? <p class="empty">Nothing remembered yet.</p> : (
        <ul class="facts">
          {facts.map((f) => (
            <li key={f.fact_id} data-fact-id={f.fact_id}>
              <span>{f.content}</span>
              <button type="button" class="ghost" aria-label={`Forget: ${f.content}`} onClick={() => void apply({ remove: [f.fact_id] })}>Remove</button>
            </li>
          ))}
        </ul>
      )}
    </section>
  )
}
