/**
 * The zero-setup PostgreSQL of `npm start`: PGlite (PostgreSQL compiled to WASM) persisted in
 * a data directory, served over the PostgreSQL wire protocol on a free loopback port
 * (internal/pgliteSessions: one connection holds the session per protocol cycle), so the
 * cluster's SQL storages and ours use an ordinary PgClient.
 *
 * One process only: PGlite shares one backend between connections (advisory locks are not
 * exclusive), so several runners must use a real PostgreSQL.
 */
import { mkdirSync } from "node:fs"
import { PGlite } from "@electric-sql/pglite"
import { Effect, type Scope } from "effect"
import { StorageError } from "./Errors.js"
import * as pgliteSessions from "./internal/pgliteSessions.js"

/**
 * Starts PGlite on `dataDir` behind a socket server; returns its connection URL. Both stop
 * when the scope closes (PGlite flushes to disk on close).
 */
export const start = (dataDir: string): Effect.Effect<{ readonly url: string }, StorageError, Scope.Scope> =>
  Effect.gen(function*() {
    mkdirSync(dataDir, { recursive: true })
    const db = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () => PGlite.create(dataDir),
        catch: (e) => new StorageError({ message: `PGlite failed to open ${dataDir}: ${String(e)}` })
      }),
      (db) => Effect.promise(() => db.close()).pipe(Effect.ignore)
    )
    // The cluster's storages hold several connections at once (sharding, message storage).
    const server = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () => pgliteSessions.serve(db, { host: "127.0.0.1", port: 0, maxConnections: 16 }),
        catch: (e) => new StorageError({ message: `the PGlite wire server failed to listen: ${String(e)}` })
      }),
      (server) => Effect.promise(() => server.stop()).pipe(Effect.ignore)
    )
    const port = server.port
    return { url: `postgres://postgres@127.0.0.1:${port}/postgres` }
  })
