"""Render the ``attn-demo`` report (``index.html``) from the stages' results."""

from __future__ import annotations

import datetime as _dt
import html
from dataclasses import dataclass
from pathlib import Path

from core_attention.demo.stage import Artifact, Stage, StageResult

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: .2rem; } .meta { color: #666; margin-top: 0; }
section { border-top: 1px solid #ddd; padding: 1rem 0; }
.badge { display: inline-block; padding: .1rem .5rem; border-radius: .3rem; font-size: .85rem;
         color: white; margin-left: .5rem; vertical-align: middle; }
.ok { background: #2e7d32; } .failed { background: #c62828; } .skipped { background: #757575; }
figure { margin: 1rem 0; } figure img, figure video { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9rem; }
table { border-collapse: collapse; margin: .5rem 0; }
td, th { border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; }
th { background: #f4f4f4; } pre { background: #f7f7f7; padding: .6rem; overflow-x: auto; }
"""


@dataclass
class StageRecord:
    """Outcome of one stage: ``status`` is ``ok``, ``failed`` or ``skipped``."""

    name: str
    title: str
    status: str
    seconds: float = 0.0
    summary: str = ""
    description: str = ""
    folder: str | None = None  # relative to the report root
    result: StageResult | None = None
    error: str | None = None

    @classmethod
    def skipped(cls, name: str, reason: str) -> StageRecord:
        return cls(name=name, title=name, status="skipped", summary=reason)

    @classmethod
    def for_stage(cls, stage: Stage, status: str, **kw) -> StageRecord:
        return cls(
            name=stage.name, title=stage.title, status=status, description=stage.description, **kw
        )


def _table(rows) -> str:
    head, *body = rows
    out = ["<table><tr>", *(f"<th>{html.escape(str(c))}</th>" for c in head), "</tr>"]
    for row in body:
        out += ["<tr>", *(f"<td>{html.escape(str(c))}</td>" for c in row), "</tr>"]
    out.append("</table>")
    return "".join(out)


def _artifact(a: Artifact, folder: str) -> str:
    cap = f"<figcaption>{html.escape(a.caption)}</figcaption>" if a.caption else ""
    src = html.escape(f"{folder}/{Path(a.path).name}") if a.path is not None else ""
    if a.kind == "image":
        body = f'<img src="{src}" alt="{html.escape(a.caption)}">'
    elif a.kind == "audio":
        body = f'<audio controls src="{src}"></audio>'
    elif a.kind == "video":
        body = f'<video controls loop src="{src}"></video>'
    elif a.kind == "table":
        body = _table(a.rows)
    else:
        body = f"<pre>{html.escape(a.text or '')}</pre>"
    return f"<figure>{body}{cap}</figure>"


def write_report(root: Path, records: list[StageRecord]) -> Path:
    """Write ``root/index.html`` showing every stage; returns its path."""
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>attn-demo report</title>",
        f"<style>{_CSS}</style></head><body><h1>attention-apps demo</h1>",
        f"<p class='meta'>{html.escape(when)} · {len(records)} stages</p>",
        _table(
            [("stage", "status", "seconds", "output")]
            + [(r.name, r.status, f"{r.seconds:.1f}", r.summary) for r in records]
        ),
    ]
    for r in records:
        parts.append(
            f"<section id='{html.escape(r.name)}'><h2>{html.escape(r.title)}"
            f"<span class='badge {r.status}'>{r.status}</span></h2>"
        )
        if r.description:
            parts.append(f"<p>{html.escape(r.description)}</p>")
        if r.summary:
            parts.append(f"<p><b>{html.escape(r.summary)}</b></p>")
        if r.result is not None and r.folder is not None:
            parts += [_artifact(a, r.folder) for a in r.result.artifacts]
        if r.error:
            parts.append(f"<pre>{html.escape(r.error)}</pre>")
        parts.append("</section>")
    parts.append("</body></html>")
    index = root / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index
