/**
 * The web client and the operator dashboard in a real browser: Debian's Chromium driven by
 * playwright-core, against the real service (src/main.ts with the CPU engine and a simulated
 * GPU slowed to a readable pace, test/e2e/web.config.ts). Each test does what a user does on
 * the page, then checks what the page shows against what the API stored.
 *
 * Screenshots of the chat and the dashboard go to test-results/screenshots/ (not committed).
 */
import { mkdirSync } from "node:fs"
import net from "node:net"
import path from "node:path"
import { type Browser, type BrowserContext, chromium, type Page } from "playwright-core"
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest"
import { freshDatabase } from "../support/database.js"
import { assertEngineBuilt, REPO_ROOT } from "../support/engineProcess.js"
import { postJson, type Service, startService } from "../support/service.js"

const CHROMIUM = process.env["CHROMIUM_PATH"] ?? "/usr/bin/chromium"
const SCREENSHOTS = path.join(REPO_ROOT, "test-results", "screenshots")
const PAID = "web-paid-key"
const FREE = "web-free-key"
const ADMIN = "web-admin-key"

/**
 * A TCP proxy in front of the service that can cut the next SSE response after its third
 * token event, as a network drop would (the browser's connection ends mid-stream).
 */
const cuttingProxy = async (targetPort: number) => {
  let cutNext = false
  let cuts = 0
  const sockets = new Set<net.Socket>()
  const server = net.createServer((client) => {
    const upstream = net.connect(targetPort, "127.0.0.1")
    sockets.add(client).add(upstream)
    const close = () => {
      client.destroy()
      upstream.destroy()
    }
    client.on("error", close).on("close", close)
    upstream.on("error", close)
    client.pipe(upstream)
    let numTokens = 0
    upstream.on("data", (chunk: Buffer) => {
      numTokens += chunk.toString("latin1").split("event: token").length - 1
      if (cutNext && numTokens >= 3) {
        cutNext = false
        cuts++
        // The bytes so far reach the browser, then the connection ends mid-stream (a FIN: a
        // reset would drop what the browser had not read yet). The service sees its client go.
        upstream.destroy()
        client.end(chunk)
      } else client.write(chunk)
    })
  })
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
  const port = (server.address() as net.AddressInfo).port
  return {
    url: `http://127.0.0.1:${port}`,
    cutNextStream: () => void (cutNext = true),
    cuts: () => cuts,
    close: () => {
      for (const s of sockets) s.destroy()
      return new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}

// A failing page test runs once more (a fresh browser context and conversation): what it
// saw the first time is printed (below) so an intermittent cause can be found.
describe("web client and operator dashboard (Chromium)", { retry: 1 }, () => {
  let service: Service
  let browser: Browser
  let proxy: Awaited<ReturnType<typeof cuttingProxy>>
  /** What the pages of the current test saw: API answers of 400 and up, page errors, the notes shown. */
  let seen: Array<string> = []

  beforeAll(async () => {
    assertEngineBuilt()
    mkdirSync(SCREENSHOTS, { recursive: true })
    const db = await freshDatabase()
    service = await startService({
      env: {
        DATABASE_URL: db.url,
        CLUSTER_CONFIG: "test/e2e/web.config.ts",
        API_KEYS: `${PAID}=webuser:paid,${FREE}=freeuser:free`,
        ADMIN_API_KEYS: ADMIN,
        // A reload or a dropped connection resumes the turn it left.
        STREAM_DETACH_GRACE_MS: "30000"
      }
    })
    proxy = await cuttingProxy(Number(new URL(service.url).port))
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    })
  }, 180_000)

  afterEach((context) => {
    if (context.task.result?.state === "fail") {
      console.log(`web test "${context.task.name}" failed; the pages saw:\n  ${seen.join("\n  ") || "(nothing)"}\n` +
        `service log (tail):\n${service.output().split("\n").slice(-40).join("\n")}`)
    }
    seen = []
  })

  afterAll(async () => {
    await browser?.close()
    await proxy?.close()
    await service?.stop()
  })

  /** A page signed in with `key` (through the sign-in form), on `base`. */
  const signedIn = async (key: string, options: { base?: string; width?: number } = {}): Promise<{ context: BrowserContext; page: Page; errors: Array<string> }> => {
    const context = await browser.newContext({ viewport: { width: options.width ?? 1200, height: 800 } })
    const page = await context.newPage()
    const errors: Array<string> = []
    page.on("pageerror", (e) => {
      errors.push(e.message)
      seen.push(`page error: ${e.message}`)
    })
    page.on("response", (r) => {
      if (r.url().includes("/v1/") && r.status() >= 400) {
        const line = `${r.status()} ${r.request().method()} ${r.url()}`
        r.text().then((body) => seen.push(`${line} ${body.slice(0, 300)}`), () => seen.push(line))
      }
    })
    page.on("requestfailed", (r) => seen.push(`request failed: ${r.method()} ${r.url()} ${r.failure()?.errorText ?? ""}`))
    await page.goto(`${options.base ?? service.url}/`)
    await page.getByLabel("API key or token").fill(key)
    await page.getByRole("button", { name: "Sign in" }).click()
    await page.locator(".sidebar .who").waitFor()
    return { context, page, errors }
  }

  const newChat = async (page: Page): Promise<string> => {
    await page.locator(".sidebar").getByRole("button", { name: "New chat" }).click()
    await page.waitForURL(/#\/c\/conv_/)
    return page.url().split("#/c/")[1]!
  }

  const send = async (page: Page, text: string) => {
    await page.getByLabel("Message").fill(text)
    await page.getByLabel("Message").press("Enter")
  }

  const lastReply = (page: Page) => page.locator(".msg.assistant").last()

  /** The stored turns of a conversation, through the API. */
  const stored = async (id: string, key = PAID) =>
    ((await (await fetch(`${service.url}/v1/conversations/${id}?limit=200`, { headers: { authorization: `Bearer ${key}` } })).json()) as {
      turns: Array<{ role: string; content: string; status: string }>
    }).turns

  /** Waits until the reply being streamed has ended (no streaming class) and returns its text. */
  const replyEnded = async (page: Page, timeout = 60_000) => {
    await page.waitForSelector(".msg.assistant.streaming", { state: "detached", timeout })
    return lastReply(page).locator(".body").innerText()
  }

  /**
   * The last reply as the page renders it from the store: the page reloaded (no stream in
   * flight), so its text is the stored turn's Markdown, rendered exactly as the live one was.
   */
  const storedRendering = async (page: Page) => {
    await page.reload()
    await lastReply(page).waitFor()
    expect(await page.locator(".msg.assistant.streaming").count()).toBe(0)
    return lastReply(page).locator(".body").innerText()
  }

  it("sends a message and shows the reply as it streams, with TTFT and tokens/s; the list shows it", async () => {
    const { context, page, errors } = await signedIn(PAID)
    const id = await newChat(page)
    await expect.poll(() => page.locator(".chat-head .model").innerText()).toContain("frontier · paid tier")
    await send(page, "Write a **story** please")
    await page.locator(".msg.assistant.streaming").waitFor()
    // Text grows while the reply is streaming.
    await expect.poll(async () => (await lastReply(page).innerText()).length, { timeout: 20_000 }).toBeGreaterThan(10)
    const partial = (await lastReply(page).innerText()).length
    await expect.poll(async () => (await lastReply(page).innerText()).length, { timeout: 20_000 }).toBeGreaterThan(partial)
    // The list shows the conversation by its first message at once.
    expect(await page.locator(`.conversations li[data-conversation-id="${id}"]`).innerText()).toContain("Write a **story** please")
    const text = await replyEnded(page)
    await expect.poll(() => lastReply(page).locator(".stats").innerText()).toMatch(/TTFT \d+ ms · [\d.]+ tok\/s/)
    await page.screenshot({ path: path.join(SCREENSHOTS, "chat.png") })
    const turns = await stored(id)
    expect(turns.map((t) => [t.role, t.status])).toEqual([["user", "completed"], ["assistant", "completed"]])
    expect(turns[1]!.content.length).toBeGreaterThan(0)
    await expect.poll(() => page.locator(`.conversations li[data-conversation-id="${id}"]`).innerText()).toContain("Write a **story** please")
    expect(await storedRendering(page)).toBe(text)
    expect(errors).toEqual([])
    await context.close()
  }, 120_000)

  it("a message sent while the conversation's history is still loading is not lost", async () => {
    const { context, page } = await signedIn(PAID)
    // A slow answer to the history request (read before anything was sent): the page must not
    // let that first page overwrite a message sent meanwhile.
    await page.route(/\/v1\/conversations\/conv_[^/?]+\?limit=/, async (route) => {
      const response = await route.fetch()
      await new Promise((r) => setTimeout(r, 1500))
      await route.fulfill({ response })
    })
    const id = await newChat(page)
    await send(page, "Quick question")
    await page.locator(".msg.assistant").waitFor({ timeout: 20_000 })
    expect(await page.locator(".msg.user").innerText()).toBe("Quick question")
    await replyEnded(page)
    expect((await stored(id)).map((t) => [t.role, t.status])).toEqual([["user", "completed"], ["assistant", "completed"]])
    await context.close()
  }, 90_000)

  it("Stop (and Esc) ends the reply; it is stored cancelled with the text shown", async () => {
    const { context, page } = await signedIn(PAID)
    const id = await newChat(page)
    await send(page, "Tell me everything")
    await expect.poll(async () => (await lastReply(page).innerText()).length, { timeout: 20_000 }).toBeGreaterThan(5)
    await page.getByRole("button", { name: "Stop" }).click()
    await replyEnded(page, 10_000)
    await expect.poll(() => lastReply(page).locator(".note").innerText()).toBe("Stopped")
    await expect.poll(async () => (await stored(id)).map((t) => t.status)).toEqual(["completed", "cancelled"])
    expect(await storedRendering(page)).toBe(await lastReply(page).locator(".body").innerText())

    await send(page, "And again")
    await expect.poll(async () => (await lastReply(page).innerText()).length, { timeout: 20_000 }).toBeGreaterThan(5)
    await page.keyboard.press("Escape")
    await replyEnded(page, 10_000)
    await expect.poll(async () => (await stored(id)).map((t) => t.status)).toEqual(["completed", "cancelled", "completed", "cancelled"])
    await context.close()
  }, 120_000)

  it("a reload mid-stream resumes the reply; it runs to its end and the page shows exactly what was stored", async () => {
    const { context, page } = await signedIn(PAID)
    const id = await newChat(page)
    await send(page, "A long answer please")
    await expect.poll(async () => (await lastReply(page).innerText()).length, { timeout: 20_000 }).toBeGreaterThan(5)
    await page.reload()
    // The reply in flight is followed again from its start.
    await page.locator(".msg.assistant.streaming").waitFor({ timeout: 10_000 })
    const text = await replyEnded(page)
    const turns = await stored(id)
    expect(turns.map((t) => [t.role, t.status])).toEqual([["user", "completed"], ["assistant", "completed"]])
    expect(await page.locator(".msg.assistant").count()).toBe(1)
    expect(await storedRendering(page)).toBe(text)
    await context.close()
  }, 120_000)

  it("a connection cut mid-stream resumes by itself with Last-Event-ID: no token lost or doubled", async () => {
    const { context, page } = await signedIn(PAID, { base: proxy.url })
    const id = await newChat(page)
    const resumes: Array<string> = []
    page.on("request", (r) => {
      if (r.url().endsWith(`/v1/conversations/${id}/stream`)) resumes.push(r.headers()["last-event-id"] ?? "")
    })
    const cutsBefore = proxy.cuts()
    proxy.cutNextStream()
    await send(page, "Keep talking")
    await expect.poll(() => proxy.cuts(), { timeout: 20_000 }).toBe(cutsBefore + 1)
    const text = await replyEnded(page)
    // It resumed once, after the last token event it had read (what a drop lets through
    // varies: the browser may lose bytes that came with the broken connection).
    expect(resumes.length).toBe(1)
    expect(resumes[0]).toMatch(new RegExp(`^${id}:1:[0-9]+$`))
    const turns = await stored(id)
    expect(turns.map((t) => [t.role, t.status])).toEqual([["user", "completed"], ["assistant", "completed"]])
    expect(await storedRendering(page)).toBe(text)
    await context.close()
  }, 120_000)

  it("history pages back as the user scrolls up", async () => {
    // A conversation with 80 earlier messages, made through the OpenAI API (its messages are stored).
    const messages = Array.from({ length: 80 }, (_, i) => ({ role: i % 2 === 0 ? "user" : "assistant", content: `message number ${i}` }))
    const res = await postJson(`${service.url}/v1/chat/completions`, { model: "frontier", messages: [...messages, { role: "user", content: "last" }], max_tokens: 1 }, { authorization: `Bearer ${PAID}` })
    expect(res.status).toBe(200)
    const id = res.headers.get("x-conversation-id")!
    const { context, page } = await signedIn(PAID)
    await page.goto(`${service.url}/#/c/${id}`)
    await expect.poll(() => page.locator(".msg").count()).toBe(30)
    await expect.poll(() => page.locator(".msg").first().innerText()).not.toContain("message number 0\n")
    for (let i = 0; i < 5 && (await page.locator(".msg").count()) < 82; i++) {
      await page.locator(".messages").evaluate((el) => el.scrollTo(0, 0))
      await page.waitForTimeout(500)
    }
    await expect.poll(() => page.locator(".msg").count()).toBe(82)
    expect(await page.locator(".msg").first().innerText()).toBe("message number 0")
    await context.close()
  }, 120_000)

  it("a reply with <script> or <img onerror> in it runs nothing; its Markdown renders", async () => {
    const hostile = "Here: <script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\"> **bold** and `code`\n\n```js\nlet a = 1\n```\n[x](javascript:window.__xss=3)\n\n" +
      "<style>body { display: none }</style><div style=\"position: fixed; inset: 0\" class=\"banner\">Session expired</div><form><input name=pw><button>Sign in</button></form>"
    const res = await postJson(`${service.url}/v1/chat/completions`, {
      model: "frontier",
      messages: [{ role: "user", content: "hi" }, { role: "assistant", content: hostile }, { role: "user", content: "ok" }],
      max_tokens: 1
    }, { authorization: `Bearer ${PAID}` })
    const id = res.headers.get("x-conversation-id")!
    const { context, page, errors } = await signedIn(PAID)
    await page.goto(`${service.url}/#/c/${id}`)
    const reply = page.locator(".msg.assistant").first()
    await reply.locator("strong").waitFor()
    expect(await reply.locator("strong").innerText()).toBe("bold")
    expect(await reply.locator("pre code").innerText()).toContain("let a = 1")
    expect(await reply.locator("script").count()).toBe(0)
    expect(await reply.locator("[onerror]").count()).toBe(0)
    expect(await reply.locator("a[href^='javascript']").count()).toBe(0)
    // Nor can it dress itself up as the page: no styles, classes, forms or buttons of its own.
    expect(await reply.locator(".body").locator("style, [style], [class], form, input, button").count()).toBe(0)
    expect(await page.locator("body").isVisible()).toBe(true)
    await page.waitForTimeout(300)
    expect(await page.evaluate(() => (globalThis as unknown as { __xss?: number }).__xss)).toBeUndefined()
    expect(errors).toEqual([])
    await context.close()
  }, 60_000)

  it("a turn whose POST is dropped before its response head, sent again with its key, runs to its end (the detach grace applies)", async () => {
    const headers = { authorization: `Bearer ${PAID}` }
    for (const dropAfterMs of [0, 1, 2, 4, 8, 16]) {
      const id = ((await (await postJson(`${service.url}/v1/conversations`, {}, headers)).json()) as { conversation_id: string }).conversation_id
      const body = JSON.stringify({ role: "user", content: `Dropped after ${dropAfterMs} ms`, max_tokens: 30 })
      // Sent whole, then the connection is cut within a few ms, before the response head: it
      // had cancelled the turn at once, so the re-send streamed an empty cancelled reply.
      await new Promise<void>((resolve) => {
        const url = new URL(service.url)
        const socket = net.connect(Number(url.port), url.hostname, () => {
          socket.write(
            `POST /v1/conversations/${id}/turns HTTP/1.1\r\nHost: ${url.host}\r\nAuthorization: Bearer ${PAID}\r\nIdempotency-Key: k\r\n` +
              `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
            () => setTimeout(() => (socket.destroy(), resolve()), dropAfterMs)
          )
        })
        socket.on("error", () => resolve())
      })
      const again = await fetch(`${service.url}/v1/conversations/${id}/turns`, {
        method: "POST",
        headers: { "content-type": "application/json", "idempotency-key": "k", ...headers },
        body
      })
      expect(again.status).toBe(200)
      const text = await again.text()
      expect(text).toMatch(/"finish_reason":"(length|stop)"/)
      const history = (await (await fetch(`${service.url}/v1/conversations/${id}`, { headers })).json()) as { turns: Array<{ role: string; status: string }> }
      expect(history.turns.map((t) => [t.role, t.status])).toEqual([["user", "completed"], ["assistant", "completed"]])
    }
  }, 60_000)

  it("the API behind the list: GET /v1/conversations pages a user's own conversations by cursor; GET /v1/me", async () => {
    const headers = { authorization: `Bearer ${PAID}` }
    const me = await (await fetch(`${service.url}/v1/me`, { headers })).json()
    expect(me).toEqual({ user_id: "webuser", tier: "paid", org_id: null, admin: false, default_model: "frontier", models: ["mini", "frontier"] })
    const mine: Array<string> = []
    for (let i = 0; i < 3; i++) {
      mine.push(((await (await postJson(`${service.url}/v1/conversations`, {}, headers)).json()) as { conversation_id: string }).conversation_id)
      await new Promise((r) => setTimeout(r, 5))
    }
    const theirs = ((await (await postJson(`${service.url}/v1/conversations`, {}, { authorization: `Bearer ${FREE}` })).json()) as { conversation_id: string }).conversation_id
    const seen: Array<string> = []
    let cursor: string | null = null
    do {
      const page = (await (await fetch(`${service.url}/v1/conversations?limit=2${cursor === null ? "" : `&before=${encodeURIComponent(cursor)}`}`, { headers })).json()) as {
        data: Array<{ conversation_id: string }>
        next_cursor: string | null
      }
      expect(page.data.length).toBeLessThanOrEqual(2)
      seen.push(...page.data.map((c) => c.conversation_id))
      cursor = page.next_cursor
    } while (cursor !== null && seen.length < 200)
    expect(new Set(seen).size).toBe(seen.length)
    // Newest first: the three just made lead, and the other user's is not there.
    expect(seen.slice(0, 3)).toEqual([...mine].reverse())
    expect(seen).not.toContain(theirs)
    for (const bad of ["before=12", "before=1:%2F..", "before=99999999999999999:conv_x", "limit=0", "limit=101", "limit=x"]) {
      const res = await fetch(`${service.url}/v1/conversations?${bad}`, { headers })
      expect(res.status).toBe(400)
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe("invalid_request")
    }
  }, 60_000)

  it("the memory panel adds and removes facts", async () => {
    const { context, page } = await signedIn(PAID)
    await page.getByRole("link", { name: "Memory" }).click()
    await page.getByLabel("New fact").fill("My favourite colour is teal")
    await page.getByRole("button", { name: "Add" }).click()
    await page.locator(".facts li", { hasText: "teal" }).waitFor()
    const memory = async () => ((await (await fetch(`${service.url}/v1/users/me/memory`, { headers: { authorization: `Bearer ${PAID}` } })).json()) as { facts: Array<{ content: string }> }).facts.map((f) => f.content)
    expect(await memory()).toContain("My favourite colour is teal")
    await page.getByRole("button", { name: "Forget: My favourite colour is teal" }).click()
    await page.locator(".facts li", { hasText: "teal" }).waitFor({ state: "detached" })
    expect(await memory()).not.toContain("My favourite colour is teal")
    await context.close()
  }, 60_000)

  it("a 429 is shown in words with when to retry, and the message is given back to edit", async () => {
    // The free tier allows 5 requests a minute: signing in, the list and a new chat take three.
    const { context, page } = await signedIn(FREE)
    await newChat(page)
    let shown = ""
    for (let i = 0; i < 6 && shown === ""; i++) {
      await send(page, `hello ${i}`)
      await page.waitForSelector(".msg.assistant.streaming", { state: "detached", timeout: 30_000 })
      const notes = await page.locator(".msg.user .note").allInnerTexts()
      shown = notes.find((n) => n.includes("rate limit")) ?? ""
    }
    expect(shown).toMatch(/You have reached your rate limit\. You can send again in \d+ s/)
    expect(await page.getByLabel("Message").inputValue()).toMatch(/^hello \d$/)
    await context.close()
  }, 120_000)

  it("is usable at phone width: the list opens from the menu button", async () => {
    const { context, page } = await signedIn(PAID, { width: 390 })
    expect(await page.locator(".sidebar").boundingBox().then((b) => (b?.x ?? 0) + (b?.width ?? 0))).toBeLessThanOrEqual(1)
    await page.getByRole("button", { name: "Conversations" }).click()
    await expect.poll(async () => (await page.locator(".sidebar").boundingBox())?.x).toBe(0)
    await newChat(page)
    await expect.poll(async () => (await page.getByLabel("Message").boundingBox())?.width ?? 0).toBeGreaterThan(200)
    await context.close()
  }, 60_000)

  it("/ops needs an admin key, shows the runner and its GPUs, and its charts update", async () => {
    const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } })
    const page = await context.newPage()
    await page.goto(`${service.url}/ops`)
    await page.getByLabel("Admin key").fill(PAID)
    await page.getByRole("button", { name: "Open" }).click()
    await page.getByText("not an operator key").waitFor()
    await page.getByLabel("Admin key").fill(ADMIN)
    await page.getByRole("button", { name: "Open" }).click()
    const row = page.locator("tr[data-runner='local']")
    await row.waitFor()
    expect(await row.getAttribute("data-state")).toBe("up")
    expect(await row.innerText()).toContain("gpu-1: engine up")
    // Traffic while the dashboard polls: its charts gain points and show tokens.
    const turn = postJson(`${service.url}/v1/conversations`, {}, { authorization: `Bearer ${PAID}` }).then(async (r) => {
      const { conversation_id } = (await r.json()) as { conversation_id: string }
      const t = await postJson(`${service.url}/v1/conversations/${conversation_id}/turns`, { role: "user", content: "hi", max_tokens: 40 }, { authorization: `Bearer ${PAID}` })
      await t.text()
    })
    const chart = page.locator(".pool[data-pool='frontier'] .chart[data-title='Output tokens/s']")
    await chart.waitFor()
    const first = Number(await chart.getAttribute("data-points"))
    await expect.poll(async () => Number(await chart.getAttribute("data-points")), { timeout: 15_000 }).toBeGreaterThanOrEqual(first + 2)
    await turn
    await expect.poll(async () => Number(await chart.getAttribute("data-points")), { timeout: 15_000 }).toBeGreaterThanOrEqual(first + 4)
    // The finished turn's tokens show as a rate (over the last 10 s).
    await expect.poll(async () => Number(await chart.getAttribute("data-last")), { timeout: 15_000 }).toBeGreaterThan(0)
    expect(await page.locator(".pool[data-pool='frontier'] canvas").count()).toBe(4)
    await page.screenshot({ path: path.join(SCREENSHOTS, "ops.png"), fullPage: true })
    await context.close()
  }, 90_000)
})
