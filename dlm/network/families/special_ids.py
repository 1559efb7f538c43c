"""The special ids of an open checkpoint folder (mask, pad, EOS, EoT, BOS), read from the folder itself.

Three sources, each read as the families ship them (plain JSON, no transformers, no remote code):
- config.json: `mask_token_id`, `pad_token_id`, `eos_token_id` (an int or a list: Llama 3's several), `bos_token_id`
  (the family's `descriptor` reads them, DiffusionGemma from its `text_config`);
- generation_config.json: the same keys;
- the tokenizer: the token *names* in tokenizer_config.json (`mask_token`, `pad_token`, `eos_token`, `bos_token`; a
  string or an `{"content": ...}` record), else special_tokens_map.json, turned into ids through tokenizer.json
  (`added_tokens`, then the model's vocabulary) or tokenizer_config.json's `added_tokens_decoder`. The end-of-turn
  token has no key: it is the first of `EOT_TOKENS` the tokenizer holds (`<|im_end|>` for Qwen's tokenizer and Dream,
  `<|eot_id|>` for LLaDA and Llama 3, `<end_of_turn>` for Gemma, `<|end|>` for Phi).

Where two sources name an id they must agree, or loading stops with an error naming both values, their files and
the fix. One tolerance: an instruct tokenizer often names its end-of-turn token as EOS (Llama 3, Qwen2.5-Instruct),
so the tokenizer's EOS agrees when it is any of config.json's / generation_config.json's EOS ids or the EoT id.
Where no source names an id, the family's own token for it is looked up by name in the tokenizer
(`Family.fallback_tokens`: `<|mask|>` for Dream, `<|MASK|>` for SDAR, `<|mdm_mask|>` for LLaDA, `<|endoftext|>` for
the Qwen families' pad and EOS); where that finds none, the family's constants (`Family.fallback_ids`: Qwen's ids
for Dream and SDAR, LLaDA's mask and EoT) are the last resort, used only inside the vocabulary and logged as a
warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dlm.network.families.base import CheckpointFormatError, ModelDescriptor, first_id

log = logging.getLogger(__name__)

FIELDS = ("eot_id", "mask_id", "pad_id", "eos_id", "bos_id")
KEYS = {"mask_id": "mask_token_id", "pad_id": "pad_token_id", "eos_id": "eos_token_id", "bos_id": "bos_token_id"}
TOKEN_KEYS = {"mask_id": "mask_token", "pad_id": "pad_token", "eos_id": "eos_token", "bos_id": "bos_token"}
EOT_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointFormatError(f"{path} is not valid JSON: {e}")
    return data if isinstance(data, dict) else {}


def all_ids(value) -> list[int]:
    """Every token id of a config value: an int, a list of ints, or nothing."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def token_table(folder: Path, tokenizer_config: dict[str, Any]) -> dict[str, int]:
    """Token text -> id from tokenizer.json (its vocabulary, then its added tokens, which win) and
    tokenizer_config.json's `added_tokens_decoder`; empty when the folder has neither."""
    table: dict[str, int] = {}
    tok = _json(folder / "tokenizer.json")
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):  # BPE, WordLevel, WordPiece
        table.update({k: v for k, v in vocab.items() if isinstance(v, int)})
    elif isinstance(vocab, list):  # Unigram: [piece, score] in id order
        table.update({entry[0]: i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry})
    for entry in tok.get("added_tokens") or []:
        if isinstance(entry, dict) and isinstance(entry.get("id"), int) and isinstance(entry.get("content"), str):
            table[entry["content"]] = entry["id"]
    for key, entry in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        name = _token_name(entry)
        if name is not None and str(key).isdigit():
            table.setdefault(name, int(key))
    return table


