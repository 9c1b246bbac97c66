/**
 * The embedded PostgreSQL (PGlite behind our wire server) with several pooled connections, as
 * the cluster's storages and ours use it: concurrent extended-protocol queries, transactions
 * and failing statements from different connections each get their own answer.
 */
import { mkdtempSync } from "node:fs"
import { tmpdir } from "node:os"
import path from "node:path"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Effect, Layer, Redacted } from "effect"
import { describe, expect, it } from "vitest"
import * as EmbeddedPostgres from "../../src/runtime/EmbeddedPostgres.js"

const EmbeddedPg = Layer.unwrapScoped(Effect.gen(function*() {
  const { url } = yield* EmbeddedPostgres.start(mkdtempSync(path.join(tmpdir(), "chat-pglite-")))
  return PgClient.layer({ url: Redacted.make(url), maxConnections: 8 })
}))

describe("embedded PostgreSQL (PGlite) with a connection pool", () => {
  it("concurrent parameterized queries, transactions and errors on 8 connections each get their own answer", async () => {
    const numQueries = 600
    const program = Effect.gen(function*() {
      const sql = yield* SqlClient.SqlClient
      yield* sql`CREATE TABLE items (id int PRIMARY KEY, owner int NOT NULL)`
      const results = yield* Effect.forEach(Array.from({ length: numQueries }, (_, i) => i), (i) => {
        switch (i % 3) {
          case 0:
            return sql<{ n: number; s: string }>`SELECT ${i}::int AS n, ${`q${i}`}::text AS s`.pipe(
              Effect.map((rows) => rows[0]?.n === i && rows[0]?.s === `q${i}`)
            )
          case 1:
            return sql.withTransaction(Effect.gen(function*() {
              yield* sql`INSERT INTO items (id, owner) VALUES (${i}, ${i * 10})`
              const rows = yield* sql<{ owner: number }>`SELECT owner FROM items WHERE id = ${i}`
              return rows[0]?.owner === i * 10
            }))
          default:
            // A failing statement answers its own connection with its error, and nobody else's.
            return sql`SELECT 1 / ${0}::int AS n`.pipe(
              Effect.match({ onFailure: (e) => String(e.cause).includes("division by zero"), onSuccess: () => false })
            )
        }
      }, { concurrency: "unbounded" })
      const count = yield* sql<{ n: number }>`SELECT count(*)::int AS n FROM items`
      return { numFailed: results.filter((ok) => !ok).length, numRows: count[0]?.n }
    })
    const outcome = await Effect.runPromise(program.pipe(Effect.provide(EmbeddedPg), Effect.timeout("45 seconds")))
    expect(outcome).toEqual({ numFailed: 0, numRows: numQueries / 3 })
  }, 60_000)
})
