"""Dream (Dream-v0-7B Base/Instruct, Dream-Coder-7B, DiffuCoder-7B) and SDAR: diffusion LMs in Qwen layouts.

Dream, followed: `modeling_dream.py` / `generation_utils.py` published with Dream-org/Dream-v0-Instruct-7B: the
Qwen2 layout (biases on q, k, v only, untied `lm_head`), no causal mask, and logits read one position late
(`logits = cat([logits[:, :1], logits[:, :-1]], 1)`): shifted predictions. Prompts are left-padded and positions
come from the attention mask (pass per-row `positions`).
SDAR (JetLM/SDAR-*): the Qwen3 layout (QK-norm) trained block-causally with blocks of 4; the attention rule itself
belongs to the block-diffusion process, the descriptor records it. Its logits are at the same position.
"""

from __future__ import annotations

from dlm.network.families.base import Family, ModelDescriptor, first_id, register
from dlm.network.families.causal_lm import LLAMA_MODULES, llama_style_config

QWEN_EOS, QWEN_IM_END = 151643, 151645  # <|endoftext|> (also pad), <|im_end|>


def _id(config, key: str, default: int) -> int:
    value = first_id(config.get(key))
    return default if value is None else value


def _qwen_ids(family: str, config, model, mask_default: int) -> dict:
    """The descriptor fields every Qwen-tokenizer diffusion family shares: its ids, defaulting to Qwen's."""
    return dict(family=family, vocab_size=model.vocab_size, mask_id=_id(config, "mask_token_id", mask_default),
                pad_id=_id(config, "pad_token_id", QWEN_EOS), eos_id=_id(config, "eos_token_id", QWEN_EOS),
                eot_id=QWEN_IM_END, bos_id=first_id(config.get("bos_token_id")))


class Dream(Family):
    name, model_types, architectures = "dream", ("Dream",), ("DreamModel",)

    def model_config(self, config):
        return llama_style_config(config, self.name, qkv_bias=True, proj_bias=False, prediction="shifted")

    def descriptor(self, config, model):
        return ModelDescriptor(**_qwen_ids(self.name, config, model, 151666), prediction="shifted", padding_side="left")

    def module_names(self, model):
        return LLAMA_MODULES


class SDAR(Family):
    name, model_types, architectures = "sdar", ("sdar",), ("SDARForCausalLM",)

    def model_config(self, config):
        return llama_style_config(config, self.name, qk_norm=True, prediction="same_position")

    def descriptor(self, config, model):
        return ModelDescriptor(**_qwen_ids(self.name, config, model, 151669), topology="block_causal",
                               block_size=int(config.get("block_size") or 4))

    def module_names(self, model):
        return LLAMA_MODULES

    def ignored(self, name, model):
        return model.tie_weights and name == "lm_head.weight"


register(Dream())
register(SDAR())
