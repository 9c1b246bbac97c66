/**
 * Which methods the API serves at a path: to tell a wrong method (405 with `Allow`, RFC 9110
 * §15.5.6) and a path parameter the router refused (find-my-way's `maxParamLength`, a bad
 * percent-encoding: 400) from a path nothing serves (404).
 */
import { HttpApi } from "@effect/platform"
import { escapeRegExp } from "../../runtime/internal/escapeRegExp.js"

interface RouteShape {
  readonly method: string
  readonly pattern: RegExp
}

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

/** The path as the router matches it: no duplicate slashes, no trailing one. */
const normalize = (path: string): string => {
  const collapsed = path.replace(/\/{2,}/g, "/")
  return collapsed.length > 1 && collapsed.endsWith("/") ? collapsed.slice(0, -1) : collapsed
}

/**
 * The methods of `api`'s endpoints (and `extra` routes served beside it) whose path matches,
 * HEAD wherever GET is. Built once; each call is a scan of the API's ~40 routes, made only for
 * a request no route took.
 */
export const makeAllowedMethods = (
  api: HttpApi.HttpApi.Any,
  extra: ReadonlyArray<{ readonly method: string; readonly path: string }> = []
): (path: string) => ReadonlyArray<string> => {
  const routes: Array<RouteShape> = extra.map((r) => ({ method: r.method, pattern: patternOf(r.path) }))
  HttpApi.reflect(api as HttpApi.HttpApi<string, any, any, any>, {
    onGroup: () => {},
    onEndpoint: ({ endpoint }) => routes.push({ method: endpoint.method, pattern: patternOf(endpoint.path) })
  })
  return (rawPath) => {
    const path = normalize(rawPath)
    const methods = new Set<string>()
    for (const route of routes) {
      if (!route.pattern.test(path)) continue
      methods.add(route.method)
      if (route.method === "GET") methods.add("HEAD")
    }
    return [...methods]
  }
}
