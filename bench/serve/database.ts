/**
 * A private PostgreSQL database per benchmark run: `CREATE DATABASE chat_bench_<pid>_<time>` on
 * the server of DATABASE_URL, dropped at the end. The cluster's runner and shard tables of one
 * run then never meet those of another run or of the test suites (same runner names in one
 * database make services wait on each other's shard locks).
 */
import { PgClient } from "@effect/sql-pg"
import { SqlClient } from "@effect/sql"
import { Effect, Redacted } from "effect"

const run = (url: string, statement: string): Promise<void> =>
  Effect.runPromise(
    Effect.gen(function*() {
      const sql = yield* SqlClient.SqlClient
      yield* sql.unsafe(statement)
    }).pipe(Effect.provide(PgClient.layer({ url: Redacted.make(url), maxConnections: 1 })), Effect.scoped)
  )

export interface PrivateDatabase {
  readonly url: string
  readonly name: string
  readonly drop: () => Promise<void>
}

export const createPrivateDatabase = async (serverUrl: string): Promise<PrivateDatabase> => {
  const name = `chat_bench_${process.pid}_${Date.now().toString(36)}`
  await run(serverUrl, `CREATE DATABASE ${name}`)
  const u = new URL(serverUrl)
  u.pathname = `/${name}`
  return {
    url: u.toString(),
    name,
    drop: () => run(serverUrl, `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
  }
}
