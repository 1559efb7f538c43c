"""Networks (backbones): map token ids or embeddings to logits. No noising or sampling logic here.

The contract every network follows is in `dlm.network.base`; open checkpoints (LLaDA, Dream, causal LMs) load
through `dlm.network.families.load_pretrained_network`. Names are imported on first use, so that `dlm.config`
(which re-exports `ModelConfig` from `dlm.network.config`) does not import torch.
"""

import importlib

_HOMES = {"KVCache": "dlm.network.kv_cache", "Transformer": "dlm.network.transformer",
          "Network": "dlm.network.base", "ModelConfig": "dlm.network.config"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'dlm.network' has no attribute {name!r}")
