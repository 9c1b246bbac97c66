/** The PostgreSQL that integration tests use: `DATABASE_URL`, default the local `test` database. */
import { randomUUID } from "node:crypto"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Effect, ManagedRuntime, Redacted } from "effect"

export const databaseUrl = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"

export const PgLive = PgClient.layer({ url: Redacted.make(databaseUrl), maxConnections: 4 })

/** Runs one statement on the database at `url` (default `DATABASE_URL`). */
export const sqlAt = (statement: string, params: ReadonlyArray<unknown> = [], url = databaseUrl): Promise<Array<any>> =>
  Effect.runPromise(
    Effect.flatMap(SqlClient.SqlClient, (sql) => sql.unsafe(statement, params as Array<any>)).pipe(
      Effect.map((rows) => [...rows] as Array<any>),
      Effect.provide(PgClient.layer({ url: Redacted.make(url), maxConnections: 1 })),
      Effect.scoped
    )
  )

/** A new empty database on the `DATABASE_URL` server, for one test file; returns its URL. */
export const freshDatabase = async (): Promise<{ readonly url: string; readonly name: string }> => {
  const name = `chat_test_${randomUUID().replaceAll("-", "").slice(0, 16)}`
  await sqlAt(`CREATE DATABASE ${name}`)
  const url = new URL(databaseUrl)
  url.pathname = `/${name}`
  return { url: url.toString(), name }
}

/** A pooled client of the database at `url`, for tests that run many statements. */
export const sqlPool = (url: string) => {
  const runtime = ManagedRuntime.make(PgClient.layer({ url: Redacted.make(url), maxConnections: 2 }))
  return {
    query: (statement: string, params: ReadonlyArray<unknown> = []): Promise<Array<any>> =>
      runtime.runPromise(
        Effect.flatMap(SqlClient.SqlClient, (sql) => sql.unsafe(statement, params as Array<any>)).pipe(
          Effect.map((rows) => [...rows] as Array<any>)
        )
      ),
    close: () => runtime.dispose()
  }
}
