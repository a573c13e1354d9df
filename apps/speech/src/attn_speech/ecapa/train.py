"""``attn-speech ecapa train``: ECAPA-TDNN on speaker-labelled audio with the shared harness.

Random fixed-length crops, optional speed perturbation / reverberation / noise, an
AAM-softmax loss over the training speakers, and (with ``--val-trials``) the EER of a
trial list as the validation metric; the final model is then calibrated on that list.
Everything else (checkpoints, resuming, DDP through ``torchrun`` / ``accelerate launch``,
mixed precision, ``--init-from``) is :mod:`attn_training`'s.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from attn_speech.audio import load_audio
from attn_speech.ecapa.augment import Augmenter
from attn_speech.ecapa.config import ClassifierConfig, FbankConfig, Threshold, trials_label, variant
from attn_speech.ecapa.loss import AAMSoftmaxLoss
from attn_speech.ecapa.metrics import eer, min_dcf
from attn_speech.ecapa.speaker import EcapaSpeaker, save_model
from attn_speech.lists import Utterance, read_speaker_data, read_trials

logger = logging.getLogger("attn_speech")


def crop_or_tile(wav: torch.Tensor, n: int) -> torch.Tensor:
    """A random ``n``-sample window, or the waveform repeated up to ``n`` samples."""
    if wav.numel() >= n:
        start = random.randint(0, wav.numel() - n)
        return wav[start : start + n]
    reps = n // wav.numel() + 1
    return wav.repeat(reps)[:n]


class SpeakerCrops(Dataset):
    """``(waveform crop [samples], speaker index)`` per utterance; decoded audio is cached
    (up to ``cache_mb``) because every epoch reads every file again."""

    def __init__(
        self,
        utterances: list[Utterance],
        labels: list[str],
        crop_seconds: float = 3.0,
        sample_rate: int = 16000,
        augmenter: Augmenter | None = None,
        cache_mb: float = 2048.0,
    ) -> None:
        self.utterances = utterances
        self.index = {spk: i for i, spk in enumerate(labels)}
        self.crop = round(crop_seconds * sample_rate)
        self.sample_rate = sample_rate
        self.augmenter = augmenter
        self.cache_bytes = cache_mb * 2**20
        self._cache: dict[int, torch.Tensor] = {}
        self._cached = 0

    def __len__(self) -> int:
        return len(self.utterances)

    def sample_path(self, i: int) -> str:
        return str(self.utterances[i].path)

    def _audio(self, i: int) -> torch.Tensor:
        if i in self._cache:
            return self._cache[i]
        wav = load_audio(self.utterances[i].path, self.sample_rate)
        if self._cached + wav.numel() * 4 <= self.cache_bytes:
            self._cache[i] = wav
            self._cached += wav.numel() * 4
        return wav

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        wav = self._audio(i)
        aug = self.augmenter
        if aug is not None and aug.speeds != (1.0,):
            # Speed-perturb a window a little longer than the crop, not the whole file.
            wav = crop_or_tile(wav, int(self.crop * max(aug.speeds)) + 1)
            wav = aug.speed(wav)
        wav = crop_or_tile(wav, self.crop)
        if aug is not None:
            wav = aug.corrupt(wav)
        return wav.contiguous(), self.index[self.utterances[i].speaker]


class TrialValidator:
    """EER and minDCF(0.01) of a trial list, the audio read once and kept in memory."""

    def __init__(self, trials_path: str | Path, data_root: str | Path | None, sample_rate: int):
        self.trials = read_trials(trials_path, data_root)
        files = sorted({t.enroll for t in self.trials} | {t.test for t in self.trials})
        self.audio = {p: load_audio(p, sample_rate) for p in files}
        self.labels = np.array([t.label for t in self.trials])

    def scores(self, model: EcapaSpeaker) -> np.ndarray:
        device = next(model.parameters()).device
        emb = {}
        with torch.no_grad():
            for p, wav in self.audio.items():
                e = model.embed(wav[None].to(device))[0].float()
                emb[p] = torch.nn.functional.normalize(e, dim=0).cpu().numpy()
        return np.array([emb[t.enroll] @ emb[t.test] for t in self.trials])

    def __call__(self, model: EcapaSpeaker) -> dict[str, float]:
        s = self.scores(model)
        pos, neg = s[self.labels == 1], s[self.labels == 0]
        return {"eer": eer(pos, neg)[0], "min_dcf": min_dcf(pos, neg, 0.01)[0]}


def _speeds(text: str) -> tuple[float, ...]:
    try:
        speeds = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected factors like 0.9,1.0,1.1, got {text!r}"
        ) from None
    if not speeds or min(speeds) <= 0:
        raise argparse.ArgumentTypeError("speed factors must be positive")
    return speeds


def build_model(args, labels: list[str], log=None) -> tuple[EcapaSpeaker, bool]:
    """The model to train and whether its weights came from ``--init-from`` here."""
    from attn_speech.ecapa.cli import load_any_model

    log = sys.stderr if log is None else log
    init = Path(args.init_from) if args.init_from else None
    if init is not None and (
        (init / "config.json").is_file() or (init / "hyperparams.yaml").is_file()
    ):
        base = load_any_model(str(init), torch.device("cpu"), log=log).train()
        if base.labels == labels and base.classifier is not None:
            return base, True
        print(
            f"fine-tuning {base.describe()} from {init} with a new head over "
            f"{len(labels)} speakers",
            file=log,
        )
        return base.with_new_head(labels).train(), True
    cfg = variant(args.variant)
    if args.channels:
        c = args.channels
        cfg = replace(cfg, channels=(c, c, c, c, 3 * c))
    model = EcapaSpeaker(
        model=cfg,
        features=FbankConfig(n_mels=cfg.input_size),
        classifier=ClassifierConfig(out_neurons=len(labels), lin_neurons=cfg.lin_neurons),
        labels=labels,
    )
    return model, False


def cmd_train(args) -> int:
    from attn_training import TrainConfig, Trainer, seed_everything

    utts = read_speaker_data(args.data, args.data_root)
    labels = sorted({u.speaker for u in utts})
    if len(labels) < 2:
        raise ValueError(f"{args.data}: needs at least 2 speakers, found {len(labels)}")
    seed_everything(args.seed)
    model, preloaded = build_model(args, labels)
    augmenter = Augmenter(
        model.sample_rate,
        speeds=args.speed_perturb,
        noise_dir=args.noise_dir,
        rir_dir=args.rir_dir,
        p_noise=args.p_noise,
        p_reverb=args.p_reverb,
        snr_db=(args.snr_min, args.snr_max),
    )
    dataset = SpeakerCrops(
        utts, labels, args.crop_seconds, model.sample_rate, augmenter if augmenter.active else None
    )
    validator = (
        TrialValidator(args.val_trials, args.val_data_root, model.sample_rate)
        if args.val_trials
        else None
    )
    loss = AAMSoftmaxLoss(margin=args.margin, scale=args.scale)

    def loss_fn(m, batch):
        wavs, targets = batch
        cosines = m(wavs)
        value = loss(cosines, targets)
        accuracy = (cosines.argmax(dim=1) == targets).float().mean()
        return value, {"accuracy": float(accuracy)}

    config = TrainConfig.from_args(
        args,
        task="ecapa",
        data=str(args.data),
        speakers=len(labels),
        utterances=len(utts),
        crop_seconds=args.crop_seconds,
        margin=args.margin,
        scale=args.scale,
    )
    if preloaded:
        config.init_from = None  # weights already taken from --init-from above
    if validator is None and args.best_metric == "eer":
        config.best_metric = "loss"
    trainer = Trainer(model, dataset, config, loss_fn=loss_fn, val_fn=validator)
    result = trainer.fit()
    final = result.final_dir
    print(f"trained {result.step} steps; model in {final}")
    if validator is not None and trainer.accelerator.is_main_process:
        for folder in (final, result.best_dir):
            if folder is not None:
                calibrate_folder(folder, validator, args.val_trials)
    return 0


def calibrate_folder(folder: Path, validator: TrialValidator, trials: str | Path) -> None:
    """Store the EER threshold of the validation trials in an exported model folder."""
    model = EcapaSpeaker.from_pretrained(folder)
    s = validator.scores(model)
    pos, neg = s[validator.labels == 1], s[validator.labels == 0]
    e, thr = eer(pos, neg)
    threshold = Threshold(value=thr, method="eer", trials=trials_label(trials), eer=e)
    save_model(model.with_threshold(threshold), folder)
    print(f"{folder}: validation EER {100 * e:.2f}%, threshold {thr:.4f} stored")
    return 0


def register(sub, wrap=lambda f: f) -> None:
    from attn_training import add_train_arguments

    s = sub.add_parser(
        "train",
        help="train or fine-tune ECAPA-TDNN (AAM-softmax) on speaker-labelled audio",
        description="Train or fine-tune ECAPA-TDNN on speaker-labelled audio with the shared "
        "training harness (attn_training): AAM-softmax, random crops, augmentation.",
    )
    s.add_argument(
        "data", help="manifest CSV (ID,wav,spk_id[,duration]) or <speaker>/<file> folder"
    )
    s.add_argument("--data-root", default=None, help="root of relative manifest paths")
    s.add_argument(
        "--variant",
        default="ecapa_c512",
        choices=("ecapa_c128", "ecapa_c512", "ecapa_c1024"),
        help="architecture when not fine-tuning (default: ecapa_c512)",
    )
    s.add_argument(
        "--channels",
        type=int,
        default=0,
        help="override the variant's channel width C (MFA gets 3C); 0: the variant's",
    )
    s.add_argument("--crop-seconds", type=float, default=3.0, help="training crop (default: 3.0)")
    s.add_argument("--margin", type=float, default=0.2, help="AAM margin (default: 0.2)")
    s.add_argument("--scale", type=float, default=30.0, help="AAM scale (default: 30)")
    s.add_argument(
        "--speed-perturb",
        type=_speeds,
        default=(1.0,),
        help="tempo factors drawn per sample, e.g. 0.9,1.0,1.1 (default: off)",
    )
    s.add_argument("--noise-dir", default=None, help="folder of noise recordings (default: off)")
    s.add_argument("--rir-dir", default=None, help="folder of impulse responses (default: off)")
    s.add_argument("--p-noise", type=float, default=0.5, help="noise probability (default: 0.5)")
    s.add_argument("--p-reverb", type=float, default=0.5, help="reverb probability (default: 0.5)")
    s.add_argument("--snr-min", type=float, default=0.0, help="lowest SNR in dB (default: 0)")
    s.add_argument("--snr-max", type=float, default=15.0, help="highest SNR in dB (default: 15)")
    s.add_argument(
        "--val-trials", default=None, help="trial list for validation EER and calibration"
    )
    s.add_argument("--val-data-root", default=None, help="root of --val-trials paths")
    add_train_arguments(
        s,
        output_dir=Path("runs/ecapa"),
        batch_size=32,
        lr=1e-3,
        weight_decay=2e-5,
        warmup_steps=200,
        epochs=10,
        best_metric="eer",
        best_mode="min",
    )
    s.set_defaults(func=wrap(cmd_train))
