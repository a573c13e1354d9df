"""``attn-speech make-data speakers``: an offline speaker corpus synthesised with espeak-ng.

Each speaker is one espeak-ng voice: an English accent, a voice variant, a base pitch and a
base rate. Each utterance is a different generated sentence, with the pitch, rate, word
gap and loudness jittered around the speaker's values, resampled to 16 kHz. The corpus
comes with a manifest, a speaker-disjoint train/(dev/)test split and VoxCeleb-format
trial lists on the held-out speakers.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm.auto import tqdm

from attn_speech.outputs import replace_folder

SAMPLE_RATE = 16000
ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
VARIANTS = [
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "m8",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "adam",
    "Alex",
    "Alicia",
    "Andrea",
    "Andy",
    "Annie",
    "aunty",
    "belinda",
    "benjamin",
    "caleb",
    "david",
    "ed",
    "edward",
    "Gene",
    "gustave",
    "Hugo",
    "iven",
    "Jacky",
    "john",
    "linda",
    "max",
    "Michael",
    "Mike",
    "norbert",
    "paul",
    "quincy",
    "rob",
    "robert",
    "steph",
    "shelby",
    "travis",
    "victor",
    "zac",
    "grandpa",
    "grandma",
    "anika",
    "klatt",
    "klatt2",
    "klatt3",
    "croak",
]
PITCHES = (25, 35, 45, 55, 65, 75)
RATES = (135, 150, 165, 180, 195)

_SUBJECTS = [
    "the old sailor",
    "my neighbour",
    "a tall teacher",
    "the young doctor",
    "our little dog",
    "the grey cat",
    "a quiet student",
    "the baker",
    "her brother",
    "the night guard",
    "a busy farmer",
    "the new pilot",
    "his sister",
    "the painter",
    "a tired driver",
    "the city mayor",
]
_VERBS = [
    "carried",
    "painted",
    "found",
    "opened",
    "cleaned",
    "watched",
    "borrowed",
    "repaired",
    "described",
    "counted",
    "followed",
    "remembered",
    "ordered",
    "wrapped",
    "delivered",
    "noticed",
]
_OBJECTS = [
    "a wooden box",
    "the yellow kite",
    "seven bright lamps",
    "an old map",
    "the broken clock",
    "a basket of apples",
    "the heavy door",
    "two silver spoons",
    "the morning paper",
    "a warm coat",
    "the garden gate",
    "a jar of honey",
    "the red bicycle",
    "a bundle of letters",
    "the kitchen table",
]
_PLACES = [
    "near the river",
    "before dinner",
    "in the quiet village",
    "after the long storm",
    "at the station",
    "under the bridge",
    "on a cold morning",
    "behind the market",
    "during the holiday",
    "by the harbour",
    "in the afternoon",
    "at the end of the street",
]
_ENDINGS = [
    "and nobody said a word",
    "while the bells were ringing",
    "because it was late",
    "and then went home",
    "as the sun came up",
    "without asking anyone",
    "and smiled at everyone",
    "before the rain began",
]


@lru_cache(maxsize=1)
def available_variants() -> frozenset[str]:
    out = subprocess.run(
        ["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True
    ).stdout
    return frozenset(line.split()[-1].split("/")[-1] for line in out.splitlines()[1:] if line)


def sentence(rng: random.Random) -> str:
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ENDINGS))
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker."""

    spk_id: str
    accent: str
    variant: str
    pitch: int
    rate: int

    @property
    def espeak_voice(self) -> str:
        return f"{self.accent}+{self.variant}"


