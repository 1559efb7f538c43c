"""bf16 logits of a tiny LLaDA-layout folder (tests/network/checkpoints.py: 2 layers, width 32, stored in bf16)
against an independent bf16 forward of LLaDA's published architecture with its float32 rotation
(tests/network/test_bf16_rotary.py), with dlm's rotation in bf16 (before) and in float32 (after, LLaDA's
`rope_full_precision`), through dlm's default attention (chunked bf16 on a CPU, SDPA on a GPU) and through SDPA,
the kernel LLaDA's code calls.

    python bench/bf16_rotary.py [--lengths 10 48 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

import dlm.network.attention as attention
from dlm.network.families import load_pretrained_network
from tests.network.checkpoints import llada_checkpoint
from tests.network.test_bf16_rotary import llada_reference


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[10, 48, 128])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    folder = Path(tempfile.mkdtemp())
    llada_checkpoint(folder, shards=1, dtype=torch.bfloat16)
    cfg = json.loads((folder / "config.json").read_text())
    state = {k: v.to(args.device) for k, v in load_file(str(folder / "model.safetensors")).items()}
    net, _ = load_pretrained_network(folder, device=args.device)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"{device}, torch {torch.__version__}; 2 rows per length")
    print("| attention | tokens | logit scale | max abs diff before | after | argmax agree before | after |")
    print("|---|---|---|---|---|---|---|")
    default = attention.CHUNKED_DTYPES
    for label, chunked in (("dlm's default", default), ("SDPA", ())):
        attention.CHUNKED_DTYPES = chunked
        for T in args.lengths:
            x = torch.randint(0, 5000, (2, T), generator=torch.Generator().manual_seed(0)).to(args.device)
            with torch.no_grad():
                ref = llada_reference(state, cfg, x).float()
                cells = []
                for flag in (False, True):
                    for block in net.blocks:
                        block.attn.rope_float32 = flag
                    ours = net(x).float()
                    cells.append(((ours - ref).abs().max().item(), (ours.argmax(-1) == ref.argmax(-1)).sum().item()))
            (d0, a0), (d1, a1) = cells
            n = x.numel()
            print(f"| {label} | {T} | {ref.abs().max().item():.1f} | {d0:.3f} | {d1:.3f} | {a0}/{n} | {a1}/{n} |")
    attention.CHUNKED_DTYPES = default


if __name__ == "__main__":
    main()
