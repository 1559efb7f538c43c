#!/usr/bin/env bash
# The main job (README command 1): train a tiny MDLM and its autoregressive baseline on the embedded corpus,
# compare their validation perplexity, and print unconditional samples and a prompted continuation.
# About 10 minutes on 2 CPU cores with bf16 instructions (measured 9 min 50 s: the full 1,200 + 300 steps). Each
# training has a time budget (MDLM_MINUTES, AR_MINUTES) so that a slower CPU (an AVX2-only one trains in float32,
# ~7x slower) still finishes in about 15 minutes, with fewer steps. Re-running resumes/reuses the runs in runs/
# Redirected to a file (`make demo > demo.log 2>&1`) it writes plain progress lines, no carriage-return bars
# (dlm/progress.py). DLM= names another `dlm` command, e.g. DLM="python -m dlm.cli" for a checkout without .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
DLM=${DLM:-.venv/bin/dlm}

echo "== 1/4  train the tiny MDLM (runs/demo-mdlm)"
$DLM train run=demo trainer.out_dir=runs/demo-mdlm trainer.max_minutes=${MDLM_MINUTES:-9}
echo "== 2/4  train the autoregressive baseline, same network and data (runs/demo-ar)"
$DLM train run=demo process=ar trainer.max_steps=${AR_STEPS:-300} trainer.out_dir=runs/demo-ar \
    trainer.max_minutes=${AR_MINUTES:-3.5}
echo "== 3/4  validation perplexity on held-out text (MDLM: upper bound; AR: exact)"
$DLM eval runs/demo-mdlm runs/demo-ar --split val --num-t-samples 2 --max-rows 256 --json runs/demo-eval.json
echo "== 4/4  samples"
$DLM sample runs/demo-mdlm --num-samples 3 --steps 128 --seed 1
$DLM sample runs/demo-mdlm --num-samples 2 --steps 64 --length 96 --prompt "And the king said unto" --seed 2
echo "checkpoints: runs/demo-mdlm/checkpoints, exported model: runs/demo-mdlm/model, loss curve: runs/demo-mdlm/loss_curve.png"
