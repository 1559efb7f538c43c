"""Damaged, foreign or edited files are caught on load, with an error naming the file (issue 14, items 2-4 and 9)."""

import contextlib
import json
import pickle
import random
import shutil

import pytest
import torch

import dlm
from dlm.checkpoint import CheckpointError, read_checkpoint
from dlm.config import ConfigError, build_config
from dlm.data import train_bpe
from dlm.integrity import write_record
from dlm.train.run import train

OTHER_TEXT = ["An entirely different text, about ships and harbours, tides and ropes. " * 60]


def export_copy(micro_run, tmp_path):
    return shutil.copytree(micro_run / "model", tmp_path / "model")


@contextlib.contextmanager
def config_json(folder, source=None):
    """Edit an export's config.json in place: yields its parsed content (read from `source`'s, default the folder's
    own) and writes it back."""
    meta = json.loads(((source or folder) / "config.json").read_text())
    yield meta
    (folder / "config.json").write_text(json.dumps(meta))


def rebless(folder):
    """Rewrite the integrity record after an edit (a consistent, deliberate edit: the other checks must hold)."""
    write_record(folder, [p.name for p in folder.iterdir() if p.is_file() and p.name != "integrity.json"])


def test_a_foreign_tokenizer_of_the_same_size_in_an_export_is_refused(micro_run, tmp_path):
    folder = export_copy(micro_run, tmp_path)
    own = dlm.load(folder).tokenizer
    other = train_bpe(OTHER_TEXT, vocab_size=len(own) - 2)  # smaller: the old vocabulary-size check let it pass
    from dlm.data.tokenizer import ensure_special_tokens

    ensure_special_tokens(other).save_pretrained(str(folder))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is corrupt or was changed after it was written"):
        dlm.load(folder)
    rebless(folder)  # the record rewritten too: the fingerprint stored with the weights still tells
    with pytest.raises(CheckpointError, match=r"model[/\\]tokenizer\.json is not the tokenizer this model was trained"):
        dlm.load(folder)


def test_a_deleted_or_added_tokenizer_file_is_refused(micro_run, tmp_path):
    folder = export_copy(micro_run, tmp_path)
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json is missing \(listed in .*integrity\.json\)"):
        dlm.load(folder)
    rebless(folder)  # even so, a tokenizer without [MASK]/BOS is refused at load, not later
    with pytest.raises(CheckpointError, match=r"has no bos_token.*mask_token"):
        dlm.load(folder)
    folder = shutil.copytree(micro_run / "model", tmp_path / "model2")
    (folder / "special_tokens_map.json").write_text(json.dumps({"mask_token": "a"}))
    with pytest.raises(CheckpointError, match=r"special_tokens_map\.json is not part of this model"):
        dlm.load(folder)


@pytest.mark.parametrize("edit", [("model", "n_head", 4), ("model", "context", 64), ("process", "schedule", "cosine"),
                                  ("process", "name", "ar")])
def test_config_json_edits_that_keep_the_weight_shapes_are_refused(micro_run, tmp_path, edit):
    folder = export_copy(micro_run, tmp_path)
    group, key, value = edit
    with config_json(folder) as meta:
        meta["config"][group][key] = value
    dlm.load(micro_run / "model")  # control: the original loads
    with pytest.raises(CheckpointError, match=r"config\.json is corrupt or was changed after it was written"):
        dlm.load(folder)


def test_a_config_json_without_config_or_with_an_invalid_value_is_a_clear_error(micro_run, tmp_path):
    folder = export_copy(micro_run, tmp_path)
    with config_json(folder) as meta:
        del meta["config"]
    rebless(folder)
    with pytest.raises(CheckpointError, match=r"config\.json has no \"config\" entry"):
        dlm.load(folder)
    with config_json(folder, source=micro_run / "model") as meta:
        meta["config"]["model"]["n_head"] = 3  # 64 / 3: validated like a command line would be
    rebless(folder)
    with pytest.raises(CheckpointError, match=r"config\.json holds an invalid config: model\.d_model=64 must be "
                                              r"divisible by model\.n_head=3"):
        dlm.load(folder)


