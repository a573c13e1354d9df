"""The contract between ``attn-demo`` and the stages that apps register."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ArtifactKind = Literal["image", "audio", "video", "table", "text"]


@dataclass
class Artifact:
    """One thing shown in the report.

    ``image`` / ``audio`` / ``video`` point at a file inside the stage's folder (``path``);
    ``table`` carries ``rows`` (first row is the header); ``text`` carries ``text``.
    """

    kind: ArtifactKind
    caption: str = ""
    path: Path | None = None
    rows: Sequence[Sequence[object]] | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.kind in ("image", "audio", "video") and self.path is None:
            raise ValueError(f"a {self.kind} artifact needs a path")
        if self.kind == "table" and not self.rows:
            raise ValueError("a table artifact needs rows (header first)")
        if self.kind == "text" and self.text is None:
            raise ValueError("a text artifact needs text")


@dataclass
class StageResult:
    """What a stage produced: a one-line summary for the console table, and artifacts."""

    summary: str
    artifacts: list[Artifact] = field(default_factory=list)


@dataclass
class StageContext:
    """Where a stage writes (``out_dir``, its own empty folder) and how it should run."""

    out_dir: Path
    device: str = "cpu"
    seed: int = 0


@dataclass(frozen=True)
class Stage:
    """A named demo step. ``run`` gets a :class:`StageContext` and returns a StageResult."""

    name: str
    title: str
    description: str
    run: Callable[[StageContext], StageResult]
    order: int = 100
