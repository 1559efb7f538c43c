"""Causal LMs held by transformers (e.g. read from a GGUF file) into dlm's `Transformer`.

A GGUF file is dequantised by transformers (`from_pretrained(folder, gguf_file=...)`, needs the `gguf` package)
into its own model class; its config and state dict are then mapped like a safetensors folder of that family.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dlm.network.families.base import ModelDescriptor
from dlm.network.families.loading import check_tokenizer_ids, network_from_state_dict
from dlm.network.transformer import Transformer


def network_from_transformers(model, dtype: torch.dtype | None = None) -> tuple[Transformer, ModelDescriptor]:
    """(network, descriptor) holding the weights of a transformers causal LM (Llama, Qwen2, Qwen3, GPT-2). The
    parameters share memory with `model`'s unless `dtype` converts them."""
    return network_from_state_dict(model.config.to_dict(), model.state_dict(), dtype=dtype)


def load_gguf_network(path: str | Path, dtype: torch.dtype | None = torch.float32):
    """(network, descriptor, tokenizer) from a GGUF file, through transformers' GGUF reader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    network, descriptor = network_from_transformers(model)
    check_tokenizer_ids(tokenizer, descriptor)  # the file's tokenizer against its config's special ids
    return network, descriptor, tokenizer
