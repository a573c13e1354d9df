"""Reading SpeechBrain ``hyperparams.yaml`` files without running them.

HyperPyYAML's tags (``!new:``, ``!name:``, ``!ref``, ...) would import and call arbitrary
code; here they are parsed as data (:class:`Tagged`) and only ``!ref`` references are
resolved: ``<key>``, ``<key[sub]>``, string interpolation and plain arithmetic.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Tagged:
    """A YAML node carrying a HyperPyYAML tag, e.g. ``!new:speechbrain...ECAPA_TDNN``."""

    tag: str
    value: Any

    @property
    def kind(self) -> str:
        return self.tag.split(":", 1)[0]

    @property
    def target(self) -> str:
        return self.tag.split(":", 1)[1] if ":" in self.tag else ""


class _Loader(yaml.SafeLoader):
    pass


def _tagged(loader: _Loader, suffix: str, node: yaml.Node) -> Tagged:
    tag = "!" + suffix
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return Tagged(tag, value)


_Loader.add_multi_constructor("!", _tagged)

_REF = re.compile(r"<([^<>]+)>")
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _arith(node: ast.AST):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _arith(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    raise ValueError("not arithmetic")


class HParams:
    """A parsed ``hyperparams.yaml``: ``get(key)`` returns the value with ``!ref`` resolved."""

    def __init__(self, text: str, source: str = "hyperparams.yaml") -> None:
        self.source = source
        try:
            self.root = yaml.load(text, Loader=_Loader) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{source}: not valid YAML ({exc})") from None
        if not isinstance(self.root, dict):
            raise ValueError(f"{source}: the top level must be a mapping")

    @classmethod
    def read(cls, path: str | Path) -> HParams:
        path = Path(path)
        return cls(path.read_text(encoding="utf-8"), str(path))

    def __contains__(self, key: str) -> bool:
        return key in self.root

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.root:
            return default
        return self.resolve(self.root[key], (key,))

    def _lookup(self, name: str, seen: tuple[str, ...]) -> Any:
        parts = re.findall(r"[^\[\]]+", name)
        if not parts or parts[0] not in self.root:
            raise ValueError(f"{self.source}: !ref <{name}> names no top-level key")
        if parts[0] in seen:
            raise ValueError(f"{self.source}: circular !ref through {parts[0]!r}")
        value = self.resolve(self.root[parts[0]], (*seen, parts[0]))
        for part in parts[1:]:
            value = value.value if isinstance(value, Tagged) else value
            try:
                value = value[int(part)] if isinstance(value, list) else value[part]
            except (KeyError, IndexError, ValueError, TypeError):
                raise ValueError(f"{self.source}: !ref <{name}> does not resolve") from None
        return value

    def _ref(self, text: str, seen: tuple[str, ...]) -> Any:
        whole = _REF.fullmatch(text.strip())
        if whole:
            return self._lookup(whole.group(1), seen)
        substituted = _REF.sub(lambda m: str(self._lookup(m.group(1), seen)), text)
        try:
            return _arith(ast.parse(substituted, mode="eval").body)
        except (SyntaxError, ValueError):
            return substituted

    def resolve(self, value: Any, seen: tuple[str, ...] = ()) -> Any:
        if isinstance(value, Tagged):
            if value.kind == "!ref":
                return self._ref(str(value.value), seen)
            return Tagged(value.tag, self.resolve(value.value, seen))
        if isinstance(value, dict):
            return {k: self.resolve(v, seen) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, seen) for v in value]
        return value
