"""Small HTML building blocks for the report: escaping, tables, embedded figures, the page.

Everything the page needs is inside it: figures are base64 data URIs, the style sheet and the
one script (switching the token view's example) are inline, nothing is fetched.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..plotting import PHASE_COLORS

MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
        ".gif": "image/gif", ".webp": "image/webp"}


def esc(x: Any) -> str:
    """`x` as text safe inside HTML elements and attributes."""
    return html.escape(str(x), quote=True)


def fmt(v: Any, digits: int = 4) -> str:
    """A cell value as text: floats to `digits` significant digits, None as a dash."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def pct(v: float | None) -> str:
    """A fraction as a percentage with one decimal."""
    return "–" if v is None else f"{100 * v:.1f}"


def table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], *, row_classes: Sequence[str] | None = None,
    raw: bool = False, caption: str | None = None,
) -> str:
    """An HTML table; cells are formatted with `fmt` and escaped unless `raw` (cells already HTML)."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{esc(row_classes[i])}"' if row_classes and row_classes[i] else ""
        cells = "".join(f"<td>{c if raw else esc(fmt(c))}</td>" for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<div class="wide"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def kv_table(items: Mapping[str, Any]) -> str:
    """Two-column table of names and values."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in items.items())
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def image(data: bytes, mime: str, alt: str) -> str:
    """An <img> with the image inside the page as a base64 data URI."""
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img class="figure" alt="{esc(alt)}" src="data:{mime};base64,{b64}">'


def image_file(path: Path, alt: str) -> str:
    mime = MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"{path}: not an image type the report embeds ({', '.join(MIME)})")
    return image(path.read_bytes(), mime, alt)


def phase_chip(label: str) -> str:
    """A phase label in its figure colour."""
    dark = label in ("low_accuracy", "over_memorized", "overfitting")
    colors = f'background:{PHASE_COLORS.get(label, "#ddd")};color:{"#fff" if dark else "#111"}'
    return (f'<span class="chip" style="{colors}">'
            f"{esc(label.replace('_', ' '))}</span>")


def note(text: str) -> str:
    """A paragraph saying why something is missing."""
    return f'<p class="note">{esc(text)}</p>'


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


@dataclass
class Section:
    """One titled part of the page; `anchor` is its id (unique in the page)."""

    anchor: str
    title: str
    body: str
    level: int = 2


def render_sections(sections: Sequence[Section]) -> str:
    """Sections as HTML, each with its heading and anchor."""
    return "".join(
        f'<section id="{esc(s.anchor)}"><h{s.level}>{esc(s.title)}</h{s.level}>{s.body}</section>' for s in sections
    )


def page(title: str, subtitle: str, nav: Sequence[Section], body: str) -> str:
    """The whole self-contained document."""
    links = "".join(f'<a href="#{esc(s.anchor)}">{esc(s.title)}</a>' for s in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p><nav>{links}</nav></header>"
        f"<main>{body}</main><script>{SCRIPT}</script></body></html>\n"
    )


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; margin: 0;
       background: #fafafa; }
header { background: #26215c; color: #fff; padding: 14px 28px; }
header h1 { margin: 0; font-size: 22px; }
header .sub { margin: 2px 0 8px; opacity: .8; }
nav a { color: #ffe680; margin-right: 14px; text-decoration: none; font-size: 13px; }
main { max-width: 1280px; margin: 0 auto; padding: 8px 28px 40px; }
section { margin-top: 22px; }
h2 { border-bottom: 2px solid #26215c; padding-bottom: 3px; }
h3 { margin-bottom: 6px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; background: #fff; }
th, td { border: 1px solid #d4d4d8; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #efeff4; }
td:first-child, th:first-child, table.kv td { text-align: left; }
caption { text-align: left; font-weight: 600; padding: 4px 0; }
tr.recommended td { background: #fff4bf; font-weight: 600; }
.reason { display: block; text-align: left; font-size: 12px; font-weight: normal; color: #444; min-width: 260px; }
.wide { overflow-x: auto; max-width: 100%; }
.figures { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
img.figure { max-width: 100%; height: auto; display: block; margin: 8px 0; background: #fff;
             border: 1px solid #e4e4e7; }
.note { color: #555; font-style: italic; }
.summary { background: #fff; border-left: 4px solid #7b3fbf; padding: 8px 12px; }
pre { background: #f4f4f5; padding: 8px; overflow-x: auto; font-size: 12px; }
.chip { padding: 1px 6px; border-radius: 8px; font-size: 12px; white-space: nowrap; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.panel { background: #fff; border: 1px solid #d4d4d8; padding: 10px 12px; }
.panel h4 { margin: 0 0 6px; }
.question { color: #333; margin: 6px 0 10px; }
.tokens { font: 13px/1.9 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; white-space: pre-wrap;
          word-break: break-word; }
.tok { border-radius: 2px; }
.sppl { font: 10px system-ui, sans-serif; background: #26215c; color: #fff; border-radius: 6px; padding: 0 4px;
        margin: 0 3px; vertical-align: super; }
.scale { display: inline-block; width: 220px; height: 12px; vertical-align: middle; border: 1px solid #aaa; }
select { font-size: 13px; padding: 2px 4px; max-width: 100%; }
.run-title { background: #efeff4; padding: 6px 10px; border-radius: 4px; }
"""

SCRIPT = """
document.querySelectorAll('select.example-select').forEach(function (sel) {
  sel.addEventListener('change', function () {
    var box = document.getElementById(sel.dataset.target);
    box.querySelectorAll('.token-example').forEach(function (el) {
      el.hidden = el.dataset.example !== sel.value;
    });
  });
});
"""
