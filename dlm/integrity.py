"""Integrity records: every model dlm writes says what it is made of, and every load checks it.

- An exported folder (and a run's `tokenizer/`) holds `integrity.json`: the SHA-256 of each of its files (config,
  weights, every tokenizer file), written last, after the files are in place. Loading checks each file against
  it; a missing, changed or unexpected file is an error naming it.
- A training checkpoint holds, in its `dlm` entry, the SHA-256 of its resolved config and of its tokenizer (the
  weights are covered by the archive's CRC-32s, checked on every read).
- A loaded config is validated like a command-line one (`dlm.config.validate`), so a hand-edited value is caught
  even where no hash can be (a checkpoint from before these records).

These are checks against damage and accidental or inconsistent edits, not signatures: whoever can write the files
can also rewrite the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from dlm.data.ioerrors import os_error_from
from dlm.errors import CheckpointError
from dlm.faults import kill_point

RECORD = "integrity.json"
RECORD_FORMAT = 1
# Files a Hugging Face tokenizer loader would read if present: one that the record does not list would change the
# tokenizer behind the record's back.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file through a temp file, fsync and rename: it is whole or absent, never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_record(folder: Path, names: list[str]) -> None:
    record = {"format": RECORD_FORMAT, "sha256": {n: sha256_file(Path(folder) / n) for n in sorted(names)}}
    write_atomic(Path(folder) / RECORD, json.dumps(record, indent=2) + "\n")


def verify_folder(folder: Path, fix: str) -> dict[str, str]:
    """Check every file of `folder` against its integrity.json; returns {name: sha256}. `fix` ends each error."""
    folder = Path(folder)
    record_path = folder / RECORD
    if not record_path.is_file():
        raise CheckpointError(f"{record_path} is missing: {folder} is incomplete (its writing was interrupted) or was "
                              f"written by a dlm without integrity records, so its files cannot be checked; {fix}")
    try:
        record = json.loads(record_path.read_text())
        hashes = record["sha256"]
        assert isinstance(hashes, dict) and all(isinstance(v, str) for v in hashes.values())
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise CheckpointError(f"{record_path} is corrupt ({type(e).__name__}); {fix}") from None
    for name, expected in hashes.items():
        path = folder / name
        if Path(name).name != name:
            raise CheckpointError(f"{record_path} is corrupt (it lists {name!r}); {fix}")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {record_path}); {fix}")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path} is corrupt or was changed after it was written: its SHA-256 differs from "
                                  f"the one in {record_path}; {fix}")
    for name in TOKENIZER_FILES:
        if name not in hashes and (folder / name).exists():
            raise CheckpointError(f"{folder / name} is not part of this model (not listed in {record_path}) and would "
                                  f"change its tokenizer; remove it, or {fix}")
    return hashes


# ------------------------------------------------------------------------------------------------- tokenizers
def _save_pretrained(tokenizer, stage: Path) -> None:
    """`tokenizer.save_pretrained(stage)`, whose full disk (a bare Exception from the tokenizers library) is an
    OSError naming the folder."""
    try:
        tokenizer.save_pretrained(str(stage))
    except Exception as e:
        os_error = os_error_from(e, stage.parent)
        if os_error is None:
            raise
        raise os_error from e


def save_tokenizer_files(tokenizer, folder: Path) -> list[str]:
    """Write `tokenizer`'s files into `folder` file by file atomically (staged in a temp folder); returns their names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stage = folder / f".tokenizer.{os.getpid()}.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        _save_pretrained(tokenizer, stage)
        names = sorted(p.name for p in stage.iterdir() if p.is_file())
        kill_point("tokenizer_written")
        for name in names:
            with open(stage / name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(stage / name, folder / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return names


def save_tokenizer_dir(tokenizer, folder: Path) -> None:
    """A run's `tokenizer/` folder, written whole or not at all: staged beside it with its integrity record, then
    renamed into place (a kill at any moment leaves the old folder, or none, never a partial one)."""
    folder = Path(folder)
    stage = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        _save_pretrained(tokenizer, stage)
        write_record(stage, [p.name for p in stage.iterdir() if p.is_file()])
        kill_point("tokenizer_written")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(stage, folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def remove_stale_stages(parent: Path) -> None:
    """Temp folders and files left in `parent` by a killed writer (call it holding the run's lock)."""
    for stale in Path(parent).glob(".*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def load_tokenizer_dir(folder: Path, fix: str, verify: bool = True):
    """The tokenizer of a folder with an integrity record (a run's tokenizer/, an export), checked file by file
    (verify=False: the caller has just checked the folder) and for the special tokens dlm needs."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if verify:
        verify_folder(folder, fix)
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds on a bad file)
        raise CheckpointError(f"the tokenizer in {folder} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); {fix}") from None
    missing = [name for name in ("bos_token", "eos_token", "pad_token", "mask_token") if getattr(tok, name) is None]
    if missing:
        raise CheckpointError(f"the tokenizer in {folder} has no {', '.join(missing)} (dlm needs them; "
                              f"{folder / 'tokenizer_config.json'} names them); {fix}")
    return tok


def check_tokenizer(tokenizer, fingerprint: str, where: Path, fix: str) -> None:
    """`tokenizer` must be the one the model was trained with (its stored fingerprint), else an error naming it."""
    from dlm.data.tokenizer import same_tokenizer

    if fingerprint and not same_tokenizer(tokenizer, fingerprint):
        raise CheckpointError(f"{where} is not the tokenizer this model was trained with (its vocabulary, merges, "
                              f"special tokens or pre-tokenizer differ from the fingerprint stored with the model); "
                              f"{fix}")


# ------------------------------------------------------------------------------------------------- configs
def config_from_meta(meta: dict, where: Path):
    """The RunConfig stored with a model (config.json's "config", a checkpoint's dlm.config), validated like a
    command-line config; an error names `where`."""
    from dlm.config import ConfigError, RunConfig, validate

    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} has no \"config\" entry (the model's settings); re-export the model or retrain")
    try:
        cfg = RunConfig.from_dict(config)
        validate(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{where} holds an invalid config: {e}") from None
    if cfg.model.vocab_size <= 0:
        raise CheckpointError(f"{where} holds an invalid config: model.vocab_size={cfg.model.vocab_size}")
    return cfg


def checkpoint_record(config: dict, tokenizer_state: dict) -> dict:
    """The integrity entry of a training checkpoint's `dlm` metadata."""
    return {"config_sha256": sha256_json(config), "tokenizer_sha256": sha256_json(tokenizer_state)}


def verify_checkpoint_meta(meta: dict, path: Path) -> None:
    """A checkpoint's config and tokenizer against its integrity entry (checkpoints written before it have none)."""
    record = meta.get("integrity")
    if not record:
        return
    fix = "use another checkpoint of the run (last.ckpt, best.ckpt) or retrain"
    if sha256_json(meta.get("config")) != record.get("config_sha256"):
        raise CheckpointError(f"checkpoint {path}: its config was changed after it was written (SHA-256 mismatch); {fix}")
    if sha256_json(meta.get("tokenizer")) != record.get("tokenizer_sha256"):
        raise CheckpointError(f"checkpoint {path}: its tokenizer was changed after it was written (SHA-256 mismatch); "
                              f"{fix}")


def model_tokenizer(path: Path, meta: dict, tokenizer_from_state):
    """The tokenizer stored with a model: an export's files (already checked against its record) or a checkpoint's
    state (read by `tokenizer_from_state(state, fingerprint)`), checked against the fingerprint stored with the
    weights."""
    path = Path(path)
    fingerprint = meta.get("tokenizer_fingerprint", "")
    if path.is_dir():
        fix = "re-export the model (dlm export RUN/checkpoints/last.ckpt FOLDER)"
        tok = load_tokenizer_dir(path, fix, verify=False)
        check_tokenizer(tok, fingerprint, path / "tokenizer.json", fix)
    else:
        tok = tokenizer_from_state(meta["tokenizer"], fingerprint)
        check_tokenizer(tok, fingerprint, path, "use another checkpoint of the run (last.ckpt, best.ckpt) or retrain")
    return tok
