/**
 * The web client and the operator dashboard, as files bundled at build time
 * (`scripts/build-web.ts` → `dist/web`, or `WEB_DIR`), held in memory and served on every
 * gateway runner, before the API's routes:
 *
 * - `GET /` the chat page, `GET /ops` the dashboard (its data needs an admin key);
 * - `GET /assets/*` their scripts and styles.
 *
 * Every page gets a Content-Security-Policy that allows only this origin's scripts (no inline
 * script, no `eval`), so a reply that slipped past the client's sanitiser still runs nothing.
 * Without a bundle (`npm run build` not run) the pages answer 503 saying so; the API is
 * unaffected.
 */
import { HttpApp, HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { Config, Context, Effect, Layer, Option } from "effect"
import { createHash } from "node:crypto"
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs"
import { dirname, extname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"

interface Asset {
  readonly body: Uint8Array
  readonly contentType: string
  readonly etag: string
}

const CONTENT_TYPES: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".map": "application/json",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".ico": "image/x-icon"
}

const CONTENT_SECURITY_POLICY = [
  "default-src 'self'",
  "script-src 'self'",
  // Preact and uPlot set styles through the CSSOM, which this does not restrict; markup
  // styles (a `style` attribute or element) are refused.
  "style-src 'self'",
  "img-src 'self' data:",
  "connect-src 'self'",
  "object-src 'none'",
  "base-uri 'none'",
  "frame-ancestors 'none'",
  "form-action 'none'"
].join("; ")

/** The bundled files by URL path (`/`, `/ops`, `/assets/chat.js`, …); empty when not built. */
export class WebAssets extends Context.Reference<WebAssets>()("chat/http/WebAssets", {
  defaultValue: (): { readonly files: ReadonlyMap<string, Asset>; readonly dir: string } => ({ files: new Map(), dir: "" })
}) {
  /** Loads `dir` (default: `dist/web` of this package). */
  static readonly load = (dir: string): { readonly files: ReadonlyMap<string, Asset>; readonly dir: string } => {
    const files = new Map<string, Asset>()
    if (!existsSync(dir)) return { files, dir }
    const walk = (path: string, prefix: string): void => {
      for (const name of readdirSync(path)) {
        const full = join(path, name)
        if (statSync(full).isDirectory()) walk(full, `${prefix}${name}/`)
        else {
          const body = readFileSync(full)
          const asset = {
            body,
            contentType: CONTENT_TYPES[extname(name)] ?? "application/octet-stream",
            etag: `"${createHash("sha256").update(body).digest("base64url").slice(0, 22)}"`
          }
          files.set(`/${prefix}${name}`, asset)
        }
      }
    }
    walk(dir, "")
    const index = files.get("/index.html")
    const ops = files.get("/ops.html")
    if (index !== undefined) files.set("/", index)
    if (ops !== undefined) files.set("/ops", ops)
    return { files, dir }
  }

  /** `WEB_DIR`, default `dist/web` of this package. */
  static readonly layerConfig = Layer.effect(
    WebAssets,
    Effect.map(Config.option(Config.string("WEB_DIR")), (dir) => WebAssets.load(Option.getOrElse(dir, defaultWebDir)))
  )
}

/** `dist/web` beside this package's package.json (from `src/http` under tsx, `dist/src/http` compiled). */
const defaultWebDir = (): string => {
  let dir = dirname(fileURLToPath(import.meta.url))
  while (!existsSync(join(dir, "package.json")) && dirname(dir) !== dir) dir = dirname(dir)
  return resolve(dir, "dist", "web")
}

const PAGES: ReadonlyArray<string> = ["/", "/ops"]
const isPage = (path: string) => PAGES.includes(path)

/** The paths the web client is served at (GET and HEAD). */
export const routes: ReadonlyArray<string> = [...PAGES, "/assets/*"]

/**
 * Answers the web routes from {@link WebAssets}; every other request goes to `app`. A page
 * is revalidated on each load (`no-cache` with an ETag) so that a deploy shows at once.
 */
export const middleware = <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E, R | HttpServerRequest.HttpServerRequest> =>
  Effect.gen(function*() {
    const request = yield* HttpServerRequest.HttpServerRequest
    if (request.method !== "GET" && request.method !== "HEAD") return yield* app
    const q = request.url.indexOf("?")
    const path = q < 0 ? request.url : request.url.slice(0, q)
    if (!isPage(path) && !path.startsWith("/assets/")) return yield* app
    const { files } = yield* WebAssets
    const asset = files.get(path)
    if (asset === undefined) {
      if (isPage(path)) {
        return HttpServerResponse.text("The web client is not built: run `npm run build` (or `npm start`).", {
          status: 503,
          headers: { "retry-after": "60" }
        })
      }
      return yield* app
    }
    const headers: Record<string, string> = {
      "content-type": asset.contentType,
      "cache-control": "no-cache",
      etag: asset.etag,
      "x-content-type-options": "nosniff"
    }
    if (isPage(path)) {
      headers["content-security-policy"] = CONTENT_SECURITY_POLICY
      headers["referrer-policy"] = "no-referrer"
    }
    if (request.headers["if-none-match"] === asset.etag) return HttpServerResponse.empty({ status: 304, headers })
    return HttpServerResponse.uint8Array(request.method === "HEAD" ? new Uint8Array() : asset.body, { headers })
  })
