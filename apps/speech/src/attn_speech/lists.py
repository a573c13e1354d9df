"""File lists the speech commands read: manifests, speaker folders and trial lists.

* Manifest CSV with a header naming a ``wav`` (SpeechBrain) or ``path`` column, and for
  training ``spk_id``; ``$data_root`` / ``{data_root}`` in paths are replaced and relative
  paths are taken from ``data_root`` (default: the manifest's folder). Any other text
  file is one path per line.
* Speaker folder: ``root/<speaker>/<utterance>.<ext>`` (nested folders allowed).
* Trials (VoxCeleb): ``label enroll test`` per line, label ``1``/``0`` or
  ``target``/``nontarget``, paths relative to ``data_root``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au", ".w64")


class ListError(ValueError):
    """A list file that cannot be used; the message names the file and line."""


def _resolve(text: str, root: Path) -> Path:
    text = text.strip().replace("{data_root}", str(root)).replace("$data_root", str(root))
    path = Path(text).expanduser()
    return path if path.is_absolute() else root / path


@dataclass(frozen=True)
class Utterance:
    path: Path
    speaker: str | None = None
    id: str | None = None


def read_manifest(path: str | Path, data_root: str | Path | None = None) -> list[Utterance]:
    """Utterances of a CSV manifest or a one-path-per-line list."""
    path = Path(path)
    root = Path(data_root) if data_root is not None else path.parent
    if not path.is_file():
        raise ListError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0] if text.strip() else ""
    if path.suffix.lower() == ".csv" or "," in first:
        rows = list(csv.DictReader(text.splitlines()))
        if not rows:
            raise ListError(f"{path}: empty manifest")
        fields = [f.strip() for f in rows[0]]
        column = "wav" if "wav" in fields else "path" if "path" in fields else None
        if column is None:
            raise ListError(f"{path}: the header needs a 'wav' or 'path' column, got {fields}")
        out = []
        for n, row in enumerate(rows, 2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if not row.get(column):
                raise ListError(f"{path}:{n}: empty {column}")
            out.append(Utterance(_resolve(row[column], root), row.get("spk_id"), row.get("ID")))
        return out
    return [
        Utterance(_resolve(line, root))
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def read_speaker_folder(root: str | Path) -> list[Utterance]:
    """``root/<speaker>/.../<utterance>`` audio files, sorted, speaker = first folder."""
    root = Path(root)
    if not root.is_dir():
        raise ListError(f"{root}: not a folder")
    out = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in AUDIO_SUFFIXES and path.is_file():
            rel = path.relative_to(root)
            if len(rel.parts) < 2:
                raise ListError(f"{path}: audio directly in {root}; expected <speaker>/<file>")
            out.append(Utterance(path, rel.parts[0], str(rel.with_suffix(""))))
    if not out:
        raise ListError(f"{root}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
    return out


def read_speaker_data(source: str | Path, data_root: str | Path | None = None) -> list[Utterance]:
    """Training data from a manifest (``ID,wav,spk_id[,duration]``) or a speaker folder."""
    source = Path(source)
    if source.is_dir():
        return read_speaker_folder(source)
    utts = read_manifest(source, data_root)
    missing = [u for u in utts if not u.speaker]
    if missing:
        raise ListError(f"{source}: rows without spk_id (first: {missing[0].path})")
    return utts


@dataclass(frozen=True)
class Trial:
    """One trial; ``enroll_id`` / ``test_id`` are the paths as the list wrote them."""

    label: int
    enroll: Path
    test: Path
    enroll_id: str = ""
    test_id: str = ""


_LABELS = {"1": 1, "0": 0, "target": 1, "nontarget": 0, "non-target": 0}


def read_trials(path: str | Path, data_root: str | Path | None = None) -> list[Trial]:
    """VoxCeleb-format trials; relative paths are taken from ``data_root`` (default:
    the trial file's folder)."""
    path = Path(path)
    root = Path(data_root) if data_root is not None else path.parent
    if not path.is_file():
        raise ListError(f"{path}: no such file")
    trials = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0].lower() not in _LABELS:
            raise ListError(f"{path}:{n}: expected 'label enroll test', got {line.strip()!r}")
        label, enroll, test = _LABELS[parts[0].lower()], parts[1], parts[2]
        trials.append(Trial(label, _resolve(enroll, root), _resolve(test, root), enroll, test))
    if not trials:
        raise ListError(f"{path}: no trials")
    labels = {t.label for t in trials}
    if labels != {0, 1}:
        raise ListError(f"{path}: needs both target (1) and non-target (0) trials")
    return trials
