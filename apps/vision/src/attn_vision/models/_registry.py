"""The names this package registers with timm.

:func:`register_model` is timm's decorator plus a record of the name, so that
:func:`list_models` answers with this package's models only, whatever else is registered.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from timm.models import register_model as _timm_register_model

_NAMES: list[str] = []


def register_model(fn: Callable) -> Callable:
    """Register ``fn`` with timm (``timm.create_model(fn.__name__)``) and remember its name."""
    _NAMES.append(fn.__name__)
    return _timm_register_model(fn)


def list_models(pattern: str = "*") -> list[str]:
    """Names of the models ``attn_vision`` registers with timm, sorted (``fnmatch`` filter)."""
    return sorted(n for n in _NAMES if fnmatch.fnmatch(n, pattern))
