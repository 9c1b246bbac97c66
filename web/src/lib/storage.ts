/** The key or token a user signed in with, kept in this browser's localStorage. */
const get = (name: string): string | undefined => {
  try {
    return localStorage.getItem(name) ?? undefined
  } catch {
    return undefined
  }
}
const set = (name: string, value: string | undefined): void => {
  try {
    if (value === undefined) localStorage.removeItem(name)
    else localStorage.setItem(name, value)
  } catch {
    // storage disabled: the key lasts for this page only
  }
}

export const chatKey = { get: () => get("chat.key"), set: (v: string | undefined) => set("chat.key", v) }
export const opsKey = { get: () => get("chat.opsKey"), set: (v: string | undefined) => set("chat.opsKey", v) }
