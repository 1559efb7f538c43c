"""LoRA adapters for training (`trainer.lora_rank=R`), through `peft` (the `lora` extra).

The adapters are injected into the network's own modules (peft's `inject_adapter_in_model`, no wrapper model):
every linear layer of the blocks (attention q, k, v or the fused qkv, the output projection, the MLP's fc, gate and
proj) gets low-rank A (R x in) and B (out x R, zero at the start, so step 0 is the pretrained network). Only the
adapters train, and with `trainer.lora_embeddings` the embedding and the head too (an adapted causal LM's new
[MASK] row must be learned). Checkpoints hold the adapters (resume continues them); the export merges them into
plain weights (`merged_state`), so the exported model loads as an ordinary network.
"""

from __future__ import annotations

import torch

from dlm.config import ConfigError

TARGETS = ["q", "k", "v", "qkv", "proj", "fc", "gate"]  # module names inside the blocks
TRAINED_WITH_EMBEDDINGS = ("embed.", "head.", "pos_embed.")


def add_lora(network: torch.nn.Module, rank: int, alpha: float, train_embeddings: bool) -> None:
    """Inject LoRA adapters of `rank` (scale alpha / rank) into `network` in place and freeze everything else."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ModuleNotFoundError as e:
        raise ConfigError("trainer.lora_rank needs the 'peft' package: pip install -c constraints.txt peft "
                          "(or pip install dlm[lora])") from e
    targets = sorted({n for n, m in network.named_modules()
                      if isinstance(m, torch.nn.Linear) and n.startswith("blocks.") and n.rsplit(".", 1)[-1] in TARGETS})
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets), network)
    for name, p in network.named_parameters():
        p.requires_grad_("lora_" in name or (train_embeddings and name.startswith(TRAINED_WITH_EMBEDDINGS)))


def has_lora(network: torch.nn.Module) -> bool:
    return any("lora_" in n for n, _ in network.named_parameters())


@torch.no_grad()
def merged_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's weights with every adapter merged in (W + B A alpha / rank), under the plain network's names."""
    from peft.tuners.lora import LoraLayer

    state = {k.replace(".base_layer.", "."): v for k, v in network.state_dict().items() if "lora_" not in k}
    for name, module in network.named_modules():
        if isinstance(module, LoraLayer):
            weight = state[f"{name}.weight"]
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            state[f"{name}.weight"] = weight
    return state


__all__ = ["add_lora", "has_lora", "merged_state"]