def require_espeak() -> None:
    """Raise a clear error when Debian's espeak-ng, which synthesises every corpus, is absent."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")


def make_voices(n: int, seed: int) -> list[Voice]:
    """``n`` distinct voices; each variant is used once before any is reused."""
    have = available_variants()
    variants = [v for v in VARIANTS if v in have]
    if not variants:
        raise RuntimeError("espeak-ng reports none of the expected voice variants")
    rng = random.Random(seed)
    grid = list(itertools.product(ACCENTS, PITCHES, RATES))
    rng.shuffle(variants)
    voices, used = [], set()
    for i in range(n):
        variant = variants[i % len(variants)]
        shuffled = rng.sample(grid, len(grid))
        fresh = [c for c in shuffled if (variant, c[0], c[1]) not in used]
        accent, pitch, rate = fresh[0] if fresh else shuffled[0]
        used.add((variant, accent, pitch))
        voices.append(Voice(f"spk{i:03d}", accent, variant, pitch, rate))
    return voices


def synthesise(voice: Voice, text: str, rng: random.Random) -> np.ndarray:
    """One utterance of ``voice`` as float32 at 16 kHz."""
    cmd = [
        "espeak-ng",
        "-v",
        voice.espeak_voice,
        "-p",
        str(int(np.clip(voice.pitch + rng.randint(-4, 4), 0, 99))),
        "-s",
        str(voice.rate + rng.randint(-12, 12)),
        "-g",
        str(rng.randint(0, 4)),
        "-a",
        str(rng.randint(90, 160)),
        "--stdout",
        text,
    ]
    wav_bytes = subprocess.run(cmd, capture_output=True, check=True).stdout
    data, rate = sf.read(io.BytesIO(wav_bytes), dtype="float32")
    wav = torch.from_numpy(data)
    if rate != SAMPLE_RATE:
        wav = AF.resample(wav, rate, SAMPLE_RATE)
    return wav.numpy()


def make_trials(
    test: list[tuple[str, str]], rng: random.Random, nontarget_ratio: float = 2.0
) -> list[tuple[int, str, str]]:
    """All same-speaker pairs of ``(spk_id, path)`` items plus ``ratio`` times as many
    different-speaker pairs drawn at random."""
    by_spk: dict[str, list[str]] = {}
    for spk, path in test:
        by_spk.setdefault(spk, []).append(path)
    targets = [(1, a, b) for paths in by_spk.values() for a, b in itertools.combinations(paths, 2)]
    wanted = round(len(targets) * nontarget_ratio)
    pairs = [(a, b) for (sa, a), (sb, b) in itertools.combinations(test, 2) if sa != sb]
    nontargets = [(0, a, b) for a, b in rng.sample(pairs, min(wanted, len(pairs)))]
    trials = targets + nontargets
    rng.shuffle(trials)
    return trials


def make_speaker_corpus(
    out: str | Path,
    speakers: int = 40,
    utterances: int = 8,
    test_speakers: int = 10,
    dev_speakers: int = 0,
    seed: int = 0,
    overwrite: bool = False,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """Write the corpus to ``out``; returns its summary (also in ``out/corpus.json``).

    Speakers are split three ways, disjointly: ``test_speakers`` (``test.csv``,
    ``trials.txt``), ``dev_speakers`` (``dev.csv``, ``dev_trials.txt``; for validation and
    calibration) and the rest (``train.csv``).
    """
    out = Path(out)
    if speakers < 2 or utterances < 2:
        raise ValueError("need at least 2 speakers and 2 utterances per speaker")
    if not 2 <= test_speakers < speakers:
        raise ValueError(f"test speakers must be in [2, {speakers - 1}], got {test_speakers}")
    if dev_speakers and not 2 <= dev_speakers < speakers - test_speakers:
        raise ValueError(
            f"dev speakers must be 0 or in [2, {speakers - test_speakers - 1}], got {dev_speakers}"
        )
    replace_folder(out, overwrite)
    require_espeak()
    voices = make_voices(speakers, seed)
    rng = random.Random(seed + 1)
    order = rng.sample([v.spk_id for v in voices], len(voices))
    split_of = dict.fromkeys(order, "train")
    split_of.update(dict.fromkeys(order[:test_speakers], "test"))
    split_of.update(dict.fromkeys(order[test_speakers : test_speakers + dev_speakers], "dev"))
    jobs = []
    for v in voices:
        for u in range(utterances):
            r = random.Random(f"{seed}/{v.spk_id}/{u}")
            jobs.append((v, f"wav/{v.spk_id}/{v.spk_id}_u{u:02d}.wav", sentence(r), r))

    def run(job):
        voice, rel, text, r = job
        wav = synthesise(voice, text, r)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(out / rel, wav, SAMPLE_RATE, subtype="PCM_16")
        return len(wav) / SAMPLE_RATE

    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        durations = list(
            tqdm(pool.map(run, jobs), total=len(jobs), desc="espeak-ng", disable=not progress)
        )
    header = ["ID", "wav", "spk_id", "duration"]
    rows: dict[str, list] = {"train": [], "dev": [], "test": []}
    for (v, rel, _, _), dur in zip(jobs, durations):
        rows[split_of[v.spk_id]].append([Path(rel).stem, rel, v.spk_id, f"{dur:.3f}"])
    lists = [("manifest.csv", rows["train"] + rows["dev"] + rows["test"])]
    lists += [(f"{split}.csv", body) for split, body in rows.items() if body]
    for name, body in lists:
        with open(out / name, "w", newline="") as f:
            csv.writer(f).writerows([header, *body])
    with open(out / "speakers.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["spk_id", "accent", "variant", "pitch", "rate", "split"])
        for v in voices:
            w.writerow([v.spk_id, v.accent, v.variant, v.pitch, v.rate, split_of[v.spk_id]])
    trials = make_trials([(r[2], r[1]) for r in rows["test"]], random.Random(seed + 2))
    (out / "trials.txt").write_text("".join(f"{lab} {a} {b}\n" for lab, a, b in trials))
    if rows["dev"]:
        dev = make_trials([(r[2], r[1]) for r in rows["dev"]], random.Random(seed + 3))
        (out / "dev_trials.txt").write_text("".join(f"{lab} {a} {b}\n" for lab, a, b in dev))
    summary = {
        "speakers": speakers,
        "utterances_per_speaker": utterances,
        "test_speakers": sorted(k for k, v in split_of.items() if v == "test"),
        "dev_speakers": sorted(k for k, v in split_of.items() if v == "dev"),
        "seed": seed,
        "sample_rate": SAMPLE_RATE,
        "hours": round(sum(durations) / 3600, 4),
        "trials": {"target": sum(t[0] for t in trials), "nontarget": sum(1 - t[0] for t in trials)},
        "voices": [asdict(v) for v in voices],
    }
    (out / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
