"""Random-number state: seeding, capture/restore as tensors, per-sample seeds.

NumPy's legacy global generator is handled because that is what dataset code calls
(``np.random.rand`` ...).

States are tensors (not pickled objects) so that checkpoints keep them in safetensors.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

_MASK63 = (1 << 63) - 1


def seed_everything(seed: int, *, cuda: bool = True) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU, and GPUs if ``cuda``)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))  # noqa: NPY002
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (e.g. ``run seed, epoch, sample index``)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & _MASK63


def capture_rng_state(*, cuda: bool = True) -> dict[str, torch.Tensor]:
    """The state of every generator this process uses, as CPU tensors.

    With ``cuda`` the current GPU's generator is included (if CUDA is in use).
    """
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    assert kind == "MT19937"
    state = {
        "python.state": torch.tensor([version, *py_state], dtype=torch.int64),
        "python.gauss": torch.tensor(
            [0.0 if gauss is None else 1.0, gauss or 0.0], dtype=torch.float64
        ),
        "numpy.keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy.pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy.gauss": torch.tensor([cached], dtype=torch.float64),
        "torch.cpu": torch.get_rng_state(),
    }
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch.cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python.state"].tolist()
    has_gauss, gauss = state["python.gauss"].tolist()
    random.setstate((py[0], tuple(py[1:]), gauss if has_gauss else None))
    pos, np_has_gauss = state["numpy.pos"].tolist()
    np.random.set_state(  # noqa: NPY002
        (
            "MT19937",
            state["numpy.keys"].numpy().astype(np.uint32),
            pos,
            np_has_gauss,
            float(state["numpy.gauss"].item()),
        )
    )
    # set_rng_state reads the storage from its start: a row of a stacked tensor must be copied.
    torch.set_rng_state(state["torch.cpu"].clone())
    if "torch.cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch.cuda"].clone())


@contextlib.contextmanager
def isolated_rng(
    seed: int | None = None, *, restore: bool = True, cuda: bool = True
) -> Iterator[None]:
    """Run a block with its own random state, optionally seeded from ``seed``.

    With ``restore=True`` the generators of the process are put back afterwards, so the
    block neither sees nor disturbs the surrounding random stream. ``cuda=False`` leaves
    the GPU generator out (for CPU-only work such as loading a sample).
    """
    saved = capture_rng_state(cuda=cuda) if restore else None
    try:
        if seed is not None:
            seed_everything(seed, cuda=cuda)
        yield
    finally:
        if saved is not None:
            restore_rng_state(saved)
