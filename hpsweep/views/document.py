"""Rendering the report's sections to a self-contained HTML page and a Markdown twin.

The report is built as plain data (:class:`Section`, :class:`Table`, cells that are scalars,
:class:`~hpsweep.views.stats.Stat` or :class:`Links`); this module only turns it into text.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import re
from collections.abc import Sequence
from typing import Any

from hpsweep.fmt import PARAM_DIGITS, fmt_value  # parameter values with the CLI's digits
from hpsweep.views.stats import Stat

__all__ = ["Links", "Table", "Section", "render_html", "render_markdown"]


@dataclasses.dataclass
class Links:
    """A table cell of one or more links (label, url or None); ``state`` colours it."""

    items: list[tuple[str, str | None]]
    state: str | None = None


@dataclasses.dataclass
class Table:
    header: list[str]
    rows: list[list[Any]]
    kind: str = ""                      # the HTML table's data-kind, for tests and styling


@dataclasses.dataclass
class Section:
    title: str
    paragraphs: list[str] = dataclasses.field(default_factory=list)
    tables: list[Table] = dataclasses.field(default_factory=list)
    details: list[tuple[str, Table]] = dataclasses.field(default_factory=list)
    figures: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)




# -- HTML ------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:12.5px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.stat{white-space:nowrap;font-variant-numeric:tabular-nums}
.done{background:#e8f6e8}.running{background:#fff6d6}.failed{background:#fbe0e0}
.pending{background:#eee;color:#777}
.v-reproduced{background:#e8f6e8}.v-not-reproduced{background:#fbe0e0}.v-inconclusive{background:#fff6d6}
figure{margin:16px 0}figcaption{font-size:12px;color:#555}
img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;padding:0 3px}
"""

_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_CODE = re.compile(r"`([^`]+)`")


def _inline_html(text: str) -> str:
    out = html.escape(text, quote=False)
    out = _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", out)
    return _LINK.sub(lambda m: f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>', out)


def _num(x: float) -> str:
    return repr(float(x)) if not math.isnan(x) else "nan"


def _cell_html(v: Any) -> str:
    if isinstance(v, Stat):
        attrs = (f' class="stat" data-metric="{html.escape(v.metric)}" data-mean="{_num(v.mean)}"'
                 f' data-std="{_num(v.std)}" data-n="{v.n}" data-planned="{v.N}"'
                 f' data-runs="{",".join(v.run_ids)}"')
        return f"<td{attrs}>{html.escape(v.fmt())}</td>"
    if isinstance(v, Links):
        parts = [f'<a href="{html.escape(u)}">{html.escape(lab)}</a>' if u else html.escape(lab)
                 for lab, u in v.items]
        cls = f' class="{v.state}"' if v.state else ""
        return f"<td{cls}>{' '.join(parts)}</td>"
    text = fmt_value(v, PARAM_DIGITS)
    if text in ("reproduced", "not reproduced", "inconclusive"):
        return f'<td class="v-{text.replace(" ", "-")}"><b>{text}</b></td>'
    return f"<td>{html.escape(text)}</td>"


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "\n".join("<tr>" + "".join(_cell_html(c) for c in row) + "</tr>" for row in t.rows)
    if not t.rows:
        body = f'<tr><td colspan="{len(t.header)}">(nothing yet)</td></tr>'
    return f'<table data-kind="{t.kind}"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def render_html(title: str, sections: Sequence[Section]) -> str:
    """One self-contained page: inline CSS, figures as base64 PNG, no external resource."""
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}"
             f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts += [f"<p>{_inline_html(p)}</p>" for p in s.paragraphs]
        parts += [_table_html(t) for t in s.tables]
        for summary, t in s.details:
            parts.append(f"<details><summary>{html.escape(summary)}</summary>{_table_html(t)}</details>")
        for caption, png in s.figures:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
                         f'{data}"><figcaption>{html.escape(caption)}</figcaption></figure>')
        if s.title.endswith("Figures") and not s.figures:
            parts.append("<p>No finished runs to draw yet.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# -- Markdown --------------------------------------------------------------------------------

def _cell_md(v: Any) -> str:
    if isinstance(v, Stat):
        text = v.fmt()
    elif isinstance(v, Links):
        text = " ".join(f"[{lab}]({u})" if u else lab for lab, u in v.items)
    else:
        text = fmt_value(v, PARAM_DIGITS)
        if text in ("reproduced", "not reproduced", "inconclusive"):
            text = f"**{text}**"
    return text.replace("|", "\\|").replace("\n", " ")


def _table_md(t: Table) -> str:
    lines = ["| " + " | ".join(_cell_md(h) for h in t.header) + " |",
             "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(_cell_md(c) for c in row) + " |" for row in t.rows]
    if not t.rows:
        lines.append("| (nothing yet) |" + " |" * (len(t.header) - 1))
    return "\n".join(lines)


def render_markdown(title: str, sections: Sequence[Section], figure_files: Sequence[str]) -> str:
    """The Markdown twin; figures are linked as files beside it (``figures/*.png``)."""
    out = [f"# {title}", ""]
    files = iter(figure_files)
    for s in sections:
        out += [f"## {s.title}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        for t in s.tables:
            out += [_table_md(t), ""]
        for summary, t in s.details:
            out += [f"<details><summary>{summary}</summary>", "", _table_md(t), "", "</details>", ""]
        for caption, _ in s.figures:
            out += [f"![{caption}]({next(files)})", ""]
    return "\n".join(out)
