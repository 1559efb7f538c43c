#!/usr/bin/env bash
# Step 1 of the experiment: adapt SmolLM2-135M into a masked diffusion LM and train the tiny from-scratch MDLM for
# the same wall-clock, side by side, each on ONE CPU thread (so that neither gets more of the machine than the other).
#   MINUTES   training minutes of each run (default 55)
#   OUT       where the two runs go (default runs/adapt_smollm2); their logs, $OUT/*.log, get a progress line
#             every 50 steps or 30 s (trainer.progress=plain)
# Snapshots: the adapted run is first trained SNAP minutes and its export copied to $OUT/smollm2-mdlm-${SNAP}min,
# then resumed to MINUTES (a constant learning rate, so the staged run equals a single one).
set -euo pipefail
cd "$(dirname "$0")/../.."
MINUTES=${MINUTES:-55}; SNAP=${SNAP:-10}; OUT=${OUT:-runs/adapt_smollm2}
DLM=.venv/bin/dlm
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"
adapt() {
  $DLM train init_from=hf:smollm2 process=mdlm model.context=128 trainer.batch_size=8 \
    optim.lr=1e-4 optim.warmup_steps=20 optim.decay=constant trainer.attention_anneal_steps=100 \
    trainer.ema=0 trainer.max_steps=100000 trainer.val_every=100 trainer.val_batches=4 trainer.ckpt_every=50 \
    trainer.progress=plain trainer.out_dir="$OUT/smollm2-mdlm" trainer.max_minutes="$1"
}
tiny() {
  $DLM train run=demo trainer.max_steps=5000 trainer.val_every=500 trainer.progress=plain \
    trainer.out_dir="$OUT/tiny-mdlm" trainer.max_minutes="$MINUTES"
}
( adapt "$SNAP" && rm -rf "$OUT/smollm2-mdlm-${SNAP}min" && cp -r "$OUT/smollm2-mdlm/model" "$OUT/smollm2-mdlm-${SNAP}min" \
  && adapt "$MINUTES" ) > "$OUT/smollm2-mdlm.log" 2>&1 &
tiny > "$OUT/tiny-mdlm.log" 2>&1 &
wait
echo "done: $OUT"
