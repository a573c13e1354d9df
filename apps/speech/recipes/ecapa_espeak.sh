#!/usr/bin/env bash
# Train the small ECAPA-TDNN that attn-speech ships (src/attn_speech/ecapa/pretrained/espeak-c128)
# on an espeak-ng speaker corpus, calibrate it on the development voices and evaluate it on
# the test voices. CPU is enough (about an hour on 2 cores).
#
#   apps/speech/recipes/ecapa_espeak.sh [WORK_DIR]      (default: runs/ecapa-espeak)
set -euo pipefail
work="${1:-runs/ecapa-espeak}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="$here/../src/attn_speech/ecapa/pretrained/espeak-c128"

# 40 voices: 24 to train on, 6 for validation and calibration, 10 for the test trials.
attn-speech make-data speakers --out "$work/data" --speakers 40 --utterances 8 \
  --test-speakers 10 --dev-speakers 6 --seed 0 --overwrite

attn-speech ecapa train "$work/data/train.csv" --output-dir "$work/train" --resume auto \
  --variant ecapa_c128 --crop-seconds 2.0 --speed-perturb 0.95,1.0,1.05 \
  --batch-size 32 --lr 2e-3 --warmup-steps 50 --max-steps 600 --save-every 100 \
  --val-trials "$work/data/dev_trials.txt" --seed 0

attn-speech ecapa eval --trials "$work/data/trials.txt" --model "$work/train/final" \
  --cohort "$work/data/train.csv" --out "$work/eval" --overwrite

mkdir -p "$dest"
cp "$work/train/final/config.json" "$work/train/final/model.safetensors" "$dest/"
echo "shipped model updated in $dest"
