"""The monorepo's dependency direction and every console script, checked on the install."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
APPS = {
    "speech": ("attn-speech", "attn_speech", "attn-speech"),
    "vision": ("attn-vision", "attn_vision", "attn-vision"),
    "video_gen": ("attn-video-gen", "attn_video_gen", "attn-video"),
    "medical": ("attn-medical", "attn_medical", "attn-medical"),
}
APP_DISTS = {dist for dist, _, _ in APPS.values()}
APP_IMPORTS = {imp for _, imp, _ in APPS.values()}


def imported_top_level(src: Path) -> set[str]:
    names = set()
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def requirement_names(pyproject: Path) -> set[str]:
    deps = tomllib.loads(pyproject.read_text())["project"].get("dependencies", [])
    names = set()
    for dep in deps:
        name = dep.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        names.add(name.strip().lower())
    return names


@pytest.mark.parametrize("app", sorted(APPS))
def test_app_depends_on_core_and_no_other_app(app):
    dist, imp, _ = APPS[app]
    deps = requirement_names(ROOT / "apps" / app / "pyproject.toml")
    assert "core-attention" in deps
    assert not (deps & (APP_DISTS - {dist})), f"{dist} depends on another app"
    imports = imported_top_level(ROOT / "apps" / app / "src")
    assert not (imports & (APP_IMPORTS - {imp})), f"{imp} imports another app"
    assert "attention_kernels" not in imports, f"{imp} must reach kernels through core_attention"


def test_core_and_kernels_import_no_app():
    for src in (ROOT / "packages/core_attention/src", ROOT / "kernels/src"):
        assert not (imported_top_level(src) & APP_IMPORTS), src


def test_root_pins_the_stack():
    pins = (ROOT / "constraints.txt").read_text()
    for line in ("torch==2.9.1", "torchvision==0.24.1", "torchaudio==2.9.1", "numpy<2.4"):
        assert line in pins


def _script(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"console script {name} is not installed"
    return found


@pytest.mark.parametrize("app", sorted(APPS))
def test_console_script_prints_its_commands(app):
    _, _, script = APPS[app]
    res = subprocess.run([_script(script), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"usage: {script}" in res.stdout and "commands" in res.stdout


def test_attn_demo_lists_stages():
    res = subprocess.run(
        [_script("attn-demo"), "--list"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith("core")
