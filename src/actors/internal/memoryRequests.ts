/**
 * Explicit memory requests in a user's message: "remember that I prefer metric units",
 * "Please remember: my name is Ada". The fact is what follows, as the user wrote it (a
 * trailing full stop dropped); the Conversation stores it in the user's memory once the turn
 * is stored. Only a message that starts with the request counts ("do you remember …?" does not).
 */

import { hasVisibleCharacter } from "../../runtime/Domain.js"

/** Longest fact taken from a request, in characters (longer requests are not taken). */
const MAX_FACT_CHARS = 500

const REQUEST = /^\s*(?:please\s+)?remember(?:\s+that)?\s*[:,]?\s+([^?]+?)[.!]*\s*$/is

/** The fact a message asks to be remembered, if it is such a request. */
export const explicitFact = (content: string): string | undefined => {
  if (content.length > MAX_FACT_CHARS + 40) return undefined
  const fact = REQUEST.exec(content)?.[1]?.trim()
  // "Remember that!" asks nothing: its "that" is the request's, not a fact.
  if (fact === undefined || fact.length < 3 || fact.length > MAX_FACT_CHARS || /^that$/i.test(fact)) return undefined
  return hasVisibleCharacter(fact) ? fact : undefined
}
