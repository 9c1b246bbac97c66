/**
 * Which methods the API serves at a path: to tell a wrong method (405 with `Allow`, RFC 9110
 * §15.5.6) and a path parameter the router refused (find-my-way's `maxParamLength`, a bad
 * percent-encoding: 400) from a path nothing serves (404).
 */
import { HttpApi } from "@effect/platform"

interface RouteShape {
  readonly method: string
  readonly pattern: RegExp
}

const patternOf = (path: string): RegExp =>
  new RegExp(`^${path.split("/").map((segment) => segment.startsWith(":") ? "[^/]+" : segment.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("/")}$`)

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
  return (path) => {
    const methods = new Set<string>()
    for (const route of routes) {
      if (!route.pattern.test(path)) continue
      methods.add(route.method)
      if (route.method === "GET") methods.add("HEAD")
    }
    return [...methods]
  }
}
