/**
 * A loopback TCP proxy in front of a server (PostgreSQL, for fault drills): `down()` resets
 * every connection through it and stops listening, so that new connections are refused, as
 * when the server's machine goes away; `up()` listens again on the same port. `holdRepliesTo(markers)`:
 * the connection that next sends a message holding every one of `markers` gets no more
 * answers (the server got the statement, and may commit it; its reply is lost), as a
 * connection cut right after a write.
 */
import * as Net from "node:net"

export interface TcpProxy {
  /** The proxy's port on 127.0.0.1. */
  readonly port: number
  readonly down: () => Promise<void>
  readonly up: () => Promise<void>
  readonly holdRepliesTo: (markers: ReadonlyArray<string>) => void
  readonly close: () => Promise<void>
}

export const tcpProxy = async (target: { readonly host: string; readonly port: number }): Promise<TcpProxy> => {
  const sockets = new Set<Net.Socket>()
  let markers: ReadonlyArray<Buffer> | undefined
  const track = (socket: Net.Socket) => {
    sockets.add(socket)
    socket.once("close", () => sockets.delete(socket))
  }
  const server = Net.createServer((client) => {
    const upstream = Net.connect(target.port, target.host)
    track(client)
    track(upstream)
    let held = false
    client.on("data", (data: Buffer) => {
      if (markers !== undefined && markers.every((m) => data.includes(m))) {
        markers = undefined
        held = true
      }
      upstream.write(data)
    })
    upstream.on("data", (data: Buffer) => void (held || client.write(data)))
    // One side reset or gone: the other is reset too, as a lost connection would be.
    client.once("error", () => upstream.resetAndDestroy())
    upstream.once("error", () => client.resetAndDestroy())
    client.once("close", () => upstream.destroy())
    upstream.once("close", () => client.destroy())
  })
  const listen = (port: number) =>
    new Promise<void>((resolve, reject) => {
      server.once("error", reject)
      server.listen(port, "127.0.0.1", () => {
        server.off("error", reject)
        resolve()
      })
    })
  await listen(0)
  const port = (server.address() as Net.AddressInfo).port
  const down = () =>
    new Promise<void>((resolve) => {
      server.close(() => resolve())
      for (const socket of sockets) socket.resetAndDestroy()
    })
  return {
    port,
    down,
    up: () => listen(port),
    holdRepliesTo: (texts) => void (markers = texts.map((t) => Buffer.from(t))),
    close: () => (server.listening ? down() : Promise.resolve())
  }
}
