/**
 * The PostgreSQL wire server in front of the embedded PGlite: pglite-socket's connection
 * handler with our own scheduling of its messages.
 *
 * PGlite has one backend session for all connections. pglite-socket 0.2.17's queue hands that
 * session to whichever connection sent the next message, and keeps it for one connection only
 * inside a transaction. The extended query protocol keeps state between messages outside a
 * transaction too (the unnamed statement and portal, from Parse to Sync), so two pooled
 * connections' Parse/Bind/Execute/Sync interleave and one of them fails with "unnamed
 * prepared statement does not exist" (electric-sql/pglite#1046, #977). Its queue also stops
 * for good after one failed message. Here a connection keeps the session from its first
 * message until the backend is idle again: after a Sync, a simple Query or a startup or
 * password message, outside a transaction.
 */
import { createServer, type Server, type Socket } from "node:net"
import type { PGlite } from "@electric-sql/pglite"
import { PGLiteSocketHandler } from "@electric-sql/pglite-socket"

interface Pending {
  readonly handlerId: number
  readonly message: Uint8Array
  readonly onData: (data: Uint8Array) => void
  readonly resolve: (numBytes: number) => void
  readonly reject: (error: unknown) => void
}

/**
 * Message types after which the backend answers ReadyForQuery: Sync ('S'), Query ('Q'),
 * password/SASL ('p'); a startup message has no type byte (its first byte is the high byte
 * of its length, 0). PostgreSQL protocol docs, "Message Flow".
 */
const endsCycle = (message: Uint8Array): boolean => {
  const type = message[0]
  // Terminate ('X') ends the connection's use of the session too.
  return type === 0 || type === 0x53 || type === 0x51 || type === 0x70 || type === 0x58
}

/** The scheduler of the one backend session: the `queryQueue` pglite-socket's handler calls. */
export class SessionQueue {
  private readonly queue: Array<Pending> = []
  private running = false
  /** The connection that holds the session (mid extended-query cycle or transaction). */
  private owner: number | undefined
  /** Connections that closed: one whose message was running as it closed must not keep the session. */
  private readonly closed = new Set<number>()

  constructor(private readonly db: PGlite) {}

  enqueue(handlerId: number, message: Uint8Array, onData: (data: Uint8Array) => void): Promise<number> {
    return new Promise((resolve, reject) => {
      this.queue.push({ handlerId, message, onData, resolve, reject })
      void this.run()
    })
  }

  getQueueLength(): number {
    return this.queue.length
  }

  /** A connection closed: its queued messages are dropped. */
  clearQueueForHandler(handlerId: number): void {
    this.closed.add(handlerId)
    for (let i = this.queue.length - 1; i >= 0; i--) {
      const item = this.queue[i]!
      if (item.handlerId !== handlerId) continue
      this.queue.splice(i, 1)
      item.reject(new Error("connection closed"))
    }
  }

  /** A connection closed: a transaction it left open is rolled back and the session freed. */
  async clearTransactionIfNeeded(handlerId: number): Promise<void> {
    if (this.owner !== handlerId) return
    if (this.db.isInTransaction()) {
      await this.db.runExclusive(() => this.db.exec("ROLLBACK")).catch(() => undefined)
    }
    this.owner = undefined
    void this.run()
  }

  private next(): Pending | undefined {
    const index = this.owner === undefined ? 0 : this.queue.findIndex((item) => item.handlerId === this.owner)
    return index < 0 ? undefined : this.queue.splice(index, 1)[0]
  }

  private async run(): Promise<void> {
    if (this.running) return
    this.running = true
    try {
      for (;;) {
        // The owner's next message may not have arrived yet: the others wait for it.
        const item = this.next()
        if (item === undefined) return
        let numBytes = 0
        try {
          await this.db.runExclusive(() =>
            this.db.execProtocolRawStream(item.message, {
              onRawData: (data) => {
                numBytes += data.length
                item.onData(data)
              }
            })
          )
          item.resolve(numBytes)
        } catch (e) {
          item.reject(e)
        }
        if (this.closed.has(item.handlerId)) {
          // It closed while this message ran: whatever it left open is rolled back, and the
          // session is free (else every other connection would wait for it forever).
          if (this.db.isInTransaction()) await this.db.runExclusive(() => this.db.exec("ROLLBACK")).catch(() => undefined)
          this.owner = undefined
        } else {
          this.owner = endsCycle(item.message) && !this.db.isInTransaction() ? undefined : item.handlerId
        }
      }
    } finally {
      this.running = false
    }
  }
}

/** Serves `db` on `host:port` (0: a free port); resolves to the bound port and a stop. */
export const serve = async (
  db: PGlite,
  options: { readonly host: string; readonly port: number; readonly maxConnections: number }
): Promise<{ readonly port: number; readonly stop: () => Promise<void> }> => {
  const queue = new SessionQueue(db)
  const handlers = new Set<PGLiteSocketHandler>()
  const server: Server = createServer((socket: Socket) => {
    if (handlers.size >= options.maxConnections) {
      socket.end("Too many connections\n")
      return
    }
    // The handler's option is typed as pglite-socket's own (private) queue class; ours has
    // the same public methods.
    const handler = new PGLiteSocketHandler({ queryQueue: queue as never, closeOnDetach: true })
    handlers.add(handler)
    const forget = () => handlers.delete(handler)
    handler.addEventListener("close", forget)
    handler.addEventListener("error", forget)
    handler.attach(socket).catch(() => {
      forget()
      socket.destroy()
    })
  })
  server.maxConnections = options.maxConnections
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject)
    server.listen(options.port, options.host, () => resolve())
  })
  const address = server.address()
  const port = typeof address === "object" && address !== null ? address.port : options.port
  return {
    port,
    stop: async () => {
      for (const handler of handlers) await handler.detach(true)
      handlers.clear()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}
