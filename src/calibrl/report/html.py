"""A single self-contained HTML page: headings, notes, tables and PNG images embedded as base64.

Nothing is loaded from anywhere when the page is opened: no scripts, no fonts, no stylesheets
but the inline one, images as ``data:image/png;base64,...`` URIs. Every text that goes into the
page is HTML-escaped. :mod:`calibrl.report.render` builds ``calibrl-compare``'s
``report.html`` with it.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Section", "image_html", "render_report", "table_html"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 0.9em; }
code { background: #f5f5f5; padding: 0 0.2em; }
.scroll { overflow-x: auto; }
"""


@dataclass
class Section:
    """One section of the page, drawn in this order: heading, notes, tables, images.

    Attributes:
        title: heading text.
        notes: paragraphs of plain text (escaped).
        tables: ``(caption, header [C], rows [R][C])`` of plain text cells (escaped).
        images: ``(PNG file, alt text)``, embedded as base64.
    """

    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[tuple[str, Sequence[str], Sequence[Sequence[str]]]] = field(default_factory=list)
    images: list[tuple[Path, str]] = field(default_factory=list)


def table_html(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "") -> str:
    """An HTML ``<table>`` of text cells (all escaped), in a horizontally scrolling box.

    Raises:
        ValueError: a row whose length differs from the header's.
    """
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row of {len(row)} cells under a header of {len(header)}: {list(row)!r}")
    esc = html.escape
    head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>\n" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table></div>\n'


def image_html(path: str | Path, alt: str) -> str:
    """An ``<img>`` whose source is the PNG file's bytes as a ``data:image/png;base64`` URI.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a PNG (checked by its 8-byte signature).
    """
    data = Path(path).read_bytes()
    if not data.startswith(PNG_MAGIC):
        raise ValueError(f"{path}: not a PNG file")
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    alt = html.escape(alt)
    return f'<figure><img src="{uri}" alt="{alt}"><figcaption class="note">{alt}</figcaption></figure>\n'


def render_report(title: str, sections: Sequence[Section], intro: Sequence[str] = ()) -> str:
    """The full HTML document (UTF-8, inline CSS only) of ``sections`` under ``title``.

    Raises:
        FileNotFoundError, ValueError: as :func:`image_html` and :func:`table_html`.
    """
    esc = html.escape
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        *(f'<p class="note">{esc(p)}</p>' for p in intro),
    ]
    for s in sections:
        parts.append(f"<h2>{esc(s.title)}</h2>")
        parts += [f'<p class="note">{esc(n)}</p>' for n in s.notes]
        parts += [table_html(header, rows, caption) for caption, header, rows in s.tables]
        parts += [image_html(p, alt) for p, alt in s.images]
    parts.append("</body></html>\n")
    return "\n".join(parts)
