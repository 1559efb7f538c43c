"""What a checkpoint family is: how its `config.json` becomes a `ModelConfig` and a `ModelDescriptor`, and which of
its tensors fills which parameter of dlm's `Transformer`.

A family file subclasses `Family` and calls `register(...)` on an instance; `detect(config)` finds the family of a
folder's config.json. The loader (dlm/network/families/loading.py) does the rest: shape checks, memory mapping,
assignment without a random initialisation.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from dlm.network.config import ModelConfig
from dlm.plugins import Registry

TOPOLOGIES = ("bidirectional", "causal", "block_causal")
CORRUPTIONS = ("absorbing", "uniform", "none")


class CheckpointFormatError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file, key or tensor at fault."""


@dataclass
class ModelDescriptor:
    """How to use a network's weights, stored with every loaded model (to_dict/from_dict).

    mask_id: the absorbing token (None for a causal LM that has none). prediction: "same_position" | "shifted"
    (dlm/network/base.py). topology: the attention the weights were trained with: "bidirectional", "causal" or
    "block_causal" with `block_size` tokens per block. corruption: "absorbing" (masking), "uniform" or "none" (a
    causal LM). padding_side: where batched prompts are padded ("left" for Dream). vocab_size: rows of the output
    layer (may exceed the tokenizer's size: padded embeddings). process: the registered process the weights were
    trained with, for a family whose process is not implied by its corruption and topology (None: derived from them,
    dlm.build.process_for_descriptor)."""

    family: str
    vocab_size: int
    mask_id: int | None = None
    pad_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None  # end of a chat turn
    bos_id: int | None = None
    prediction: str = "same_position"
    topology: str = "bidirectional"
    block_size: int = 0
    corruption: str = "absorbing"
    padding_side: str = "right"
    chat_template: str | None = None
    process: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelDescriptor":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointFormatError(f"unknown model descriptor fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def validate(self, config: dict[str, Any] | None = None) -> None:
        """Refuse ids outside the vocabulary, unknown kinds, and ids that disagree with a folder's config.json."""
        if self.prediction not in ("same_position", "shifted"):
            raise CheckpointFormatError(f"unknown prediction '{self.prediction}'; valid: same_position, shifted")
        if self.topology not in TOPOLOGIES:
            raise CheckpointFormatError(f"unknown topology '{self.topology}'; valid: {', '.join(TOPOLOGIES)}")
        if (self.topology == "block_causal") != (self.block_size > 0):
            raise CheckpointFormatError(f"block_size={self.block_size} goes with topology block_causal only "
                                        f"(topology is {self.topology})")
        if self.corruption not in CORRUPTIONS:
            raise CheckpointFormatError(f"unknown corruption '{self.corruption}'; valid: {', '.join(CORRUPTIONS)}")
        if self.corruption == "absorbing" and self.mask_id is None:
            raise CheckpointFormatError(f"a {self.family} model with absorbing corruption needs a mask id")
        for name in ("mask_id", "pad_id", "eos_id", "eot_id", "bos_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise CheckpointFormatError(f"{name}={value} is outside the vocabulary of {self.vocab_size} tokens")
        for name, key in (("mask_id", "mask_token_id"), ("pad_id", "pad_token_id"), ("eos_id", "eos_token_id"),
                          ("bos_id", "bos_token_id")):
            given = first_id((config or {}).get(key))
            if given is not None and getattr(self, name) is not None and given != getattr(self, name):
                raise CheckpointFormatError(f"config.json says {key}={given} but the descriptor has "
                                            f"{name}={getattr(self, name)}")


def first_id(value) -> int | None:
    """A token id from a config value: an int, the first of a list (Llama 3's several EOS ids), or None."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def need(config: dict[str, Any], family: str, *keys: str) -> list[Any]:
    """The values of required config.json keys, or an error naming every missing one."""
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise CheckpointFormatError(f"config.json looks like a {family} checkpoint but lacks {', '.join(missing)}")
    return [config[k] for k in keys]


class Family(ABC):
    """One checkpoint layout. `name` identifies it; `model_types` / `architectures` recognise its config.json."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()

    def matches(self, config: dict[str, Any]) -> bool:
        return (config.get("model_type") in self.model_types
                or any(a in self.architectures for a in config.get("architectures") or ()))

    @abstractmethod
    def model_config(self, config: dict[str, Any]) -> ModelConfig:
        """The network's shape and options from config.json (an error names missing or unsupported keys)."""

    @abstractmethod
    def descriptor(self, config: dict[str, Any], model: ModelConfig) -> ModelDescriptor:
        """Special ids, prediction, topology and corruption of this family's models."""

    @abstractmethod
    def module_names(self, model: ModelConfig) -> dict[str, str]:
        """dlm module path -> checkpoint module path, with `{i}` for the layer index (e.g. "blocks.{i}.attn.q" ->
        "model.layers.{i}.self_attn.q_proj"). Parameter names (weight, bias) are appended to both."""

    # The family's own special tokens by name ("mask_id" -> "<|mask|>"), looked up in a folder's tokenizer where no
    # file names the id (before `fallback_ids`).
    fallback_tokens: dict[str, str] = {}

    def fallback_ids(self, config: dict[str, Any], model: ModelConfig) -> dict[str, int]:
        """The family's constant special ids ("mask_id" -> id, ...), the last resort where neither config.json,
        generation_config.json nor the tokenizer names one (dlm/network/families/special_ids.py); none by default."""
        return {}

    transposed: tuple[str, ...] = ()  # dlm module paths stored as (in, out) (GPT-2's Conv1D)

    def ignored(self, name: str, model: ModelConfig) -> bool:
        """Checkpoint tensors that are not parameters (attention-mask buffers, a tied head's copy)."""
        return False

    def build_network(self, folder, config: dict[str, Any], source, dtype, device):
        """A family whose network is not dlm's `Transformer` (DiffusionGemma: transformers' own model) builds it here
        from the folder, its config.json and its tensors `source` (memory-mapped), returning (network, descriptor);
        None (the default): the loader maps the tensors onto a `Transformer` through `module_names`."""
        return None


# dlm's families are imported by the package's __init__; installed plugins (dlm.plugins) add theirs on first read.
FAMILIES: Registry = Registry(None)


def register(family: Family) -> Family:
    """Make a family known to `detect` and the loaders."""
    FAMILIES[family.name] = family
    return family


def detect(config: dict[str, Any]) -> Family:
    """The family whose model_type/architectures the config.json names, or an error listing what is known."""
    for family in FAMILIES.values():
        if family.matches(config):
            return family
    known = "; ".join(f"{f.name} (model_type {', '.join(f.model_types) or '-'}; architectures "
                      f"{', '.join(f.architectures) or '-'})" for f in FAMILIES.values())
    raise CheckpointFormatError(
        f"config.json matches no known checkpoint family: model_type={config.get('model_type')!r}, "
        f"architectures={config.get('architectures')!r}. Known: {known}")
