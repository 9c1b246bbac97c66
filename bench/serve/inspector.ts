/**
 * A minimal Chrome DevTools Protocol client for another Node process started with
 * `--inspect=127.0.0.1:0`: forces a full GC and reads the V8 heap usage. Needs the global
 * WebSocket (Node 20: `--experimental-websocket`, which `npm run bench` passes); without it the
 * memory measurement falls back to RSS readings without a forced GC.
 */

interface MinimalWebSocket {
  send(data: string): void
  close(): void
  addEventListener(type: string, listener: (event: { data?: unknown }) => void): void
}

export interface Inspector {
  readonly call: (method: string, params?: Record<string, unknown>) => Promise<Record<string, unknown>>
  readonly close: () => void
  /** Listens to an event (`HeapProfiler.addHeapSnapshotChunk`, …); returns the unsubscribe. */
  readonly on: (method: string, listener: (params: Record<string, unknown>) => void) => () => void
}

/** The ws:// URL a process started with --inspect printed on stderr, if any. */
export const inspectorUrlOf = (output: string): string | undefined => /Debugger listening on (ws:\/\/\S+)/.exec(output)?.[1]

export const connectInspector = async (url: string): Promise<Inspector | undefined> => {
  const WS = (globalThis as { WebSocket?: new (url: string) => MinimalWebSocket }).WebSocket
  if (WS === undefined) return undefined
  const ws = new WS(url)
  await new Promise<void>((resolve, reject) => {
    ws.addEventListener("open", () => resolve())
    ws.addEventListener("error", () => reject(new Error(`cannot connect to the inspector at ${url}`)))
  })
  let nextId = 1
  const pending = new Map<number, (r: Record<string, unknown>) => void>()
  const listeners = new Map<string, (params: Record<string, unknown>) => void>()
  ws.addEventListener("message", (event) => {
    const msg = JSON.parse(String(event.data)) as {
      id?: number
      method?: string
      params?: Record<string, unknown>
      result?: Record<string, unknown>
      error?: unknown
    }
    if (msg.id === undefined) {
      if (msg.method !== undefined) listeners.get(msg.method)?.(msg.params ?? {})
      return
    }
    const resolve = pending.get(msg.id)
    pending.delete(msg.id)
    resolve?.(msg.result ?? { error: msg.error })
  })
  return {
    call: (method, params) =>
      new Promise((resolve) => {
        const id = nextId++
        pending.set(id, resolve)
        ws.send(JSON.stringify({ id, method, ...(params === undefined ? {} : { params }) }))
      }),
    close: () => ws.close(),
    on: (method, listener) => {
      listeners.set(method, listener)
      return () => listeners.delete(method)
    }
  }
}
