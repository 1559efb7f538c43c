"""Checkpoints: written atomically, read without unrestricted pickle, checked before use.

Two formats:
- training checkpoints (`*.ckpt`, Lightning's dict + our `"dlm"` entry: format version, resolved config,
  tokenizer, EMA weights). They resume training exactly.
- exported model folders (Hugging Face style): `config.json` + `model.safetensors` + tokenizer files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dlm.errors import CheckpointError  # noqa: F401  (defined low, so dlm.integrity can raise it)
from dlm.faults import kill_point
from dlm.integrity import sha256_file

# 2: a process's learnable parts are stored under "process." (soft-masking's w: "process.mixer.*", with its EMA as
#    "ema_process"); format 1 kept them under "softmask." / "ema_softmask" and is migrated on load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)




class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a half-written file (temp file + rename) and loads only
    tensors and plain data (`weights_only=True`)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:  # a file object: a failed write is an OSError with its errno
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            kill_point("checkpoint_written")
            os.replace(tmp, path)
            kill_point("checkpoint_renamed")
        except (OSError, RuntimeError) as e:
            raise _write_error(e, path, checkpoint) from e
        finally:
            tmp.unlink(missing_ok=True)  # a failed save (disk full, ...) leaves no partial file behind

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        # Lightning also passes plain state dicts through here (ddp_spawn hands the trained weights back to the
        # main process in a temporary file); only training checkpoints (with a "state_dict") carry dlm metadata.
        return read_checkpoint(path, require_dlm=False)


def _write_error(e: BaseException, path: Path, checkpoint) -> CheckpointError:
    """A clear CheckpointError for a checkpoint that could not be written (full or read-only disk, ...)."""
    from dlm.guards import disk_error_message, no_space_message, tensor_bytes

    needed = max(tensor_bytes(checkpoint), path.stat().st_size if path.is_file() else 0)
    short_write = isinstance(e, RuntimeError) and "unexpected pos" in str(e)  # torch's writer: the disk took less
    if short_write or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
        return CheckpointError(no_space_message(path, needed))
    if isinstance(e, OSError) and e.errno is not None:
        return CheckpointError(disk_error_message(e, path, "set trainer.out_dir to a writable folder"))
    return CheckpointError(f"could not write checkpoint {path} ({type(e).__name__}: {str(e)[:200]}); check that "
                           "its disk is writable and has space")


def read_checkpoint(path: str | Path, require_dlm: bool = True) -> dict:
    """Load a training checkpoint to CPU with `weights_only=True`, with a clear error when it is unusable.

    require_dlm=False also accepts a file that is not a training checkpoint (a bare state dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    advice = "use another checkpoint of the run (last.ckpt, best.ckpt) or retrain"
    if not zipfile.is_zipfile(path):  # every checkpoint dlm writes is a torch zip archive
        kind = "empty" if path.stat().st_size == 0 else "not a PyTorch zip archive"
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt, or not a dlm checkpoint at all (the file is "
                              f"{kind}); {advice}")
    try:
        bad_entry = _first_corrupt_entry(path)
        if bad_entry is None:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text would suggest weights_only=False: never do that
        raise CheckpointError(f"{path} holds objects other than tensors and plain data, which dlm refuses to load "
                              "(unpickling them could run arbitrary code): it was not written by dlm, or was "
                              f"altered; {advice}") from None
    except Exception as e:  # noqa: BLE001  (a damaged archive fails in many ways inside torch and zipfile)
        detail = str(e).split("\n")[0][:200]
        if "weights_only" in detail:
            detail = "refused by the weights-only loader"
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {detail}); "
                              f"{advice}") from e
    if bad_entry is not None:  # torch.load does not check the archive's CRCs: a flipped byte would load
        raise CheckpointError(f"checkpoint {path} is corrupt: {bad_entry} fails its CRC check; {advice}")
    if require_dlm or (isinstance(ckpt, dict) and "state_dict" in ckpt):
        check_format(ckpt.get("dlm") if isinstance(ckpt, dict) else None, path)
        from dlm.integrity import config_from_meta, verify_checkpoint_meta

        verify_checkpoint_meta(ckpt["dlm"], path)
        config_from_meta(ckpt["dlm"], path)  # validated like a command-line config
    return ckpt


