"""Typed configuration: dataclasses, YAML presets and `key=value` overrides.

A run is described by one `RunConfig`. It is built from defaults, then presets (`model=tiny`,
`process=ar`, `run=demo`, each a YAML file under `dlm/configs/<group>/`; `process=NAME` also names any
registered process without a file: its config dataclass's defaults), then dotted overrides
(`trainer.max_steps=2000`). The resolved config is saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dlm.network.config import ModelConfig  # noqa: F401  (defined beside the network; re-exported here)
from dlm.precision import PRECISIONS  # trainer.precision; what "auto" means: dlm/precision.py
from dlm.progress import setting as progress_setting  # trainer.progress: true/false or a mode name
from dlm.process import PROCESSES, MDLMConfig, ProcessConfig  # noqa: F401  (ProcessConfig re-exported)
from dlm.softmask.process import SoftMaskedDiffusion

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what is wrong and how to fix it."""


@dataclass
class DataConfig:
    source: str = "embedded"  # "embedded", a .txt file, a folder, a .jsonl file, or "hf:<name>[:<config>]"
    # "text": documents packed into rows; "pairs": prompt -> response JSONL for SFT (data.source a folder with
    # train.jsonl / validation.jsonl, as dlm.tasks writes, or one .jsonl file split by hash; dlm/data/pairs.py)
    format: str = "text"
    text_field: str = "text"
    # "bpe" (trained on the training split), "gpt2", a tokenizer folder, or "task" (the tokenizer of the task
    # whose task.json is in data.source: what "bpe" becomes for such a pair folder)
    tokenizer: str = "bpe"
    vocab_size: int = 8192  # for "bpe"
    packing: str = "wrap"  # "wrap" (documents joined with EOS, cut into rows) | "pad" (one document per row)
    cache_dir: str = ""  # tokenised-data cache; "" = $DLM_CACHE or ~/.cache/dlm
    num_workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 100
    decay: str = "constant"  # "constant" | "cosine"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0




@dataclass
class TrainerConfig:
    max_steps: int = 1000
    max_minutes: float = 0.0  # > 0: also stop when the run's training time (summed over resumes) reaches this
    batch_size: int = 32  # sequences per optimizer step on each device, before accumulation
    accumulate: int = 1
    val_every: int = 250
    val_batches: int = 8
    ckpt_every: int = 250
    precision: str = "auto"  # "auto" (bf16 autocast on GPUs and CPUs with bf16 instructions, dlm/precision.py), "bf16", "32"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # "auto" | "ddp" | "ddp_spawn" | "fsdp"
    ema: float = 0.9999  # 0 disables EMA weights
    seed: int = 1
    out_dir: str = "runs/dlm"
    logger: str = "csv"  # "csv" | "tensorboard" | "wandb"
    # "auto" (= true: bars on a terminal, plain lines in a log), "bar", "plain", "off" (= false): dlm/progress.py
    progress: str = "auto"
    progress_every: int = 50  # plain mode: a progress line every this many steps (and at least one every 30 s)
    compile: bool = False
    # > 0: attention starts causal and widens to bidirectional over this many steps (DiffuLLaMA's annealing, for a
    # run adapted from a causal LM; dlm/train/adapt.py): at step s position i sees the keys <= i + T * s / N
    attention_anneal_steps: int = 0
    # > 0: train LoRA adapters of this rank (scale lora_alpha / rank) instead of all weights; merged at export
    # (dlm/train/lora.py, needs peft). lora_embeddings: also train the embedding and the head
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_embeddings: bool = True
    # Memory of a training step (docs/training.md#memory-of-a-training-step): recompute each transformer block in
    # the backward instead of keeping its activations; and > 0: the loss computes the logits of this many scored
    # positions at a time, each chunk's again in the backward, so the (positions x vocabulary) logits never exist
    # at once (0: off)
    gradient_checkpointing: bool = False
    chunked_ce: int = 0


