"""Import a SpeechBrain ECAPA-TDNN folder (``spkrec-ecapa-voxceleb`` layout) as EcapaSpeaker.

The folder holds ``hyperparams.yaml`` and ``embedding_model.ckpt``, and optionally
``classifier.ckpt``, ``mean_var_norm_emb.ckpt`` and ``label_encoder.txt``. The architecture
comes from the YAML (parsed as data, never executed); every ``.ckpt`` is read with
``torch.load(weights_only=True)`` and loaded with strict key and shape checks that name
every missing, unexpected or mismatched key.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import torch

from attn_speech.ecapa.config import ClassifierConfig, EcapaConfig, FbankConfig
from attn_speech.ecapa.hparams import HParams, Tagged
from attn_speech.ecapa.speaker import EcapaSpeaker
from attn_training.pretrained import load_state_dict_checked, load_weights

ECAPA = "speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN"
CLASSIFIER = "speechbrain.lobes.models.ECAPA_TDNN.Classifier"
FBANK = "speechbrain.lobes.features.Fbank"
NORM = "speechbrain.processing.features.InputNormalization"

_ACTIVATIONS = {"torch.nn.ReLU": "relu", "torch.nn.LeakyReLU": "leaky_relu"}
# ECAPA_TDNN's signature, in order (for positional YAML arguments).
_ECAPA_ARGS = [
    "input_size",
    "device",
    "lin_neurons",
    "activation",
    "channels",
    "kernel_sizes",
    "dilations",
    "attention_channels",
    "res2net_scale",
    "se_channels",
    "global_context",
    "groups",
    "dropout",
]
_FBANK_DEFAULTS = {
    "deltas": False,
    "context": False,
    "requires_grad": False,
    "filter_shape": "triangular",
    "param_change_factor": 1.0,
    "param_rand_factor": 0.0,
    "left_frames": 5,
    "right_frames": 5,
}


class SpeechBrainImportError(ValueError):
    """The folder is not a SpeechBrain ECAPA-TDNN model this importer can take."""


def _object(hp: HParams, key: str, target: str, required: bool) -> dict | None:
    node = hp.get(key)
    if node is None:
        if required:
            raise SpeechBrainImportError(f"{hp.source}: no '{key}' entry")
        return None
    if not isinstance(node, Tagged) or node.kind != "!new" or node.target != target:
        got = node.tag if isinstance(node, Tagged) else type(node).__name__
        raise SpeechBrainImportError(f"{hp.source}: '{key}' must be !new:{target}, got {got}")
    args = node.value if node.value is not None else {}
    if isinstance(args, list):
        names = _ECAPA_ARGS if target == ECAPA else []
        if len(args) > len(names):
            raise SpeechBrainImportError(f"{hp.source}: positional arguments of '{key}'")
        args = dict(zip(names, args))
    return dict(args)


def ecapa_config(hp: HParams) -> EcapaConfig:
    args = _object(hp, "embedding_model", ECAPA, required=True)
    args.pop("device", None)
    act = args.pop("activation", None)
    if act is not None:
        name = act.target if isinstance(act, Tagged) else str(act)
        if name not in _ACTIVATIONS:
            raise SpeechBrainImportError(f"{hp.source}: unsupported activation {name}")
        args["activation"] = _ACTIVATIONS[name]
    known = set(inspect.signature(EcapaConfig).parameters)
    unknown = set(args) - known
    if unknown:
        raise SpeechBrainImportError(
            f"{hp.source}: embedding_model arguments not understood: {sorted(unknown)}"
        )
    if "input_size" not in args:
        raise SpeechBrainImportError(f"{hp.source}: embedding_model needs input_size")
    return EcapaConfig(**args)


def fbank_config(hp: HParams) -> FbankConfig:
    args = _object(hp, "compute_features", FBANK, required=True)
    for key, default in _FBANK_DEFAULTS.items():
        value = args.pop(key, default)
        if key in ("left_frames", "right_frames", "param_change_factor", "param_rand_factor"):
            continue  # only used by the context window / learnable filters refused below
        if value != default:
            raise SpeechBrainImportError(
                f"{hp.source}: compute_features {key}={value!r} is not supported"
            )
    unknown = set(args) - {
        "sample_rate",
        "n_mels",
        "n_fft",
        "win_length",
        "hop_length",
        "f_min",
        "f_max",
    }
    if unknown:
        raise SpeechBrainImportError(
            f"{hp.source}: compute_features arguments not understood: {sorted(unknown)}"
        )
    return FbankConfig(**{"n_mels": 40, **args})


def _check_norm(hp: HParams, key: str, norm_type: str, required: bool) -> bool:
    args = _object(hp, key, NORM, required=required)
    if args is None:
        return False
    got = (args.get("norm_type", "global"), bool(args.get("std_norm", True)))
    if got != (norm_type, False):
        raise SpeechBrainImportError(
            f"{hp.source}: {key} must be InputNormalization(norm_type={norm_type}, "
            f"std_norm=False), got norm_type={got[0]}, std_norm={got[1]}"
        )
    return True


def read_label_encoder(path: Path) -> list[str]:
    """Labels in class order from SpeechBrain's CategoricalEncoder text file."""
    by_index: dict[int, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("=" * 8):
            break
        if not line.strip():
            continue
        try:
            literal, index = line.rsplit(" => ", 1)
            label = ast.literal_eval(literal)
            by_index[int(index)] = str(label)
        except (ValueError, SyntaxError):
            raise SpeechBrainImportError(f"{path}:{n}: not a 'label' => index line") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise SpeechBrainImportError(f"{path}: class indices are not 0..{len(by_index) - 1}")
    return [by_index[i] for i in range(len(by_index))]


def _ckpt(folder: Path, name: str) -> Path | None:
    path = folder / name
    return path if path.is_file() else None


def import_speechbrain(folder: str | Path) -> tuple[EcapaSpeaker, list[str]]:
    """Build an :class:`EcapaSpeaker` from a SpeechBrain folder; returns it and notes."""
    folder = Path(folder)
    notes: list[str] = []
    yaml_path = folder / "hyperparams.yaml"
    if not yaml_path.is_file():
        raise SpeechBrainImportError(f"{folder}: no hyperparams.yaml")
    emb_path = _ckpt(folder, "embedding_model.ckpt")
    if emb_path is None:
        raise SpeechBrainImportError(f"{folder}: no embedding_model.ckpt")
    hp = HParams.read(yaml_path)
    model_cfg = ecapa_config(hp)
    fbank_cfg = fbank_config(hp)
    _check_norm(hp, "mean_var_norm", "sentence", required=True)

    head_args = _object(hp, "classifier", CLASSIFIER, required=False)
    cls_path = _ckpt(folder, "classifier.ckpt")
    head_cfg = None
    if head_args is not None and cls_path is not None:
        head_args.pop("device", None)
        input_size = head_args.pop("input_size", None)
        if input_size not in (None, model_cfg.lin_neurons):
            raise SpeechBrainImportError(
                f"{hp.source}: classifier input_size {input_size} != lin_neurons "
                f"{model_cfg.lin_neurons}"
            )
        head_cfg = ClassifierConfig(**{"out_neurons": 1211, **head_args})
    elif head_args is not None:
        notes.append("classifier in hyperparams.yaml but no classifier.ckpt: head not imported")
    elif cls_path is not None:
        notes.append("classifier.ckpt present but no classifier in hyperparams.yaml: skipped")

    labels = None
    label_path = _ckpt(folder, "label_encoder.txt") or _ckpt(folder, "label_encoder.ckpt")
    if head_cfg is not None and label_path is not None:
        labels = read_label_encoder(label_path)
        if len(labels) != head_cfg.out_neurons:
            raise SpeechBrainImportError(
                f"{label_path}: {len(labels)} labels for {head_cfg.out_neurons} classes"
            )

    norm_path = _ckpt(folder, "mean_var_norm_emb.ckpt")
    has_emb_norm = norm_path is not None and _check_norm(
        hp, "mean_var_norm_emb", "global", required=False
    )
    if norm_path is not None and not has_emb_norm:
        notes.append("mean_var_norm_emb.ckpt present but not declared in hyperparams.yaml: skipped")

    model = EcapaSpeaker(
        model=model_cfg,
        features=fbank_cfg,
        classifier=head_cfg,
        labels=labels,
        embedding_norm=has_emb_norm,
        source={"speechbrain": str(folder.resolve())},
    )
    load_state_dict_checked(model.embedding_model, load_weights(emb_path), source=str(emb_path))
    if head_cfg is not None:
        load_state_dict_checked(model.classifier, load_weights(cls_path), source=str(cls_path))
    if has_emb_norm:
        model.embedding_mean.copy_(_embedding_mean(norm_path, model_cfg.lin_neurons))
    return model.eval(), notes


def _embedding_mean(path: Path, size: int) -> torch.Tensor:
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SpeechBrainImportError(f"{path}: not a weights-only PyTorch file ({exc})") from None
    mean = stats.get("glob_mean") if isinstance(stats, dict) else None
    if not isinstance(mean, torch.Tensor):
        raise SpeechBrainImportError(f"{path}: no glob_mean tensor")
    mean = mean.reshape(-1)
    if mean.numel() != size:
        raise SpeechBrainImportError(
            f"{path}: glob_mean has {mean.numel()} values, expected {size}"
        )
    return mean.float()
