"""HTML pieces of the dataset card: escaping, tables, inline PNGs and a small, safe Markdown renderer.

Everything that reaches the card from a catalog row (names, notes, a model card's Markdown) is escaped
here; the card never holds a tag, link or image that its own code did not write.
"""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from catalog.fs import is_remote

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]*)[^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]*)[^)]*\)")
_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def esc(value: Any) -> str:
    """Return ``value`` as HTML text (None as the empty string)."""
    return html.escape("" if value is None else str(value))


def table(header: list[str] | None, rows: list[list[Any]], *, html_columns: frozenset[int] = frozenset()) -> str:
    """Return an HTML table; every cell is escaped except the columns in ``html_columns`` (the card's own HTML)."""
    head = "" if header is None else "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{c if i in html_columns else esc(c)}</td>" for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def img(png: bytes, alt: str = "plot") -> str:
    """Return an ``<img>`` holding ``png`` inline (base64), so the card fetches nothing."""
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def figure_png(fig) -> str:
    """Return a matplotlib ``Figure`` as an inline ``<img>``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return img(buffer.getvalue())


def display_root(root_uri: str) -> str:
    """Return how the card names a dataset root: a local root's folder name, a remote URI without credentials."""
    if not is_remote(root_uri):
        return root_uri.removeprefix("file://").rstrip("/").rsplit("/", 1)[-1] or "/"
    parts = urlsplit(root_uri)
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))


def render_inline(text: str) -> str:
    """Escape Markdown text and keep only code spans and bold; links and images become plain text."""
    text = _IMAGE.sub(lambda m: f"[image: {m.group(1) or m.group(2)}]", text)
    text = _LINK.sub(lambda m: f"{m.group(1)} ({m.group(2)})" if m.group(2) else m.group(1), text)
    out = esc(text)
    out = _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", out)
    return _BOLD.sub(lambda m: f"<b>{m.group(1)}</b>", out)


def _table_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _md_table(lines: list[str]) -> str:
    rows = [_table_cells(line) for line in lines if not _TABLE_RULE.match(line)]
    head = "<tr>" + "".join(f"<th>{render_inline(c)}</th>" for c in rows[0]) + "</tr>" if rows else ""
    body = "".join("<tr>" + "".join(f"<td>{render_inline(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table>{head}{body}</table>"


def _md_block(kind: str, lines: list[str]) -> str:
    if kind == "pre":
        return f"<pre>{esc(chr(10).join(lines))}</pre>"
    if kind == "table":
        return _md_table(lines)
    if kind == "ul":
        return "<ul>" + "".join(f"<li>{render_inline(item)}</li>" for item in lines) + "</ul>"
    return "<p>" + render_inline(" ".join(line.strip() for line in lines)) + "</p>"  # bold may span lines


def render_markdown(markdown: str, *, heading_shift: int = 2) -> str:
    """Render Markdown as safe HTML: headings, paragraphs, bullets, pipe tables, fenced code, code spans, bold.

    All text is escaped; raw HTML in the source shows as text, images and links as their text, so nothing is
    fetched. Headings move down ``heading_shift`` levels (a card's ``#`` under the page's ``h2``).
    """
    blocks: list[str] = []
    kind, lines = "", []  # the open block: "p", "ul", "table", "pre" or "" (none)

    def close() -> None:
        nonlocal kind, lines
        if kind and (lines or kind == "pre"):
            blocks.append(_md_block(kind, lines))
        kind, lines = "", []

    for line in markdown.splitlines():
        if kind == "pre":
            if _FENCE.match(line):
                close()
            else:
                lines.append(line)
            continue
        heading, bullet = _HEADING.match(line), _BULLET.match(line)
        if _FENCE.match(line) or heading or not line.strip():
            close()
            if _FENCE.match(line):
                kind = "pre"
            elif heading:
                level = min(6, len(heading.group(1)) + heading_shift)
                blocks.append(f"<h{level}>{render_inline(heading.group(2))}</h{level}>")
            continue
        if kind == "ul" and not bullet and line[:1] in (" ", "\t"):
            lines[-1] += " " + line.strip()  # a bullet's continuation line
            continue
        new_kind = "table" if line.lstrip().startswith("|") else "ul" if bullet else "p"
        if new_kind != kind:
            close()
            kind = new_kind
        lines.append(bullet.group(1) if bullet and kind == "ul" else line)
    close()
    return "\n".join(blocks)