def _first_corrupt_entry(path: Path) -> str | None:
    """The first entry of a torch zip archive whose CRC-32 does not match its bytes, or None (reads the whole
    file: ~0.2 s per 250 MB)."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def check_format(meta: dict | None, path) -> None:
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise CheckpointError(f"{path} is not a dlm checkpoint (it has no 'dlm' metadata)")
    version = meta["format_version"]
    if version not in READABLE_VERSIONS:
        newer = version > FORMAT_VERSION
        raise CheckpointError(
            f"{path} uses checkpoint format {version}, this dlm reads formats {min(READABLE_VERSIONS)}-{FORMAT_VERSION}: "
            + ("upgrade dlm (pip install -U dlm)" if newer else "it comes from an older, incompatible dlm; "
               "re-export it with that version or retrain")
        )


def tokenizer_state(tokenizer) -> dict:
    """A tokenizer as plain data (JSON string + special tokens), storable in a weights-only checkpoint."""
    return {
        "json": tokenizer.backend_tokenizer.to_str(),
        "special": {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token", "mask_token", "unk_token")},
    }


def tokenizer_from_state(state: dict, fingerprint: str = ""):
    """The tokenizer of `tokenizer_state`. States written before the unknown token was stored lack it (a Hugging Face
    tokenizer adopted by an adapted run names one, SmolLM2's <|endoftext|>, and the fingerprint counts it): given the
    `fingerprint` stored beside the state, the candidate (the tokenizer model's own unk, then each special token)
    that reproduces it is taken; without a match the tokenizer is returned as stored, for the caller's check."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from dlm.data.tokenizer import same_tokenizer

    def build(special: dict):
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(state["json"]), **special)

    tok = build(state["special"])
    if not fingerprint or "unk_token" in state["special"] or same_tokenizer(tok, fingerprint):
        return tok
    spec = json.loads(state["json"])
    candidates = [spec.get("model", {}).get("unk_token")]
    candidates += [t["content"] for t in spec.get("added_tokens", []) if t.get("special")]
    for candidate in dict.fromkeys(c for c in candidates if c is not None):
        trial = build({**state["special"], "unk_token": candidate})
        if same_tokenizer(trial, fingerprint):
            return trial
    return tok


def state_under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a state dict under `prefix` ("network.", "softmask."), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _renamed_softmask(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Format 1 -> 2: soft-masking's w moved from "softmask.*" to "<prefix>mixer.*" (the process owns its mixer)."""
    return {(prefix + "mixer." + k[len("softmask."):] if k.startswith("softmask.") else k): v for k, v in state.items()}


def migrate_checkpoint(ckpt: dict) -> dict:
    """Bring a training checkpoint of an older format to the current one, in place (and return it)."""
    meta = ckpt.get("dlm") or {}
    if meta.get("format_version", FORMAT_VERSION) < 2:
        if "state_dict" in ckpt:
            ckpt["state_dict"] = _renamed_softmask(ckpt["state_dict"], "process.")
        old_ema = meta.pop("ema_softmask", None)
        meta["ema_process"] = {f"mixer.{k}": v for k, v in old_ema.items()} if old_ema else None
        meta["format_version"] = FORMAT_VERSION
    return ckpt


def network_state_from_checkpoint(ckpt: dict, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The network's weights from a training checkpoint: the EMA weights when present, else the live ones."""
    ema = ckpt["dlm"].get("ema")
    if use_ema and ema:
        return ema
    return state_under(ckpt["state_dict"], "network.")


def merge_lora(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A LoRA run's network weights (peft's names: `X.base_layer.weight`, `X.lora_A.<adapter>.weight` (R, in),
    `X.lora_B.<adapter>.weight` (out, R)) as the plain network's: X.weight = base + B A scale (scale = alpha / rank),
    the same merge as the export's (dlm/train/lora.py), without peft."""
    merged = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        module, adapter = key.split(".lora_A.")
        b = state[f"{module}.lora_B.{adapter}"]
        weight = merged[f"{module}.weight"]
        merged[f"{module}.weight"] = (weight.float() + (b.float() @ a.float()) * scale).to(weight.dtype)
    return merged


def process_state_from_checkpoint(ckpt: dict, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The process's learnable parts from a (migrated) training checkpoint ({} for a parameter-free process), paired
    with the network's weights: the EMA ones beside the EMA network, else (no EMA, or a checkpoint from before the
    process had one) the live ones."""
    meta = migrate_checkpoint(ckpt)["dlm"]
    live = state_under(ckpt["state_dict"], "process.")
    if use_ema and meta.get("ema") and meta.get("ema_process"):
        return {**live, **meta["ema_process"]}  # the EMA follows parameters; buffers are the live ones
    return live


# ------------------------------------------------------------------------------------- exported folders
def save_pretrained(folder: str | Path, network: torch.nn.Module, config: dict, tokenizer, extra: dict | None = None,
                    process: torch.nn.Module | None = None) -> Path:
    """Write `config.json`, `model.safetensors`, the tokenizer files and, last, `integrity.json` (the SHA-256 of
    each) into `folder`. Every file is written atomically; until the record is written the folder does not load.

    process: its learnable parts (soft-masking's w), if any, are stored beside the network's weights under the
    prefix `process.`."""
    from safetensors.torch import save as to_bytes

    from dlm.integrity import RECORD, save_tokenizer_files, write_atomic, write_record

    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    if network.cfg.tie_weights:
        state.pop("head.weight", None)  # safetensors refuses shared storage; re-tied on load
    if process is not None:
        state.update({f"process.{k}": v.detach().cpu().contiguous() for k, v in process.state_dict().items()})
    blob = to_bytes(state, metadata={"format": "pt", "dlm_format_version": str(FORMAT_VERSION)})
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RECORD).unlink(missing_ok=True)  # the folder is incomplete until the new record is written
        write_atomic(folder / "model.safetensors", blob)  # Python's writes: a full disk is an OSError, not silence
        meta = {"dlm_format_version": FORMAT_VERSION, "config": config, **(extra or {}),
                "weights_sha256": hashlib.sha256(blob).hexdigest(), "integrity": RECORD}
        write_atomic(folder / "config.json", json.dumps(meta, indent=2))
        names = save_tokenizer_files(tokenizer, folder)
        kill_point("export_written")
        write_record(folder, ["config.json", "model.safetensors", *names])
    except OSError as e:
        from dlm.guards import no_space_message

        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(no_space_message(folder / "model.safetensors", 2 * len(blob), "the export")) from e
        raise
    return folder


def clear_export_files(folder: str | Path) -> list[str]:
    """Remove from `folder` the files an export writes (and its temp files), before another export into it; other
    files stay. Returns the names removed. The integrity record goes first: the folder stops loading at once."""
    from dlm.integrity import RECORD, TOKENIZER_FILES

    folder, removed = Path(folder), []
    for name in (RECORD, "config.json", "model.safetensors", *TOKENIZER_FILES):
        if (folder / name).is_file() or (folder / name).is_symlink():
            (folder / name).unlink()
            removed.append(name)
    for stale in folder.glob(".*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return removed


def load_pretrained_files(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read an exported folder: (metadata from config.json, weights). Checks every file against the folder's
    integrity record, the format, and the config (validated like a command-line one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from dlm.integrity import RECORD, config_from_meta, verify_folder

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{folder} is not a dlm model folder: {p.name} is missing")
    fix = ("re-export the model (dlm export RUN/checkpoints/last.ckpt FOLDER; running the run's dlm train command "
           "again also re-exports it)")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is corrupt ({e}); {fix}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{config_path} is corrupt (not a JSON object); {fix}")
    check_format({"format_version": meta.get("dlm_format_version")} if "dlm_format_version" in meta else None, folder)
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights_path} is truncated or corrupt ({e}); {fix}") from e
    if meta.get("integrity") or (folder / RECORD).exists():
        verify_folder(folder, fix)  # every file, the weights included, against integrity.json
    else:  # an export written before integrity records: only its weights can be checked
        if "weights_sha256" not in meta:
            raise CheckpointError(f"{config_path} records no checksum of the weights (no weights_sha256, no "
                                  f"{RECORD}), so {weights_path} cannot be checked; {fix}")
        if sha256_file(weights_path) != meta["weights_sha256"]:  # a damaged tensor byte
            raise CheckpointError(f"{weights_path} is corrupt: its SHA-256 differs from the one recorded in "
                                  f"config.json when it was exported; {fix}")
        warnings.warn(f"{folder} was exported before dlm wrote integrity records: its config and tokenizer files "
                      f"cannot be checked; {fix}", stacklevel=3)
    config_from_meta(meta, config_path)
    if meta.get("dlm_format_version", FORMAT_VERSION) < 2:
        weights = _renamed_softmask(weights, "process.")
    return meta, weights
