"""How often bf16 changes sampled tokens, against float32 and across batch sizes (batch invariance holds exactly in
float32 only). Tiny random networks of the golden tests (tests/golden/cases.py: 2 layers, width 32, a 300-token
BPE), each request sampled alone and as a row of a batch of 3 beside prompts of other lengths.

    python bench/bf16_invariance.py [--seeds 10]
"""

from __future__ import annotations

import argparse
import platform

import torch

from tests.golden import cases as G

PROMPTS = ["And God said", "To be, or not", "And"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = G.models()["mdlm"]
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, one thread")
    print("| sampler | rows | bf16 != fp32 (alone) | bf16 alone != bf16 in a batch of 3 | fp32 alone != fp32 batch |")
    print("|---|---|---|---|---|")
    for name, opts in (("ancestral", {"steps": 8}), ("remdm_cap", {"steps": 8}), ("first_hitting", {}),
                       ("llada", {"steps": 8, "block_length": 8, "temperature": 0.8})):
        rows = diff_fp = diff_bf_batch = diff_fp_batch = 0
        for seed in range(args.seeds):
            seeds = [seed * 3 + i for i in range(3)]
            out = {}
            for precision in ("32", "bf16"):
                batch = model.generate(PROMPTS, gen_length=16, sampler=name, seed=seeds, precision=precision,
                                       **opts).tokens[:, -16:]
                alone = [model.generate([p], gen_length=16, sampler=name, seed=s, precision=precision,
                                        **opts).tokens[0, -16:] for p, s in zip(PROMPTS, seeds)]
                out[precision] = (batch, alone)
            for i in range(3):
                rows += 1
                diff_fp += not torch.equal(out["32"][1][i], out["bf16"][1][i])
                diff_bf_batch += not torch.equal(out["bf16"][0][i], out["bf16"][1][i])
                diff_fp_batch += not torch.equal(out["32"][0][i], out["32"][1][i])
        print(f"| {name} | {rows} | {diff_fp}/{rows} | {diff_bf_batch}/{rows} | {diff_fp_batch}/{rows} |")


if __name__ == "__main__":
    main()
