#!/usr/bin/env bash
# Train the small 2D wound checkpoint shipped in src/attn_medical/weights/wound2d (the model
# of the attn-demo stage) from synthetic data, on the CPU, and copy it into the package.
#   apps/medical/recipes/wound2d.sh [WORK_DIR]      (default: runs/wound2d)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="${1:-runs/wound2d}"
dest="$here/../src/attn_medical/weights/wound2d"

attn-medical make-data wounds --out "$work/data" --count 400 --size 96 160 --seed 0 --overwrite
attn-medical train "$work/data" --output-dir "$work/run" --resume none --overwrite \
  --channels 8 16 32 64 --patch-size 96 96 --batch-size 8 --max-steps 1000 --lr 3e-3 \
  --save-every 250 --seed 0 --cpu --no-progress
mkdir -p "$dest"
cp "$work/run/best/config.json" "$work/run/best/model.safetensors" "$dest/"
echo "wound2d: copied $work/run/best to $dest"
