import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Integration and e2e suites share PostgreSQL, the engine binary and ports: run files one at a time.
    fileParallelism: false
  }
})
