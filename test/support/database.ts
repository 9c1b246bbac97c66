/** The PostgreSQL that integration tests use: `DATABASE_URL`, default the local `test` database. */
import { PgClient } from "@effect/sql-pg"
import { Redacted } from "effect"

export const databaseUrl = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"

export const PgLive = PgClient.layer({ url: Redacted.make(databaseUrl), maxConnections: 4 })
