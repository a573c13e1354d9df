#!/usr/bin/env bash
# Train the small ECAPA-TDNN that attn-speech ships (src/attn_speech/ecapa/pretrained/espeak-c128)
# on an espeak-ng speaker corpus, calibrate it on the development voices and evaluate it on
# the test voices. CPU is enough (about 15 minutes on one core).
#
#   apps/speech/recipes/ecapa_espeak.sh [WORK_DIR]      (default: runs/ecapa-espeak)
set -euo pipefail
work="${1:-runs/ecapa-espeak}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="$here/../src/attn_speech/ecapa/pretrained/espeak-c128"

# 100 voices: 70 to train on, 10 for validation and calibration, 20 for the test trials.
attn-speech make-data speakers --out "$work/data" --speakers 100 --utterances 8 \
  --test-speakers 20 --dev-speakers 10 --seed 0 --overwrite

attn-speech ecapa train "$work/data/train.csv" --output-dir "$work/train" --resume auto \
  --variant ecapa_c128 --crop-seconds 2.0 --speed-perturb 0.95,1.0,1.05 --num-workers 1 \
  --batch-size 32 --lr 2e-3 --warmup-steps 50 --max-steps 600 --save-every 100 \
  --val-trials "$work/data/dev_trials.txt" --seed 0

# best/: the checkpoint with the lowest EER on the development voices, calibrated on them.
attn-speech ecapa eval --trials "$work/data/trials.txt" --model "$work/train/best" \
  --cohort "$work/data/train.csv" --out "$work/eval" --overwrite

mkdir -p "$dest"
cp "$work/train/best/config.json" "$work/train/best/model.safetensors" "$dest/"
echo "shipped model updated in $dest"
