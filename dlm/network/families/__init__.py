"""Open checkpoint families: each file registers a `Family` that maps its config.json and tensor names onto dlm's
`Transformer` (dlm/network/families/base.py). Load a downloaded folder with `load_pretrained_network`.

| family | file | prediction | topology |
|---|---|---|---|
| llada (LLaDA-8B, iLLaDA) | llada.py | same_position | bidirectional |
| dream (Dream-7B, Dream-Coder, DiffuCoder) | dream.py | shifted | bidirectional |
| sdar | dream.py | same_position | block_causal(4) |
| llama, qwen2, qwen3, gpt2 (to adapt) | causal_lm.py | shifted | causal |
| diffusion_gemma (DiffusionGemma, transformers' own model) | diffusion_gemma.py | same_position | causal context, bidirectional canvas |
"""

from dlm.network.families import causal_lm, diffusion_gemma, dream, llada  # noqa: F401  (each registers its families)
from dlm.network.families.base import FAMILIES, CheckpointFormatError, Family, ModelDescriptor, detect, register
from dlm.network.families.gguf import load_gguf_network, network_from_transformers
from dlm.network.families.loading import (is_open_checkpoint, load_pretrained_network, load_pretrained_tokenizer,
                                          network_from_state_dict)

__all__ = ["FAMILIES", "CheckpointFormatError", "Family", "ModelDescriptor", "detect", "is_open_checkpoint", "load_gguf_network",
           "load_pretrained_network", "load_pretrained_tokenizer", "network_from_state_dict",
           "network_from_transformers", "register"]
