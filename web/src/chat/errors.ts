import { ApiError } from "../lib/api.js"

const clock = (s: number) => new Date(Date.now() + s * 1000).toLocaleTimeString()

/** An error as a sentence for the user (the code decides; the server's message is the fallback). */
export const describeError = (e: unknown): string => {
  if (!(e instanceof ApiError)) return e instanceof TypeError ? "The service cannot be reached. Check your connection and try again." : String(e)
  switch (e.code) {
    case "rate_limit_exceeded":
      return e.retryAfterS === undefined
        ? "You have reached your rate limit. Wait a moment before sending again."
        : `You have reached your rate limit. You can send again in ${e.retryAfterS} s (at ${clock(e.retryAfterS)}).`
    case "content_filter":
      return "This message was blocked by content moderation."
    case "engine_error":
      return "The model is unavailable right now (engine error). Please try again in a moment."
    case "overloaded":
      return `The service is busy. Try again in ${e.retryAfterS ?? 5} s.`
    case "shutting_down":
      return "The server is restarting. Try again in a few seconds."
    case "storage_unavailable":
      return "The service cannot store messages just now; nothing was sent. Try again shortly."
    case "prompt_too_long":
      return "This message is too long for the model. Shorten it, or start a new conversation."
    case "turn_in_progress":
      return "A reply is still being written in this conversation."
    case "conversation_not_found":
      return "This conversation no longer exists."
    case "unauthorized":
      return "Your key was not accepted. Sign in again."
    case "network_error":
      return e.message
    default:
      return e.message.length > 0 ? e.message : `Request failed (${e.status})`
  }
}

/** A stream's `error` event (code and message) as a sentence. */
export const describeStreamError = (code: string, message: string): string =>
  code === "content_filter"
    ? "The reply was stopped by content moderation."
    : code === "shutting_down"
    ? "The server restarted while replying; the reply so far was kept."
    : code === "engine_error" || code === "generation_failed"
    ? "The model failed while replying (engine error). Please try again."
    : message.length > 0
    ? message
    : `The reply failed (${code}).`