def test_an_export_without_its_integrity_record_or_weights_hash_is_refused(micro_run, tmp_path):
    folder = export_copy(micro_run, tmp_path)
    with config_json(folder) as meta:
        del meta["weights_sha256"]
    with pytest.raises(CheckpointError, match=r"config\.json is corrupt or was changed"):
        dlm.load(folder)
    (folder / "integrity.json").unlink()
    with pytest.raises(CheckpointError, match=r"integrity\.json is missing: .* cannot be checked; re-export"):
        dlm.load(folder)


def test_a_checkpoint_whose_config_was_edited_is_refused(micro_run, tmp_path):
    ckpt = torch.load(micro_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["dlm"]["config"]["process"]["name"] = "ar"
    torch.save(ckpt, tmp_path / "edited.ckpt")
    with pytest.raises(CheckpointError, match=r"edited\.ckpt: its config was changed after it was written"):
        dlm.load(tmp_path / "edited.ckpt")


def test_a_foreign_tokenizer_in_a_run_folder_is_refused_on_resume(micro_run, micro_args, tmp_path):
    run = shutil.copytree(micro_run, tmp_path / "run")
    other = train_bpe(OTHER_TEXT, vocab_size=300)
    shutil.rmtree(run / "tokenizer")
    other.save_pretrained(str(run / "tokenizer"))  # a complete, foreign tokenizer/ (no record: as an old dlm wrote)
    with pytest.raises(CheckpointError, match=r"run[/\\]tokenizer is not the tokenizer this model was trained with.*"
                                              r"delete .*tokenizer and run the same command again"):
        train(build_config(micro_args(run, "trainer.max_steps=14")))
    shutil.rmtree(run / "tokenizer")  # the fix the message gives: restored from the checkpoint
    train(build_config(micro_args(run, "trainer.max_steps=13")))
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 13
    assert dlm.load(run).tokenizer.get_vocab() == dlm.load(micro_run).tokenizer.get_vocab()


def test_a_half_written_run_tokenizer_is_refused_with_the_fix(micro_run, micro_args, tmp_path):
    run = shutil.copytree(micro_run, tmp_path / "run")
    data = (run / "tokenizer" / "tokenizer.json").read_bytes()
    (run / "tokenizer" / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is corrupt or was changed.*delete .*tokenizer"):
        train(build_config(micro_args(run, "trainer.max_steps=14")))


def test_init_from_with_another_tokenizer_is_refused(micro_run, micro_args, tmp_path, text_folder):
    other = tmp_path / "other_tok"
    train_bpe(OTHER_TEXT, vocab_size=300).save_pretrained(str(other))
    args = [a for a in micro_args(tmp_path / "cont", f"init_from={micro_run}/model") if not a.startswith("model.")]
    with pytest.raises(ConfigError, match=r"init_from=.* brings its own tokenizer .* data\.tokenizer="):
        train(build_config([*args, f"data.tokenizer={other}", "trainer.max_steps=2"]))


def test_a_text_file_random_bytes_and_non_zip_files_are_not_checkpoints(micro_run, tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match=r"notes\.ckpt is truncated or corrupt, or not a dlm checkpoint"):
        dlm.load(text)
    rng = random.Random(0)
    for i in range(256):
        junk = tmp_path / f"junk{i}.ckpt"
        junk.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2048))))
        with pytest.raises(CheckpointError):
            read_checkpoint(junk)


class Boom:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_malicious_pickle_is_refused_without_suggesting_weights_only_false(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "dlm": Boom()}, path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert "objects other than tensors" in message and "weights_only" not in message
    assert "pwned" not in capsys.readouterr().out
    with pytest.raises(pickle.UnpicklingError):  # what torch itself says, with its hint
        torch.load(path, weights_only=True)