def tokenizer_ids(folder: Path) -> tuple[dict[str, tuple[int, str]], dict[str, int]]:
    """(field -> (id, where it was read) for the ids the folder's tokenizer names, the token table); see the module
    docstring."""
    config = _json(folder / "tokenizer_config.json")
    special = _json(folder / "special_tokens_map.json")
    table = token_table(folder, config)
    if not table:
        return {}, table
    out = {}
    for field, key in TOKEN_KEYS.items():
        for file, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
            name = _token_name(data.get(key))
            if name is not None:
                if name in table:
                    out[field] = (table[name], f"{file}'s {key} {name!r}")
                break
    for name in EOT_TOKENS:
        if name in table:
            out["eot_id"] = (table[name], f"the tokenizer's end-of-turn token {name!r}")
            break
    return out, table


def eos_id_set(config: dict[str, Any], generation: dict[str, Any]) -> set[int]:
    """Every EOS id config.json (or its text_config) and generation_config.json name."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return set(all_ids(text.get("eos_token_id", config.get("eos_token_id")))) | set(all_ids(generation.get(
        "eos_token_id")))


def folder_eos_ids(folder: Path) -> set[int]:
    """`eos_id_set` of a folder's config.json and generation_config.json."""
    return eos_id_set(_json(Path(folder) / "config.json"), _json(Path(folder) / "generation_config.json"))


def _disagree(folder, key: str, ours: int, where_ours: str, theirs: int, where_theirs: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"the special ids of {folder} disagree: {where_ours} gives {key}={ours} but {where_theirs} is id {theirs}. "
        f"Fix the folder: set {key} in config.json (and generation_config.json) to the id the model was trained "
        f"with, and the tokenizer's token to the same id, so both name one token")


def resolve_special_ids(descriptor: ModelDescriptor, config: dict[str, Any], folder: Path | None,
                        fallbacks: dict[str, int] | None = None,
                        fallback_tokens: dict[str, str] | None = None) -> ModelDescriptor:
    """Fill and check the descriptor's special ids from the folder (module docstring), in place; returns it.

    descriptor: the family's reading of config.json (ids only where config.json names them). config: config.json
    itself (for the list of EOS ids). folder: None for a model held in memory (config.json's ids and the fallbacks
    only). fallback_tokens: the family's own token names ("mask_id" -> "<|mask|>"), looked up in the folder's
    tokenizer where no file names the id; fallbacks: the family's constant ids, used only where that finds none."""
    folder = Path(folder) if folder is not None else None
    generation = _json(folder / "generation_config.json") if folder is not None else {}
    from_tokenizer, table = tokenizer_ids(folder) if folder is not None else ({}, {})
    eos_ids = eos_id_set(config, generation)
    where = folder if folder is not None else "the model"
    for field in FIELDS:  # EoT first: the EOS check below accepts it
        key = KEYS.get(field, "eot_token_id")
        value, source = getattr(descriptor, field), "config.json"
        if field == "eos_id":  # lists differ legitimately between the files (Qwen2.5-Instruct): no check here
            if value is None and all_ids(generation.get(key)):
                value, source = all_ids(generation.get(key))[0], "generation_config.json"
        else:
            gen = first_id(generation.get(key))
            if gen is not None and value is None:
                value, source = gen, "generation_config.json"
            elif gen is not None and gen != value:
                raise _disagree(where, key, value, source, gen, "generation_config.json's")
        tok = from_tokenizer.get(field)
        if tok is not None:
            allowed = {value} | (eos_ids | {descriptor.eot_id} if field == "eos_id" else set())
            if value is None:
                value, source = tok
            elif tok[0] not in allowed:
                raise _disagree(where, key, value, source, *tok)
        name = (fallback_tokens or {}).get(field)
        if value is None and name in table and table[name] < descriptor.vocab_size:
            value = table[name]  # the family's token, found in this folder's tokenizer: not a guess, not logged
        if value is None and fallbacks and field in fallbacks:
            constant = fallbacks[field]
            if 0 <= constant < descriptor.vocab_size:
                fix = (f"ship a tokenizer holding one of {', '.join(EOT_TOKENS)}" if field == "eot_id" else
                       f"add {key} to config.json")
                log.warning("%s: no file names the %s; using the %s family's constant %d (a documented last resort: "
                            "%s to silence this)", where, field, descriptor.family, constant, fix)
                value = constant
        setattr(descriptor, field, value)
    descriptor.validate(config)
    return descriptor