@dataclass
class SoftMaskConfig:
    """Soft-masking (SPEC section 2): retained masks are fed a mix of E[MASK] and their top-k predictions."""

    enabled: bool = False
    k: int = 3  # top candidates per position (3 for language, 1 for code)
    p_sm: float = 0.8  # probability that a training batch gets the two-pass soft-masked loss
    lr: float = 1e-2  # learning rate of the three scalars (their own AdamW group, no weight decay)
    omega_s: float = 0.01  # initial w_s = sigmoid(a) in (0, 1); near 0, so a pretrained MDLM starts unchanged
    omega_a: float = 6.67  # initial w_a = softplus(b) > 0
    omega_b: float = -0.75  # initial w_b = -softplus(c) < 0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    process: ProcessConfig = field(default_factory=MDLMConfig)  # the config_class of the process named
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    softmask: SoftMaskConfig = field(default_factory=SoftMaskConfig)
    init_from: str = ""  # a checkpoint whose network weights start this run (continued training)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        cfg = cls()
        _merge(cfg, _upgrade(d), prefix="")
        return cfg


# Before each process had its own config class, every process's config held these fields with these defaults.
_OLD_SHARED_PROCESS_FIELDS = {"schedule": "loglinear", "eps": 1e-3, "sampling_eps": 1e-3, "antithetic": True,
                              "block_size": 0, "clip_low": 0.0, "clip_high": 1.0, "clip_search": False,
                              "resample": False}


def _upgrade(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config of an older dlm: drop the shared process fields the process does not have, when they hold
    their old defaults (a non-default value stays, and is refused by name as it would be on the command line)."""
    process = d.get("process")
    if not isinstance(process, dict) or process.get("name") not in PROCESSES:
        return d
    own = {f.name for f in dataclasses.fields(PROCESSES[process["name"]].config_class)}
    kept = {k: v for k, v in process.items() if k in own or _OLD_SHARED_PROCESS_FIELDS.get(k, object()) != v}
    return {**d, "process": kept}


def preset_groups() -> dict[str, list[str]]:
    """The preset names available for each group, e.g. {"model": ["medium", "small", "tiny"], ...}: the YAML files
    of dlm/configs/<group>/, and for "process" every registered process (its config dataclass is its preset)."""
    groups = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(CONFIG_DIR.iterdir()) if d.is_dir()}
    groups["process"] = sorted(set(groups.get("process", [])) | set(PROCESSES))
    return groups


def load_preset(group: str, name: str) -> dict[str, Any]:
    groups = preset_groups()
    if name not in groups.get(group, []):
        raise ConfigError(
            f"unknown {group} preset '{name}'; valid presets: {', '.join(groups.get(group, [])) or 'none'}"
        )
    path = CONFIG_DIR / group / f"{name}.yaml"
    if group == "process" and not path.is_file():  # a registered process without a YAML file: its config's defaults
        return {"process": dataclasses.asdict(PROCESSES[name].config_class())}
    data = yaml.safe_load(path.read_text()) or {}
    # A preset for group "model" holds the fields of ModelConfig; a "run" preset holds a whole RunConfig.
    return data if group == "run" else {group: data}


def build_config(overrides: list[str] | None = None, base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig from `base` (default: defaults) and a list of `key=value` strings.

    `group=name` applies a preset (groups: the folders in dlm/configs); `a.b=value` sets a field. Values are
    parsed as YAML scalars (`true`, `3e-4`; `null` is refused: every field has a value). Presets apply first, in
    order, then field overrides.
    """
    cfg = base or RunConfig()
    overrides = overrides or []
    presets, fields = [], []
    groups = preset_groups()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. trainer.max_steps=2000)")
        key, value = item.split("=", 1)
        (presets if key in groups else fields).append((key, value))
    for group, name in presets:
        _merge(cfg, load_preset(group, name), prefix="")
    for key, value in fields:
        _set(cfg, key, yaml.safe_load(value) if value != "" else "")
    validate(cfg)
    return cfg


def _merge(obj: Any, d: dict[str, Any], prefix: str) -> None:
    for key, value in d.items():
        child = getattr(obj, key, None)
        if isinstance(value, dict) and dataclasses.is_dataclass(child):
            if isinstance(child, ProcessConfig) and "name" in value:  # the name picks the config class: first
                setattr(obj, key, _process_config(child, value["name"], prefix + key + "."))
                value = {k: v for k, v in value.items() if k != "name"}
            _merge(getattr(obj, key), value, prefix + key + ".")
        else:
            _set(obj, key, value, prefix)


