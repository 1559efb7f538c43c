"""Dream (Dream-v0-7B Base/Instruct, Dream-Coder-7B, DiffuCoder-7B) and SDAR: diffusion LMs in Qwen layouts.

Dream, followed: `modeling_dream.py` / `generation_utils.py` published with Dream-org/Dream-v0-Instruct-7B: the
Qwen2 layout (biases on q, k, v only, untied `lm_head`), no causal mask, and logits read one position late
(`logits = cat([logits[:, :1], logits[:, :-1]], 1)`): shifted predictions. Prompts are left-padded and positions
come from the attention mask (pass per-row `positions`).
Special ids come from the folder (config.json, generation_config.json, the tokenizer: special_ids.py); Qwen's ids
(151643 end of text and pad, 151645 `<|im_end|>`, the family's mask) only where no file names one, logged.
SDAR (JetLM/SDAR-*): the Qwen3 layout (QK-norm) trained block-causally with blocks of 4; the attention rule itself
belongs to the block-diffusion process, the descriptor records it. Its logits are at the same position.
"""

from __future__ import annotations

from dlm.network.families.base import Family, ModelDescriptor, first_id, register
from dlm.network.families.causal_lm import LLAMA_MODULES, llama_style_config

QWEN_EOS, QWEN_IM_END = 151643, 151645  # <|endoftext|> (also pad), <|im_end|>


def _config_ids(family: str, config, model) -> dict:
    """The descriptor fields read from config.json (the folder's tokenizer and the fallbacks come next, in
    dlm/network/families/special_ids.py)."""
    return dict(family=family, vocab_size=model.vocab_size, mask_id=first_id(config.get("mask_token_id")),
                pad_id=first_id(config.get("pad_token_id")), eos_id=first_id(config.get("eos_token_id")),
                bos_id=first_id(config.get("bos_token_id")))


def _qwen_fallbacks(mask: int) -> dict:
    """Qwen's tokenizer ids, the last resort for a folder that names none (mask: the family's own added token)."""
    return {"mask_id": mask, "pad_id": QWEN_EOS, "eos_id": QWEN_EOS, "eot_id": QWEN_IM_END}


class Dream(Family):
    name, model_types, architectures = "dream", ("Dream",), ("DreamModel",)
    fallback_tokens = {"mask_id": "<|mask|>", "pad_id": "<|endoftext|>", "eos_id": "<|endoftext|>"}

    def model_config(self, config):
        return llama_style_config(config, self.name, qkv_bias=True, proj_bias=False, prediction="shifted")

    def descriptor(self, config, model):
        return ModelDescriptor(**_config_ids(self.name, config, model), prediction="shifted", padding_side="left")

    def fallback_ids(self, config, model):
        return _qwen_fallbacks(151666)  # <|mask|> of Dream's tokenizer

    def module_names(self, model):
        return LLAMA_MODULES


class SDAR(Family):
    name, model_types, architectures = "sdar", ("sdar",), ("SDARForCausalLM",)
    fallback_tokens = {"mask_id": "<|MASK|>", "pad_id": "<|endoftext|>", "eos_id": "<|endoftext|>"}

    def model_config(self, config):
        return llama_style_config(config, self.name, qk_norm=True, prediction="same_position")

    def descriptor(self, config, model):
        return ModelDescriptor(**_config_ids(self.name, config, model), topology="block_causal",
                               block_size=int(config.get("block_size") or 4))

    def fallback_ids(self, config, model):
        return _qwen_fallbacks(151669)  # <|MASK|> of SDAR's tokenizer

    def module_names(self, model):
        return LLAMA_MODULES

    def ignored(self, name, model):
        return model.tie_weights and name == "lm_head.weight"


register(Dream())
register(SDAR())
