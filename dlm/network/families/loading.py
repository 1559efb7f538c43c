"""Load an open checkpoint folder into dlm's `Transformer`: `load_pretrained_network(folder) -> (network, descriptor)`.

How: read config.json, find the family, build the network on the meta device (no random initialisation, no
memory), read every safetensors header (single file or shards listed in `model.safetensors.index.json`), check that
each parameter has its tensor with the right shape and that no tensor is left over, and only then memory-map the
files and assign the tensors as the parameters. The weights stay in the checkpoint's dtype unless `dtype` is given,
and are not copied: the parameters are views of a private (copy-on-write) mapping of each file, so pages are read
from disk when first used and training may still write to them. Any error is raised before anything is assigned.
Special ids come from config.json, generation_config.json and the tokenizer's files, checked against each other
(special_ids.py).
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any

import torch

from dlm.network.families.base import CheckpointFormatError, Family, ModelDescriptor, detect
from dlm.network.families.special_ids import EOT_TOKENS, folder_eos_ids, resolve_special_ids
from dlm.network.transformer import Transformer

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"


# ------------------------------------------------------------------------------------- safetensors files
class SafetensorsFolder:
    """The tensors of a folder's safetensors file(s), read from their headers: name -> (file, dtype, shape, start,
    end). `tensor(name)` memory-maps the file on first use and returns a view (no copy)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        if (folder / INDEX).is_file():
            try:
                weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointFormatError(f"{folder / INDEX} is not a safetensors index (no weight_map): {e}")
            by_file: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                by_file.setdefault(file, []).append(name)
            for file, names in by_file.items():
                if not (folder / file).is_file():
                    raise CheckpointFormatError(f"shard {file} listed in {INDEX} is missing from {folder} "
                                                f"(it holds {names[0]} and {len(names) - 1} more tensors)")
                header = self._read_header(folder / file)
                absent = [n for n in names if n not in header]
                if absent:
                    raise CheckpointFormatError(f"{INDEX} puts {absent[0]} in {file}, which does not hold it")
                self.entries.update({n: header[n] for n in names})
        elif (folder / SINGLE).is_file():
            self.entries = self._read_header(folder / SINGLE)
        else:
            raise CheckpointFormatError(f"{folder} has neither {SINGLE} nor {INDEX}")

    @staticmethod
    def _read_header(path: Path) -> dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]]:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else size
            if n > size - 8:
                raise CheckpointFormatError(f"{path.name} is not a safetensors file (bad header length)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise CheckpointFormatError(f"{path.name} has an unreadable safetensors header: {e}")
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                raise CheckpointFormatError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
            dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
            start, end = (8 + n + o for o in info["data_offsets"])
            numel = int(torch.Size(shape).numel())
            if end - start != numel * dtype.itemsize or end > size:
                raise CheckpointFormatError(f"{path.name}: tensor {name} {shape} {info['dtype']} does not fit its "
                                            f"byte range (the file is truncated or corrupt)")
            out[name] = (path, dtype, shape, start, end)
        return out

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.entries[name][2] if name in self.entries else None

    def tensor(self, name: str) -> torch.Tensor:
        path, dtype, shape, start, end = self.entries[name]
        if start == end:
            return torch.empty(shape, dtype=dtype)
        if path not in self._maps:
            with open(path, "rb") as f:  # private mapping: writes (training) stay in memory, never reach the file
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = (end - start) // dtype.itemsize
        return torch.frombuffer(self._maps[path], dtype=dtype, count=count, offset=start).view(shape)


class StateDictSource:
    """The same interface over an in-memory state dict (a transformers model, e.g. one read from a GGUF file)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.entries = state

    def shape(self, name: str) -> tuple[int, ...] | None:
        return tuple(self.state[name].shape) if name in self.state else None

    def tensor(self, name: str) -> torch.Tensor:
        return self.state[name].detach()


# ----------------------------------------------------------------------------------------------- loading
def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointFormatError(f"{folder} has no config.json")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointFormatError(f"{path} is not valid JSON: {e}")


def is_open_checkpoint(folder: str | Path) -> bool:
    """Whether a folder holds a Hugging Face checkpoint (config.json with a model_type or architectures) rather
    than a dlm export (whose config.json records dlm_format_version)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "dlm_format_version" not in config and (
        "model_type" in config or "architectures" in config)


def load_pretrained_network(folder: str | Path, dtype: torch.dtype | None = None,
                            device: str | torch.device = "cpu") -> tuple[Transformer, ModelDescriptor]:
    """(network in eval mode, descriptor) from a downloaded checkpoint folder of a known family (LLaDA, Dream,
    SDAR, Llama, Qwen2, Qwen3, GPT-2; DiffusionGemma as transformers' own model behind dlm's network contract). dtype: convert the weights (None keeps the checkpoint's; a checkpoint mixing
    float dtypes is brought to its embedding's). Errors name the file or tensor at fault; nothing is assigned then."""
    folder = Path(folder)
    config = read_config(folder)
    family = detect(config)
    source = SafetensorsFolder(folder)
    built = family.build_network(folder, config, source, dtype, device)
    if built is not None:
        network, descriptor = built
        resolve_special_ids(descriptor, config, folder, family.fallback_ids(config, network.cfg),
                            family.fallback_tokens)
    else:
        network, descriptor = _build(family, config, source, dtype, device, folder)
    descriptor.chat_template = read_chat_template(folder)
    return network, descriptor


def network_from_state_dict(config: dict[str, Any], state: dict[str, torch.Tensor], dtype=None,
                            device="cpu") -> tuple[Transformer, ModelDescriptor]:
    """Like `load_pretrained_network`, from a config dict and a state dict held in memory in a family's names."""
    return _build(detect(config), config, StateDictSource(state), dtype, device)


def _build(family: Family, config, source, dtype, device, folder=None) -> tuple[Transformer, ModelDescriptor]:
    cfg = family.model_config(config)
    descriptor = resolve_special_ids(family.descriptor(config, cfg), config, folder, family.fallback_ids(config, cfg),
                                     family.fallback_tokens)
    with torch.device("meta"):
        network = Transformer(cfg)  # shapes only: nothing allocated, nothing initialised
    plan = _plan(family, cfg, network, source)  # every check before anything is read
    state = {}
    for ours, (theirs, transpose) in plan.items():
        tensor = source.tensor(theirs)
        state[ours] = tensor.t().contiguous() if transpose else tensor
    wanted = dtype or state["embed.weight"].dtype
    state = {k: v.to(wanted) if v.is_floating_point() and v.dtype != wanted else v for k, v in state.items()}
    if cfg.tie_weights:
        state["head.weight"] = state["embed.weight"]
    network.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_weights:
        network.head.weight = network.embed.weight
    return network.to(device).eval(), descriptor


def _plan(family: Family, cfg, network: Transformer, source) -> dict[str, tuple[str, bool]]:
    """dlm parameter -> (checkpoint tensor, stored transposed), after checking names and shapes both ways."""
    modules = family.module_names(cfg)
    transposed = set(family.transposed)
    plan, problems = {}, []
    for ours, param in network.state_dict().items():
        if cfg.tie_weights and ours == "head.weight":
            continue
        module, _, kind = ours.rpartition(".")
        parts = module.split(".")
        template = ".".join(["blocks", "{i}", *parts[2:]]) if parts[0] == "blocks" else module
        if template not in modules:
            problems.append(f"the {family.name} layout has no tensor for dlm's {ours}")
            continue
        theirs = modules[template].format(i=parts[1] if parts[0] == "blocks" else "") + "." + kind
        theirs = _resolve(theirs, source)
        transpose = template in transposed and param.dim() == 2
        expected = tuple(param.shape[::-1]) if transpose else tuple(param.shape)
        got = source.shape(theirs)
        if got is None:
            problems.append(f"missing tensor {theirs} (for {ours}, shape {expected})")
        elif got != expected:
            problems.append(f"tensor {theirs} has shape {got}, expected {expected} (for {ours})")
        plan[ours] = (theirs, transpose)
    used = {theirs for theirs, _ in plan.values()}
    extra = sorted(n for n in source.entries if n not in used and not family.ignored(n, cfg))
    if extra:
        problems.append(f"unexpected tensors {extra[:5]}{' and more' if len(extra) > 5 else ''} "
                        f"({len(extra)} in all) not used by the {family.name} layout")
    if problems:
        raise CheckpointFormatError(f"cannot load this {family.name} checkpoint: " + "; ".join(problems))
    return plan


def _resolve(name: str, source) -> str:
    """GPT-2's original checkpoints store names without the `transformer.` prefix."""
    if source.shape(name) is None and name.startswith("transformer.") and source.shape(name[12:]) is not None:
        return name[12:]
    return name


def read_chat_template(folder: Path) -> str | None:
    """The chat template shipped in the folder (chat_template.jinja or tokenizer_config.json), or None."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "tokenizer_config.json").is_file():
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def load_pretrained_tokenizer(folder: str | Path, descriptor: ModelDescriptor):
    """The folder's tokenizer (`tokenizer.json`, read by transformers' fast tokenizer, no remote code), checked
    against the model: no more tokens than the output layer has rows, and the same EOS/pad/BOS/mask ids as the
    descriptor where both name one. Padding side and chat template come from the descriptor."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointFormatError(f"{folder} has no tokenizer.json")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    if len(tokenizer) > descriptor.vocab_size:
        raise CheckpointFormatError(f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model's output "
                                    f"layer has {descriptor.vocab_size} rows: they do not belong together")
    check_tokenizer_ids(tokenizer, descriptor, folder_eos_ids(folder))
    tokenizer.padding_side = descriptor.padding_side
    if descriptor.chat_template is not None:
        tokenizer.chat_template = descriptor.chat_template
    return tokenizer


