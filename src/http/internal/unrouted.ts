/**
 * Why no route took a request: a path served under other methods (405 with `Allow`, RFC 9110
 * §15.5.6), a path parameter the router refused (find-my-way's `maxParamLength`, a bad
 * percent-encoding: 400), or a path nothing serves (404).
 */
import { HttpApi } from "@effect/platform"
import { escapeRegExp } from "../../runtime/internal/escapeRegExp.js"

interface RouteShape {
  readonly method: string
  readonly pattern: RegExp
  /** Whether the path has a `:name` segment, which the router may refuse. */
  readonly hasParam: boolean
}

export type Unrouted =
  | { readonly _tag: "NotFound" }
  | { readonly _tag: "ParamRefused" }
  | { readonly _tag: "MethodNotAllowed"; readonly allow: string }

/** A route's path as a pattern: `:name` a segment, `*` the rest; case-insensitive, as the router is. */
const patternOf = (path: string): RegExp =>
  new RegExp(
    `^${
      path.split("/").map((segment) =>
        segment.startsWith(":") ? "[^/]+" : segment === "*" ? ".*" : escapeRegExp(segment)
      ).join("/")
    }$`,
    "i"
  )

/**
 * The path of a request target as the router matches it: its query and an absolute form's
 * scheme and host dropped, no duplicate slashes, no trailing one.
 */
const pathOf = (target: string): string => {
  const q = target.indexOf("?")
  const beforeQuery = q < 0 ? target : target.slice(0, q)
  const path = beforeQuery.replace(/^[a-z][a-z0-9+.-]*:\/\/[^/]*/i, "").replace(/\/{2,}/g, "/")
  return path.length > 1 && path.endsWith("/") ? path.slice(0, -1) : path === "" ? "/" : path
}

/**
 * Classifies a request no route took, from `api`'s endpoints and `extra` routes served beside
 * it (HEAD wherever GET is). Built once; each call scans the API's ~40 routes, and is made
 * only for a request no route took.
 */
export const makeUnrouted = (
  api: HttpApi.HttpApi.Any,
  extra: ReadonlyArray<{ readonly method: string; readonly path: string }> = []
): (method: string, target: string) => Unrouted => {
  const shape = (method: string, path: string): RouteShape => ({ method, pattern: patternOf(path), hasParam: path.includes("/:") })
  const routes: Array<RouteShape> = extra.map((r) => shape(r.method, r.path))
  HttpApi.reflect(api as HttpApi.HttpApi<string, any, any, any>, {
    onGroup: () => {},
    onEndpoint: ({ endpoint }) => routes.push(shape(endpoint.method, endpoint.path))
  })
  return (method, target) => {
    const path = pathOf(target)
    const allowed = new Set<string>()
    let paramRefused = false
    for (const route of routes) {
      if (!route.pattern.test(path)) continue
      allowed.add(route.method)
      if (route.method === "GET") allowed.add("HEAD")
      if (route.hasParam && (route.method === method || (method === "HEAD" && route.method === "GET"))) paramRefused = true
    }
    if (paramRefused) return { _tag: "ParamRefused" }
    if (allowed.size === 0 || allowed.has(method)) return { _tag: "NotFound" }
    return { _tag: "MethodNotAllowed", allow: [...allowed].join(", ") }
  }
}