def _set(obj: Any, dotted: str, value: Any, prefix: str = "") -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        child = getattr(obj, p, None)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(_unknown_key(obj, p, prefix))
        if isinstance(child, ProcessConfig) and p == parents[-1] and last == "name":
            setattr(obj, p, _process_config(child, value, prefix + p + "."))
            return
        obj, prefix = child, prefix + p + "."
    names = {f.name: f for f in dataclasses.fields(obj)}
    if last not in names:
        raise ConfigError(_unknown_key(obj, last, prefix))
    current = getattr(obj, last)
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"'{prefix}{last}' is a group; set one of its fields, e.g. {prefix}{last}.<field>=...")
    setattr(obj, last, _coerce(value, current, prefix + last))


def _process_config(current: ProcessConfig, name: Any, prefix: str) -> ProcessConfig:
    """`process.name=NAME`: that process's own config class, keeping the values of the fields both classes have."""
    if name not in PROCESSES:
        raise ConfigError(f"unknown {prefix}name '{name}'; valid: {', '.join(sorted(PROCESSES))}")
    new = PROCESSES[name].config_class()
    for f in dataclasses.fields(new):
        if f.name != "name" and hasattr(current, f.name):
            setattr(new, f.name, getattr(current, f.name))
    return new


def _unknown_key(obj: Any, key: str, prefix: str) -> str:
    valid = ", ".join(prefix + f.name for f in dataclasses.fields(obj))
    if isinstance(obj, ProcessConfig):
        owners = sorted(n for n, p in PROCESSES.items() if key in {f.name for f in dataclasses.fields(p.config_class)})
        if owners:
            return (f"{prefix}{key} is an option of process {' or '.join(owners)}, not of '{obj.name}' "
                    f"({prefix}name); use process={owners[0]} or leave it unset")
    return f"unknown config key '{prefix}{key}'; valid keys here: {valid}"


