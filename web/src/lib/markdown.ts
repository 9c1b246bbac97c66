/**
 * Model replies as Markdown (marked, GitHub-flavoured) made safe with DOMPurify: a reply is
 * untrusted text (and any user can store one through the OpenAI route, then share it), so
 * whatever HTML it contains is stripped before it reaches the page: scripts and event
 * handlers (`<script>`, `<img onerror>`, `javascript:` links), and also styles, forms and
 * popovers, with which a reply could dress itself up as the page (a fake sign-in over it).
 * Links open in a new tab without an opener.
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
  DOMPurify.sanitize(marked.parse(text, { async: false, gfm: true, breaks: true }), {
    USE_PROFILES: { html: true },
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option", "dialog", "iframe", "object", "embed"],
    FORBID_ATTR: ["style", "class", "id", "popover", "popovertarget", "popovertargetaction"]
  })
