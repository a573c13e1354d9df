#!/usr/bin/env bash
# Create the virtual environment ($VENV, default .venv) and install every package of the
# monorepo editable, with the pinned stack of constraints.txt and the dev tools.
# Idempotent: the install is keyed on the clone's path and the content of every file that
# decides it, so a second run with nothing changed installs nothing and returns at once.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

"$root/scripts/install-system-deps.sh"

# Every distribution in the repo, in dependency order; extras in brackets.
packages=()
for p in kernels packages/core_attention packages/training apps/speech apps/vision apps/video_gen apps/medical; do
  [ -f "$p/pyproject.toml" ] || continue
  case "$p" in
    packages/core_attention) packages+=("$p[demo]") ;;
    *) packages+=("$p") ;;
  esac
done

key="$(
  {
    echo "$root"
    cat constraints.txt requirements-dev.txt
    for p in "${packages[@]}"; do cat "${p%%\[*}/pyproject.toml"; done
  } | sha256sum | cut -d' ' -f1
)"
stamp="$VENV/.attn-apps-install"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  echo "install: $VENV is up to date"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "install: creating virtual environment $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

editable=()
for p in "${packages[@]}"; do editable+=(-e "$p"); done
echo "install: ${packages[*]}"
"$VENV/bin/python" -m pip install -c constraints.txt -r requirements-dev.txt "${editable[@]}"
echo "$key" > "$stamp"
echo "install: done ($VENV)"
