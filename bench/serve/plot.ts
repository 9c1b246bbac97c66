/** A small hand-written SVG line chart (no dependencies): panels of series over a shared x. */

export interface Series {
  readonly name: string
  readonly color: string
  readonly dashed?: boolean
  readonly points: ReadonlyArray<readonly [number, number]>
}

export interface Panel {
  readonly title: string
  readonly xLabel: string
  readonly yLabel: string
  readonly logX: boolean
  readonly logY: boolean
  readonly series: ReadonlyArray<Series>
}

const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")

const fmt = (v: number): string => {
  const a = Math.abs(v)
  if (a >= 1e6) return `${+(v / 1e6).toPrecision(3)}M`
  if (a >= 1e3) return `${+(v / 1e3).toPrecision(3)}k`
  if (a >= 1) return `${+v.toPrecision(3)}`
  return `${+v.toPrecision(2)}`
}

const ticks = (lo: number, hi: number, log: boolean): Array<number> => {
  if (log) {
    const out: Array<number> = []
    for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
      for (const m of [1, 2, 5]) {
        const v = m * 10 ** e
        if (v >= lo * 0.999 && v <= hi * 1.001) out.push(v)
      }
    }
    return out
  }
  const span = hi - lo
  const step0 = 10 ** Math.floor(Math.log10(span / 5))
  const step = [1, 2, 5, 10].map((m) => m * step0).find((s) => span / s <= 6) ?? step0 * 10
  const out: Array<number> = []
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(v)
  return out
}

const panelSvg = (p: Panel, x0: number, y0: number, w: number, h: number): string => {
  const ml = 64, mr = 14, mt = 28, mb = 44
  const pw = w - ml - mr, ph = h - mt - mb
  const pts = p.series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!p.logX || x > 0) && (!p.logY || y > 0))
  const out: Array<string> = [`<g transform="translate(${x0},${y0})">`, `<text x="${w / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">${esc(p.title)}</text>`]
  if (pts.length === 0) {
    out.push(`<text x="${w / 2}" y="${h / 2}" text-anchor="middle" font-size="12">no data</text></g>`)
    return out.join("\n")
  }
  let xlo = Math.min(...pts.map((q) => q[0])), xhi = Math.max(...pts.map((q) => q[0]))
  let ylo = Math.min(...pts.map((q) => q[1])), yhi = Math.max(...pts.map((q) => q[1]))
  if (p.logX) { xlo = xlo / 1.3; xhi = xhi * 1.3 } else { const d = (xhi - xlo) * 0.05 || 1; xlo -= d; xhi += d }
  if (p.logY) { ylo = ylo / 1.5; yhi = yhi * 1.5 } else { ylo = 0; yhi = yhi * 1.1 || 1 }
  const tx = (x: number) => ml + (p.logX ? (Math.log(x) - Math.log(xlo)) / (Math.log(xhi) - Math.log(xlo)) : (x - xlo) / (xhi - xlo)) * pw
  const ty = (y: number) => mt + ph - (p.logY ? (Math.log(y) - Math.log(ylo)) / (Math.log(yhi) - Math.log(ylo)) : (y - ylo) / (yhi - ylo)) * ph
  out.push(`<rect x="${ml}" y="${mt}" width="${pw}" height="${ph}" fill="none" stroke="#888"/>`)
  const xt = p.logX ? [...new Set(pts.map((q) => q[0]))].sort((a, b) => a - b) : ticks(xlo, xhi, false)
  for (const v of xt) {
    const X = tx(v)
    out.push(`<line x1="${X}" y1="${mt}" x2="${X}" y2="${mt + ph}" stroke="#eee"/>`)
    out.push(`<text x="${X}" y="${mt + ph + 16}" text-anchor="middle" font-size="11">${Number.isInteger(v) && v < 100_000 ? String(v) : fmt(v)}</text>`)
  }
  for (const v of ticks(ylo, yhi, p.logY)) {
    const Y = ty(v)
    out.push(`<line x1="${ml}" y1="${Y}" x2="${ml + pw}" y2="${Y}" stroke="#eee"/>`)
    out.push(`<text x="${ml - 6}" y="${Y + 4}" text-anchor="end" font-size="11">${fmt(v)}</text>`)
  }
  out.push(`<text x="${ml + pw / 2}" y="${h - 8}" text-anchor="middle" font-size="12">${esc(p.xLabel)}</text>`)
  out.push(`<text transform="translate(14,${mt + ph / 2}) rotate(-90)" text-anchor="middle" font-size="12">${esc(p.yLabel)}</text>`)
  p.series.forEach((s, i) => {
    const sp = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!p.logX || x > 0) && (!p.logY || y > 0))
    if (sp.length > 0) {
      const d = sp.map(([x, y], j) => `${j === 0 ? "M" : "L"}${tx(x).toFixed(1)},${ty(y).toFixed(1)}`).join(" ")
      out.push(`<path d="${d}" fill="none" stroke="${s.color}" stroke-width="2"${s.dashed === true ? ` stroke-dasharray="6,4"` : ""}/>`)
      for (const [x, y] of sp) out.push(`<circle cx="${tx(x).toFixed(1)}" cy="${ty(y).toFixed(1)}" r="3" fill="${s.color}"/>`)
    }
    const ly = mt + 14 + i * 16
    out.push(`<line x1="${ml + 8}" y1="${ly - 4}" x2="${ml + 30}" y2="${ly - 4}" stroke="${s.color}" stroke-width="2"${s.dashed === true ? ` stroke-dasharray="6,4"` : ""}/>`)
    out.push(`<text x="${ml + 34}" y="${ly}" font-size="11">${esc(s.name)}</text>`)
  })
  out.push("</g>")
  return out.join("\n")
}

/** Panels in rows of `columns`; a title and a footnote line. */
export const renderSvg = (title: string, footnote: string, panels: ReadonlyArray<Panel>, columns = 2): string => {
  const pw = 480, ph = 320, top = 36, bottom = 24
  const rows = Math.ceil(panels.length / columns)
  const W = pw * columns, H = top + rows * ph + bottom
  const body = panels.map((p, i) => panelSvg(p, (i % columns) * pw, top + Math.floor(i / columns) * ph, pw, ph)).join("\n")
  return `<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif">
<rect width="${W}" height="${H}" fill="white"/>
<text x="${W / 2}" y="22" text-anchor="middle" font-size="16" font-weight="bold">${esc(title)}</text>
${body}
<text x="8" y="${H - 8}" font-size="10" fill="#555">${esc(footnote)}</text>
</svg>
`
}