def check_tokenizer_ids(tokenizer, descriptor: ModelDescriptor, eos_ids: set[int] = frozenset()) -> None:
    """The same EOS / pad / BOS / mask ids in a loaded tokenizer as in the descriptor where both name one (a
    tokenizer's EOS also agrees when it is the end-of-turn id or one of `eos_ids`, the folder's list: special_ids.py);
    sets the descriptor's EoT from the tokenizer's vocabulary when it has none."""
    if descriptor.eot_id is None:
        vocab = tokenizer.get_vocab()
        descriptor.eot_id = next((vocab[t] for t in EOT_TOKENS if t in vocab and vocab[t] < descriptor.vocab_size),
                                 None)
    for attr, field in (("eos_token_id", "eos_id"), ("pad_token_id", "pad_id"), ("bos_token_id", "bos_id"),
                        ("mask_token_id", "mask_id")):
        ours, theirs = getattr(descriptor, field), getattr(tokenizer, attr, None)
        if field == "eos_id" and theirs is not None and (theirs == descriptor.eot_id or theirs in eos_ids):
            continue  # an instruct tokenizer naming its end-of-turn token as EOS, or one of several (special_ids.py)
        if ours is not None and theirs is not None and ours != theirs:
            raise CheckpointFormatError(f"the tokenizer's {attr} is {theirs} but the {descriptor.family} model's "
                                        f"{field} is {ours}")
