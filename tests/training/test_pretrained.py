"""Pretrained folders: save/load round trip, strict checks, foreign weights."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from attn_training.pretrained import (
    WEIGHTS_INDEX_NAME,
    PretrainedMixin,
    StateDictMismatchError,
    load_state_dict_checked,
    load_weights,
    save_pretrained_state,
)


@dataclasses.dataclass
class Widths:
    hidden: int = 6
    out: int = 2


class Net(PretrainedMixin, nn.Module):
    def __init__(
        self, in_features: int = 4, widths: Widths | None = None, tie: bool = False, **extra: float
    ) -> None:
        super().__init__()
        widths = widths or Widths()
        self.widths = widths
        self.extra = extra
        self.a = nn.Linear(in_features, widths.hidden)
        self.b = nn.Linear(widths.hidden, widths.out)
        self.norm = nn.BatchNorm1d(widths.hidden)
        if tie:
            self.c = nn.Linear(widths.hidden, widths.hidden, bias=False)
            self.d = nn.Linear(widths.hidden, widths.hidden, bias=False)
            self.d.weight = self.c.weight


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_rebuilds_config_and_weights(tmp_path):
    model = Net(in_features=5, widths=Widths(hidden=7, out=3), scale=0.5)
    model.norm.running_mean.normal_()
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config == {
        "in_features": 5,
        "widths": {"hidden": 7, "out": 3},
        "tie": False,
        "scale": 0.5,
    }
    loaded = Net.from_pretrained(tmp_path / "m")
    assert loaded.widths == Widths(hidden=7, out=3) and loaded.extra == {"scale": 0.5}
    assert _equal(model, loaded)
    assert not loaded.training


def test_tied_weights_and_shards(tmp_path):
    model = Net(tie=True, widths=Widths(hidden=64, out=2))
    model.save_pretrained(tmp_path / "m", max_shard_size=20_000)
    assert (tmp_path / "m" / WEIGHTS_INDEX_NAME).is_file()
    loaded = Net.from_pretrained(tmp_path / "m")
    assert _equal(model, loaded)


def test_strict_load_names_every_offending_key():
    model = Net()
    state = dict(Net(widths=Widths(out=5)).state_dict())
    del state["a.bias"]
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as info:
        load_state_dict_checked(model, state)
    text = str(info.value)
    for key in ("a.bias", "head.weight", "b.weight (model [2, 6], weights [5, 6])", "b.bias"):
        assert key in text
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_skip_mismatched_keeps_the_models_own_head():
    model, donor = Net(), Net(widths=Widths(out=5))
    head = model.b.weight.detach().clone()
    report = load_state_dict_checked(model, donor.state_dict(), skip_mismatched=True)
    assert report.skipped == ["b.bias", "b.weight"]
    assert torch.equal(model.b.weight, head)
    assert torch.equal(model.a.weight, donor.a.weight)


def test_from_pretrained_with_a_new_head(tmp_path):
    Net().save_pretrained(tmp_path / "m")
    with pytest.raises(StateDictMismatchError, match=r"b\.weight"):
        Net.from_pretrained(tmp_path / "m", widths=Widths(out=9))
    model = Net.from_pretrained(tmp_path / "m", strict=False, widths=Widths(out=9))
    assert model.b.out_features == 9 and "b.weight" in model.load_report.skipped


def test_load_weights_from_torch_files(tmp_path):
    model = Net()
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "w.ckpt")
    loaded = load_weights(tmp_path / "w.ckpt")
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


class _Payload:
    pass


def test_load_weights_refuses_pickled_objects(tmp_path):
    torch.save({"state_dict": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a weights-only PyTorch file"):
        load_weights(tmp_path / "evil.pt")


def test_config_must_be_json(tmp_path):
    with pytest.raises(TypeError, match=r"config\.fn is a builtin_function_or_method"):
        save_pretrained_state(tmp_path / "m", {}, {"fn": print})
    assert not (tmp_path / "m").exists()
