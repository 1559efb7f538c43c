"""Peak memory of loading an open checkpoint: a ~1.1B-parameter random model in the exact LLaDA layout (OLMo config
keys, `model.transformer.*` names, bf16, sharded safetensors with `model.safetensors.index.json`) is written to a
temporary folder, then loaded by `load_pretrained_network` in a fresh subprocess, which runs one forward pass
and reads every 4 KiB page of every parameter (the forward alone skips most embedding rows), and reports its
peak resident memory (VmHWM in /proc/self/status).

    python bench/load_memory.py [--d-model 2048 --layers 12 --mlp 5632 --shards 4]

Prints weights' bytes, the subprocess's resident memory after `import torch, dlm` (the baseline), its peak, and
peak / weights (target <= 1.3). Needs the weights' size in free disk space and ~1.3x in memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 126464


def llada_shapes(d: int, layers: int, mlp: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.transformer.wte.weight": (VOCAB, d), "model.transformer.ln_f.weight": (d,),
              "model.transformer.ff_out.weight": (VOCAB, d)}
    for i in range(layers):
        b = f"model.transformer.blocks.{i}"
        shapes.update({f"{b}.attn_norm.weight": (d,), f"{b}.ff_norm.weight": (d,), f"{b}.q_proj.weight": (d, d),
                       f"{b}.k_proj.weight": (d, d), f"{b}.v_proj.weight": (d, d), f"{b}.attn_out.weight": (d, d),
                       f"{b}.ff_proj.weight": (mlp, d), f"{b}.up_proj.weight": (mlp, d), f"{b}.ff_out.weight": (d, mlp)})
    return shapes


def write_checkpoint(folder: Path, d: int, layers: int, mlp: int, shards: int) -> int:
    """Write the folder shard by shard (never the whole model in memory); returns the weights' bytes."""
    shapes = llada_shapes(d, layers, mlp)
    names = list(shapes)
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: (torch.randn(shapes[n], generator=g) * 0.02).bfloat16() for n in names[k::shards]}
        total += sum(t.nbytes for t in part.values())
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        del part
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    config = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu",
              "block_type": "llama", "d_model": d, "n_heads": d // 128, "n_kv_heads": d // 128, "n_layers": layers,
              "mlp_hidden_size": mlp, "rope": True, "rope_theta": 500000.0, "layer_norm_type": "rms",
              "rms_norm_eps": 1e-5, "max_sequence_length": 4096, "vocab_size": VOCAB, "embedding_size": VOCAB,
              "weight_tying": False, "include_bias": False, "mask_token_id": 126336, "eos_token_id": 126081,
              "pad_token_id": 126081}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return total


CHILD = """
import re, sys, time, torch
sys.path.insert(0, {root!r})
from dlm.network.families import load_pretrained_network
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
base = status("VmRSS")
start = time.perf_counter()
net, desc = load_pretrained_network({folder!r})
loaded = time.perf_counter() - start
with torch.no_grad():
    logits = net(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))
    for p in net.parameters():  # read one element of every 4 KiB page: every weight byte is now resident
        p.view(-1)[::4096 // p.element_size()].float().sum()
print(base, status("VmHWM"), loaded, sum(p.numel() for p in net.parameters()), logits.dtype, flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--mlp", type=int, default=5632)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dlm-load-memory-") as tmp:
        start = time.perf_counter()
        weights = write_checkpoint(Path(tmp), args.d_model, args.layers, args.mlp, args.shards)
        written = time.perf_counter() - start
        out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), folder=tmp)], check=True,
                             capture_output=True, text=True).stdout.split()
    base, peak, seconds, params, dtype = int(out[0]), int(out[1]), float(out[2]), int(out[3]), out[4]
    gib = 2 ** 30
    print(f"LLaDA layout, {params / 1e9:.2f}B parameters, bf16, {args.shards} shards (written in {written:.0f} s; "
          f"loaded in {seconds:.2f} s; forward logits {dtype})")
    print("| weights | RSS after import (baseline) | peak RSS (VmHWM) | peak / weights | (peak - baseline) / weights |")
    print("|---|---|---|---|---|")
    print(f"| {weights / gib:.2f} GiB | {base / gib:.2f} GiB | {peak / gib:.2f} GiB | {peak / weights:.2f}x | "
          f"{(peak - base) / weights:.2f}x |")


if __name__ == "__main__":
    main()
