/**
 * ioredis options for a client that fails its commands at once while Redis is away (no
 * offline queue, one retry) and, given `commandTimeoutMs`, when one goes unanswered that long.
 * With ioredis's defaults (an offline queue, 20 retries) a command waits through 10–40 s of
 * reconnects: a Redis outage then held up every request that touched it.
 */
export const failFastRedisOptions = (commandTimeoutMs?: number) =>
  ({
    maxRetriesPerRequest: 1,
    enableOfflineQueue: false,
    ...(commandTimeoutMs === undefined ? {} : { commandTimeout: commandTimeoutMs })
  }) as const
