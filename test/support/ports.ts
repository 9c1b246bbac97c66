/**
 * Listening ports for test processes, drawn below Linux's ephemeral range (32768-60999): a port in
 * that range that is free when checked can be taken by another process's outgoing connection
 * before the child listens on it (a CI run lost a gateway to EADDRINUSE that way).
 */
import net from "node:net"

export const LISTEN_PORT_MIN = 10_000
export const LISTEN_PORT_MAX = 32_000

/**
 * The Fetch standard's "bad ports" in [LISTEN_PORT_MIN, LISTEN_PORT_MAX) (https://fetch.spec.whatwg.org/#bad-port):
 * Node's `fetch` refuses them ("bad port"), so a service listening there never looks healthy
 * to a test (a CI run lost a suite to port 10080 that way).
 */
const FETCH_BAD_PORTS: ReadonlySet<number> = new Set([10_080])

/** Whether nothing listens on `port` at 127.0.0.1 now. */
export const portFree = (port: number) =>
  new Promise<boolean>((resolve) => {
    const server = net.createServer()
    server.once("error", () => resolve(false))
    server.listen(port, "127.0.0.1", () => server.close(() => resolve(true)))
  })

/** Whether a test process may be given `port`: free now, and one that `fetch` will reach. */
export const listenPortUsable = (port: number) => FETCH_BAD_PORTS.has(port) ? Promise.resolve(false) : portFree(port)

/** A usable port (see listenPortUsable) in [LISTEN_PORT_MIN, LISTEN_PORT_MAX). */
export const freeListenPort = async (): Promise<number> => {
  for (;;) {
    const port = LISTEN_PORT_MIN + Math.floor(Math.random() * (LISTEN_PORT_MAX - LISTEN_PORT_MIN))
    if (await listenPortUsable(port)) return port
  }
}
