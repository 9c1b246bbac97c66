/**
 * Bundles the web client (`web/src/chat`) and the operator dashboard (`web/src/ops`) with
 * esbuild into `dist/web` (or the directory given as the first argument): `index.html`,
 * `ops.html` and `assets/` (scripts, styles, source maps). Everything the pages load is in
 * there: no CDN at run time. Run by `npm run build` and `scripts/setup.sh`.
 */
import { build } from "esbuild"
import { copyFileSync, mkdirSync, rmSync } from "node:fs"
import { dirname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..")
const outDir = resolve(process.argv[2] ?? join(root, "dist", "web"))

rmSync(outDir, { recursive: true, force: true })
mkdirSync(join(outDir, "assets"), { recursive: true })
await build({
  entryPoints: {
    chat: join(root, "web/src/chat/main.tsx"),
    ops: join(root, "web/src/ops/main.tsx")
  },
  outdir: join(outDir, "assets"),
  bundle: true,
  format: "esm",
  splitting: false,
  target: ["es2022", "chrome110", "firefox110", "safari16"],
  jsx: "automatic",
  jsxImportSource: "preact",
  minify: true,
  sourcemap: "linked",
  legalComments: "linked",
  logLevel: "warning",
  tsconfig: join(root, "web/tsconfig.json")
})
for (const page of ["index.html", "ops.html"]) copyFileSync(join(root, "web", page), join(outDir, page))
console.log(`web: bundled into ${outDir}`)