def _coerce(value: Any, current: Any, name: str) -> Any:
    """Convert `value` to the type of the field's current value, with a clear error."""
    kind = type(current)
    if kind is type(None):
        return value
    if value is None:  # YAML's null / ~ / an empty value: no field of the config may be unset
        raise ConfigError(f"'{name}' must be a {kind.__name__}, got null; give a value (it is now {current!r})")
    if name == "trainer.progress":  # a mode name, or true/false (its values when it was a bool)
        try:
            return progress_setting(value)
        except ValueError:
            raise ConfigError(f"'{name}' must be a mode: auto, bar, plain or off (true = auto, false = off), got "
                              f"{value!r}") from None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if kind is int:
            if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
                value = float(value)  # YAML reads "1e5" as a string; accept it when it is a whole number
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"'{name}' must be a {kind.__name__}, got {value!r}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: RunConfig) -> None:
    """Reject values that cannot work, naming the field and the fix."""
    m, p, d, o, t = cfg.model, cfg.process, cfg.data, cfg.optim, cfg.trainer
    for group in dataclasses.fields(cfg):  # inf and nan pass "> 0" checks (optim.lr=.inf failed at step 1)
        section = getattr(cfg, group.name)
        for f in dataclasses.fields(section) if dataclasses.is_dataclass(section) else ():
            value = getattr(section, f.name)
            _check(not isinstance(value, float) or math.isfinite(value),
                   f"{group.name}.{f.name}={value} must be a finite number")
    for problem in m.problems():
        raise ConfigError(problem)
    _check(m.context >= 4, f"model.context={m.context} is too short; use at least 4 tokens")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    _check(p.name in PROCESSES, f"unknown process.name '{p.name}'; valid: {', '.join(sorted(PROCESSES))}")
    _check(p.mask_id >= -1, f"process.mask_id={p.mask_id} must be a token id (or -1: the tokenizer's [MASK])")
    _check(m.vocab_size <= 0 or p.mask_id < m.vocab_size,
           f"process.mask_id={p.mask_id} lies outside the vocabulary ({m.vocab_size} tokens)")
    _check(d.packing in ("wrap", "pad"), f"unknown data.packing '{d.packing}'; valid: wrap, pad")
    _check(d.format in ("text", "pairs"), f"unknown data.format '{d.format}'; valid: text (documents packed into "
           "rows), pairs (prompt -> response JSONL for supervised fine-tuning)")
    _check(d.format == "pairs" or d.tokenizer != "task",
           "data.tokenizer=task (a task's tokenizer) needs data.format=pairs and a pair folder written by a task")
    _check(d.vocab_size >= 260, f"data.vocab_size={d.vocab_size} is too small for a byte-level BPE; use at least 260")
    _check(cfg.trainer.attention_anneal_steps >= 0,
           f"trainer.attention_anneal_steps={cfg.trainer.attention_anneal_steps} must be >= 0 (0: no annealing)")
    _check(cfg.trainer.chunked_ce >= 0, f"trainer.chunked_ce={cfg.trainer.chunked_ce} must be >= 0 (scored positions "
           "per chunk of the loss's logits, e.g. 1024; 0: no chunking)")
    _check(cfg.trainer.lora_rank >= 0, f"trainer.lora_rank={cfg.trainer.lora_rank} must be >= 0 (0: no LoRA)")
    _check(o.lr > 0, f"optim.lr={o.lr} must be positive")
    _check(o.decay in ("constant", "cosine"), f"unknown optim.decay '{o.decay}'; valid: constant, cosine")
    _check(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _check(0.0 <= o.beta1 < 1.0 and 0.0 <= o.beta2 < 1.0,
           f"optim.beta1={o.beta1} and optim.beta2={o.beta2} must be in [0, 1) (AdamW's moment decays)")
    _check(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1] (the cosine's floor "
           "as a fraction of optim.lr)")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (a gradient-norm limit; 0 = no clipping)")
    for name in ("max_steps", "batch_size", "accumulate", "val_every", "ckpt_every", "devices", "num_nodes",
                 "progress_every"):
        value = getattr(t, name)
        _check(value > 0, f"trainer.{name}={value} must be a positive integer")
    _check(t.val_batches >= 0, "trainer.val_batches must be >= 0")
    _check(t.max_minutes >= 0, f"trainer.max_minutes={t.max_minutes} must be >= 0 (0 = no time limit)")
    _check(t.precision in PRECISIONS, f"unknown trainer.precision '{t.precision}'; valid: {', '.join(PRECISIONS)}")
    _check(t.strategy in ("auto", "ddp", "ddp_spawn", "fsdp"), f"unknown trainer.strategy '{t.strategy}'; valid: auto, ddp, ddp_spawn, fsdp")
    _check(t.logger in ("csv", "tensorboard", "wandb"), f"unknown trainer.logger '{t.logger}'; valid: csv, tensorboard, wandb")
    _check(0.0 <= t.ema < 1.0, f"trainer.ema={t.ema} must be in [0, 1) (0 disables EMA)")
    _validate_softmask(cfg)
    try:  # the process's own rules, and whether soft-masking can wrap it
        PROCESSES[p.name].check_config(cfg)
        if cfg.softmask.enabled:
            SoftMaskedDiffusion.check_base(PROCESSES[p.name])
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _validate_softmask(cfg: RunConfig) -> None:
    sm = cfg.softmask
    _check(sm.k >= 1, f"softmask.k={sm.k} must be a positive integer (top candidates per position; 3 for text)")
    _check(cfg.model.vocab_size <= 0 or sm.k < cfg.model.vocab_size,
           f"softmask.k={sm.k} must be smaller than the vocabulary ({cfg.model.vocab_size} tokens)")
    _check(sm.k < cfg.data.vocab_size or cfg.data.tokenizer != "bpe",
           f"softmask.k={sm.k} must be smaller than the vocabulary (data.vocab_size={cfg.data.vocab_size})")
    _check(0.0 <= sm.p_sm <= 1.0, f"softmask.p_sm={sm.p_sm} must be in [0, 1] (probability of a soft-masked batch)")
    _check(sm.lr > 0, f"softmask.lr={sm.lr} must be positive")
    _check(0.0 < sm.omega_s < 1.0, f"softmask.omega_s={sm.omega_s} must be in (0, 1) (w_s = sigmoid(a))")
    _check(sm.omega_a > 0.0, f"softmask.omega_a={sm.omega_a} must be > 0 (w_a = softplus(b))")
    _check(sm.omega_b < 0.0, f"softmask.omega_b={sm.omega_b} must be < 0 (w_b = -softplus(c))")


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
