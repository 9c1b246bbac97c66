/**
 * Model replies as Markdown (marked, GitHub-flavoured) made safe with DOMPurify: a reply is
 * untrusted text, so whatever HTML it contains (`<script>`, `<img onerror>`, `javascript:`
 * links) is stripped before it reaches the page. Links open in a new tab without an opener.
 */
import DOMPurify from "dompurify"
import { marked } from "marked"

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank")
    node.setAttribute("rel", "noopener noreferrer")
  }
})

/** `text` as sanitised HTML. */
export const renderMarkdown = (text: string): string =>
  DOMPurify.sanitize(marked.parse(text, { async: false, gfm: true, breaks: true }), { USE_PROFILES: { html: true } })
