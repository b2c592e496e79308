"""HTML building blocks of the report: every value taken from data is escaped unless marked as markup."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
.missing { background: #fff4e5; border-left: 4px solid #f0a030; padding: 0.5em 0.8em; }
.note { color: #555; font-size: 0.9em; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
.group { display: flex; gap: 6px; align-items: flex-start; margin: 0.6em 0; padding: 6px; background: #fafafa; }
.thumbs { display: flex; flex-wrap: wrap; gap: 6px; }
.thumb { width: 100px; text-align: center; font-size: 0.75em; word-break: break-all; }
.thumb img { width: 96px; height: 96px; object-fit: contain; background: #000; display: block; margin: 0 auto; }
.anchor img { outline: 3px solid #d73027; }
.placeholder { width: 96px; height: 96px; margin: 0 auto; background: #eee; color: #a00; font-size: 0.8em;
  overflow: hidden; display: flex; align-items: center; justify-content: center; }
code, pre { background: #f5f5f5; padding: 0 0.2em; } pre { padding: 0.5em; overflow-x: auto; }
"""


class Markup(str):
    """A string of trusted HTML, inserted without escaping."""


def esc(value: object) -> Markup:
    """``value`` as HTML text (markup passes through unchanged)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def join(parts: Iterable[object]) -> Markup:
    """Concatenate parts, escaping the ones that are not markup."""
    return Markup("".join(esc(p) for p in parts))


def fmt_int(value: float | int | None) -> str:
    """A count with thousands separators ("-" when unknown)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{int(round(value)):,}"


def fmt_pct(fraction: float | None) -> str:
    """A fraction as a percentage that keeps small shares visible."""
    if fraction is None or math.isnan(fraction):
        return "-"
    pct = 100.0 * fraction
    if pct == 0.0 or abs(pct) >= 0.01:
        return f"{pct:.2f}%"
    return f"{pct:.2g}%"


def fmt_mean_std(mean: float, std: float) -> str:
    """``mean ± std`` with one decimal."""
    return f"{mean:,.1f} ± {std:,.1f}"


def tag(name: str, body: object = "", **attrs: object) -> Markup:
    """One element; attribute values are escaped, ``cls`` becomes ``class``."""
    attr = "".join(f' {"class" if k == "cls" else k}="{esc(v)}"' for k, v in attrs.items() if v is not None)
    return Markup(f"<{name}{attr}>{esc(body)}</{name}>")


def table(headers: Sequence[object], rows: Iterable[Sequence[object]], align: str = "l") -> Markup:
    """A table; ``align`` gives "l" (text) or "r" (number) per column, missing letters mean "r"."""

    def cells(name: str, row: Sequence[object]) -> Markup:
        return join(tag(name, v, cls="text" if align[i : i + 1] == "l" else None) for i, v in enumerate(row))

    head = tag("tr", cells("th", headers))
    body = join(tag("tr", cells("td", row)) for row in rows)
    return tag("table", join([tag("thead", head), tag("tbody", body)]))


def missing(what: str, command: str) -> Markup:
    """A notice that an artifact is absent and which command produces it."""
    return tag("p", join([f"{what} not found; run ", tag("code", command), " to produce it."]), cls="missing")


def note(text: object) -> Markup:
    """A short explanatory paragraph."""
    return tag("p", text, cls="note")


def figure(src: str, alt: str, caption: object = None) -> Markup:
    """An image (relative file or data URI) with an optional caption."""
    img = Markup(f'<img src="{esc(src)}" alt="{esc(alt)}">')
    return tag("figure", join([img, tag("figcaption", caption) if caption else ""]))


def thumb(
    src: str | None, caption: object, error: str | None = None, anchor: bool = False, title: str | None = None
) -> Markup:
    """A thumbnail with a caption, or a placeholder that shows why it could not be drawn."""
    if src is None:
        pic = tag("div", error or "no image", cls="placeholder", title=error or "no image")
    else:
        pic = Markup(f'<img src="{esc(src)}" alt="{esc(caption)}">')
    return tag(
        "div", join([pic, tag("div", caption)]), cls="thumb anchor" if anchor else "thumb", title=title
    )


def section(anchor: str, title: str, parts: Iterable[object]) -> Markup:
    """A titled section of the page."""
    return tag("section", join([tag("h2", title), *parts]), id=anchor)


def page(title: str, header: Iterable[object], sections: Sequence[tuple[str, str, Markup]]) -> str:
    """The whole self-contained document: inline CSS, no scripts, no network resources."""
    nav = tag("nav", join(tag("a", t, href=f"#{a}") for a, t, _ in sections))
    body = join([tag("h1", title), *header, nav, *(s for _, _, s in sections)])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>{body}</body></html>\n"
    )
