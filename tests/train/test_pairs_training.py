"""Supervised fine-tuning on pair files (data.format=pairs): a Sudoku run through the `dlm` command, the split of
a pair source, the task's tokenizer, block-size padding and the errors."""

import json

import pytest
import torch
import yaml

from dlm.cli import main
from dlm.config import build_config
from dlm.data.pairs import pair_split, read_pairs
from dlm.tasks import make_task
from tests.train.test_adapt import causal_folder  # noqa: F401  (a fixture)

PAIR_OVERRIDES = ["data.format=pairs", "model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.context=36",
                  "trainer.batch_size=8", "trainer.val_every=4", "trainer.val_batches=1", "trainer.ckpt_every=4",
                  "trainer.progress=false", "trainer.ema=0.99", "optim.warmup_steps=0", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def sudoku4(tmp_path_factory):
    """A 4x4 Sudoku pair folder (train 64, validation 8, test 8) as `python -m dlm.tasks.sudoku` writes it."""
    folder = tmp_path_factory.mktemp("sudoku4")
    make_task("sudoku", size=4).write_pairs(folder, {"train": 64, "validation": 8, "test": 8}, seed=0)
    return folder


def test_a_sudoku_sft_run_through_the_cli_keeps_its_given_cells(sudoku4, tmp_path, monkeypatch):
    """`dlm train data.format=pairs data.source=<sudoku folder>`: the task's tokenizer (15 tokens), one puzzle per
    row, the prompt (BOS and the 16 cells) given: never noised in any training or validation step, never scored;
    the run trains, exports and loads, and sampling keeps the givens."""
    import dlm
    from dlm.eval.tasks import evaluate_task, task_canvas
    from dlm.process.mdlm import MaskedDiffusion
    from dlm.sampler.registry import make_sampler

    seen = []
    loss_at = MaskedDiffusion.loss_at

    def spy(self, network, batch, z, t, inputs_embeds=None):
        seen.append((batch["input_ids"], batch["given"], batch["loss_mask"], z))
        return loss_at(self, network, batch, z, t, inputs_embeds)

    monkeypatch.setattr(MaskedDiffusion, "loss_at", spy)
    out = tmp_path / "sft"
    assert main(["train", *PAIR_OVERRIDES, f"data.source={sudoku4}", "trainer.max_steps=8",
                 f"trainer.out_dir={out}"]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["format"] == "pairs" and cfg["data"]["tokenizer"] == "task" and cfg["model"]["vocab_size"] == 15
    assert len(seen) == 8 + 2  # 8 training steps, 2 validations of one batch
    masked_any = False
    for x, given, loss_mask, z in seen:
        assert x.shape == (8, 34) and given.sum(1).tolist() == [17] * 8  # [BOS] + 16 cells
        assert torch.equal(z[given], x[given])  # never noised
        assert not (loss_mask & given).any()  # never scored
        masked_any |= bool((z == 3).any())
    assert masked_any  # the responses were noised
    losses = [float(r.split(",")[2]) for r in (out / "logs" / "part-000" / "metrics.csv").read_text().splitlines()[1:]
              if r.split(",")[2]]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))

    model = dlm.load(out)
    task = make_task("sudoku", size=4)
    examples = task.generate("test", 4, seed=0)
    summary = evaluate_task(model.network, model.process, model.tokenizer, task, examples,
                            make_sampler("ancestral", steps=8), batch_size=4, seed=0)
    assert summary["n"] == 4 and 0.0 <= summary["cell_accuracy"] <= 1.0
    canvas = task_canvas(task, examples, model.tokenizer, model.process, torch.Generator().manual_seed(0))
    sampled = make_sampler("ancestral", steps=8).sample(model.network, model.process, canvas,
                                                         torch.Generator().manual_seed(0)).tokens
    kept = ~canvas.to_generate
    assert kept.sum(1).tolist() == [17] * 4 and torch.equal(sampled[kept], canvas.tokens[kept])


def test_a_pair_file_is_split_by_hash_and_a_pair_folder_by_its_files(tmp_path, sudoku4):
    objs = [{"prompt": f"{i}", "response": f"{i * 7}"} for i in range(200)]
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    parts = {s: pair_split(path, s)[0] for s in ("train", "val", "test")}
    keys = {s: {json.dumps(p) for p in v} for s, v in parts.items()}
    assert sum(map(len, keys.values())) == 200 and not (keys["train"] & keys["val"]) and not (keys["val"] & keys["test"])
    assert 2 <= len(parts["val"]) <= 25 and 2 <= len(parts["test"]) <= 25  # ~5 % each
    path.write_text("".join(json.dumps(o) + "\n" for o in reversed(objs)))  # the order of the lines does not matter
    assert {json.dumps(p) for p in pair_split(path, "val")[0]} == keys["val"]
    assert pair_split(sudoku4, "val")[0] == read_pairs(sudoku4 / "validation.jsonl")
    only_train = tmp_path / "only"
    only_train.mkdir()
    (only_train / "train.jsonl").write_text(path.read_text())
    assert {json.dumps(p) for p in pair_split(only_train, "val")[0]} == keys["val"]
    (only_train / "test.jsonl").write_text(path.read_text())
    with pytest.raises(FileNotFoundError, match="holds test.jsonl but no validation.jsonl or val.jsonl"):
        pair_split(only_train, "val")
    with pytest.raises(FileNotFoundError, match="no train.jsonl"):
        pair_split(tmp_path, "train")


def test_block_diffusion_batches_are_padded_to_whole_blocks(sudoku4):
    from dlm.train.data_module import load_pair_rows

    cfg = build_config(["data.format=pairs", f"data.source={sudoku4}", "model.context=36", "process=bd3lm",
                        "process.block_size=4"])
    rows = load_pair_rows(cfg, make_task("sudoku", size=4).tokenizer(), "train")
    batch = rows.collate([0, 1, 2])
    assert batch["input_ids"].shape == (3, 36) and (batch["input_ids"][:, 34:] == 1).all()  # EOS, in the loss
    assert batch["loss_mask"][:, 34:].all() and not batch["given"][:, 17:].any()


def test_pair_errors_name_the_fix(sudoku4, tmp_path, capsys):
    base = [*PAIR_OVERRIDES, "trainer.max_steps=1"]
    assert main(["train", *base, f"data.source={sudoku4}", "data.format=chat", f"trainer.out_dir={tmp_path / 'a'}"]) == 2
    assert "unknown data.format 'chat'" in capsys.readouterr().err
    assert main(["train", *base, f"data.source={sudoku4}", "model.context=20", f"trainer.out_dir={tmp_path / 'b'}"]) == 2
    assert "set model.context to at least the longest pair" in capsys.readouterr().err
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "train.jsonl").write_text((sudoku4 / "train.jsonl").read_text())
    assert main(["train", *base, f"data.source={loose}", "data.tokenizer=task", f"trainer.out_dir={tmp_path / 'c'}"]) == 2
    assert "data.tokenizer=task needs a pair folder written by a task" in capsys.readouterr().err


def test_a_pair_run_stopped_and_resumed_equals_the_uninterrupted_one(sudoku4, tmp_path):
    """Exact resume with pairs: the length-bucketed batch of micro-step k is a function of (seed, k, rank), so a
    run stopped at step 8 and resumed to 12 ends bit-identical to one run straight to 12 (weights, EMA, optimizer,
    losses); with 2 accumulated micro-batches of 4 from 64 pairs, the runs cross an epoch boundary."""
    from dlm.train.run import train
    from tests.train.test_resume import assert_identical_runs

    args = lambda out, *extra: build_config([*PAIR_OVERRIDES, f"data.source={sudoku4}", "trainer.batch_size=4",  # noqa: E731
                                             "trainer.accumulate=2", f"trainer.out_dir={out}", *extra])
    a, b = tmp_path / "A", tmp_path / "B"
    train(args(a, "trainer.max_steps=12"))
    train(args(b, "trainer.max_steps=8"))
    train(args(b, "trainer.max_steps=12"))
    assert_identical_runs(a, b)


CHAT_TEMPLATE = ("{{ bos_token }} {% for m in messages %}{% if m['role'] == 'user' %}w10 {{ m['content'] }} w11 "
                 "{% else %}w12 {{ m['content'] }} w13 {% endif %}{% endfor %}{% if add_generation_prompt %}w12 {% endif %}")


@pytest.fixture(scope="module")
def chat_llada(tmp_path_factory):
    """A tiny LLaDA-layout folder (sharded OLMo-style weights, LLaDA's vocabulary and [MASK] id) whose word-level
    tokenizer has a BOS and a chat template (user turns w10 ... w11, assistant turns w12 ... w13), and 40
    conversations of one user and one assistant turn."""
    from tests.network.checkpoints import LLADA_VOCAB, llada_checkpoint
    from tests.test_open_models import word_tokenizer

    root = tmp_path_factory.mktemp("chat_llada")
    folder = root / "llada"
    torch.manual_seed(0)
    llada_checkpoint(folder)
    word_tokenizer(folder, LLADA_VOCAB, 126336, 126081)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "w126080",
                                                              "chat_template": CHAT_TEMPLATE}))
    rows = [{"messages": [{"role": "user", "content": f"w{20 + i} w{21 + i}"},
                          {"role": "assistant", "content": f"w{70 + i} w{71 + i} w{72 + i}"}]} for i in range(40)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, root / "chat.jsonl"


def test_sft_of_an_open_llada_folder_with_lora_and_its_chat_template(chat_llada, tmp_path, monkeypatch):
    """`dlm train init_from=<LLaDA folder> data.format=pairs trainer.lora_rank=4` on {"messages"} pairs: the rows
    are the chat template's (the template's text and the user turn given, the assistant turn and its end-of-turn
    token scored), only low-rank adapters train in the blocks (the exported weights differ from LLaDA's by a
    rank <= 4 matrix), and the exported model answers `generate(messages=...)` through the same template."""
    import dlm
    from dlm.process.mdlm import MaskedDiffusion

    folder, chat = chat_llada
    seen = []
    loss_at = MaskedDiffusion.loss_at

    def spy(self, network, batch, z, t, inputs_embeds=None):
        seen.append(batch)
        return loss_at(self, network, batch, z, t, inputs_embeds)

    monkeypatch.setattr(MaskedDiffusion, "loss_at", spy)
    out = tmp_path / "sft"
    assert main(["train", f"init_from={folder}", "data.format=pairs", f"data.source={chat}", "trainer.lora_rank=4",
                 "trainer.lora_embeddings=false", "trainer.max_steps=3", "trainer.batch_size=4",
                 "trainer.val_batches=0", "trainer.ema=0", "optim.warmup_steps=0", "optim.lr=1e-2",
                 "trainer.progress=false", f"trainer.out_dir={out}"]) == 0
    assert len(seen) == 3
    bos, user, end_user, assistant, end = 126080, 10, 11, 12, 13
    for batch in seen:
        for ids, given, scored in zip(batch["input_ids"].tolist(), batch["given"].tolist(), batch["loss_mask"].tolist()):
            assert len(ids) == 10 and ids[0] == bos and ids[1] == user and ids[4:6] == [end_user, assistant]
            assert given == [True] * 6 + [False] * 4 and scored == [False] * 6 + [True] * 4
            assert ids[-1] == end and 70 <= ids[6] < 110  # the assistant's words, then its end-of-turn token

    base, tuned = dlm.load(folder), dlm.load(out)
    assert tuned.process.mask_id == 126336 and tuned.tokenizer.chat_template == CHAT_TEMPLATE
    before, after = base.network.state_dict(), tuned.network.state_dict()
    assert before.keys() == after.keys()
    changed = 0
    for name, w in before.items():
        delta = (after[name].float() - w.float())
        if not name.startswith("blocks.") or w.dim() != 2:
            assert torch.equal(after[name], w), name  # embeddings, head and norms frozen (lora_embeddings=false)
            continue
        s = torch.linalg.svdvals(delta)
        changed += bool(s[0] > 1e-4)
        assert s[4:].max() <= 1e-4 * max(float(s[0]), 1e-3), name  # rank <= 4: the merged adapter
    assert changed > 0

    messages = [{"role": "user", "content": "w20 w21"}]
    gen = tuned.generate(messages=messages, gen_length=4, steps=4, seed=0)
    given = gen.tokens[0][~gen.generated[0]].tolist()
    assert given == tuned.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert given[-1] == assistant


def test_an_adapted_causal_lm_fine_tunes_on_pairs_with_lora(causal_folder, tmp_path):
    """init_from=hf:<causal LM folder> (adapted into a diffusion LM, dlm/train/adapt.py) with data.format=pairs and
    LoRA: its own tokenizer (BOS prepended, EOS appended to each pair), the prompt given, trained and exported."""
    import dlm

    folder, _ = causal_folder
    pairs = tmp_path / "pairs.jsonl"
    words = ["the", "and", "of", "to", "that", "in", "he", "shall", "unto", "for", "i", "his", "a", "lord"]
    pairs.write_text("".join(json.dumps({"prompt": f"{words[i % 14]} {words[(i + 3) % 14]}",
                                         "response": f"{words[(i + 5) % 14]} {words[(i + 7) % 14]} {words[i % 5]}"}) + "\n"
                             for i in range(60)))
    out = tmp_path / "adapted"
    assert main(["train", f"init_from=hf:{folder}", "process=mdlm", "data.format=pairs", f"data.source={pairs}",
                 "model.context=16", "trainer.lora_rank=2", "trainer.max_steps=2", "trainer.batch_size=4",
                 "trainer.val_batches=1", "trainer.val_every=2", "trainer.progress=false",
                 f"trainer.out_dir={out}"]) == 0
    from dlm.train.data_module import load_pair_rows

    model = dlm.load(out)
    assert model.cfg.data.format == "pairs" and model.cfg.trainer.lora_rank == 2
    batch = load_pair_rows(model.cfg, model.tokenizer, "train").collate([0])
    ids, given = batch["input_ids"][0].tolist(), batch["given"][0].tolist()
    assert ids[0] == 1 and ids[-1] == 2 and given == [True] * 3 + [False] * (len(ids) - 3)  # <s> w w | w w w <eos>
    assert len(model.generate(["the and"], gen_length=3, steps=3, seed=0).texts) == 1


@pytest.mark.parametrize("name", ["mdlm", "ar"])
def test_eos_padding_is_noised_and_scored_by_the_process(name, tiny_network, tmp_path):
    """A short response padded with EOS to its batch's longest row: the padding is part of the response (LLaDA's
    recipe), attended, counted among the scored tokens, and noised."""
    from dlm.build import build_process
    from dlm.data.pairs import tokenize_pairs

    tok = make_task("sudoku", size=4).tokenizer()
    rows = tokenize_pairs([{"prompt": "12", "response": "3"}, {"prompt": "1", "response": "234123"}], tok)
    batch = rows.collate([0, 1])  # row 0: [BOS] 1 2 | 3 [EOS] + 4 EOS of padding
    assert batch["input_ids"][0].tolist() == [0, 6, 7, 8, 1, 1, 1, 1, 1]
    assert batch["loss_mask"][0].tolist() == [False] * 3 + [True] * 6 and "attention_mask" not in batch
    cfg = build_config([f"process={name}", "model.context=16"])
    cfg.model.vocab_size = len(tok)
    process = build_process(cfg, tok.mask_token_id)
    out = process.loss(tiny_network(len(tok)), batch, torch.Generator().manual_seed(0))
    assert out.tokens_per_row.tolist() == [6, 7] and int(out.num_tokens) == 13
    if name == "mdlm":  # noised: at a high noise level some padding position is masked
        assert any(process.add_noise(batch["input_ids"], torch.full((2,), 0.9), batch["loss_mask"],
                                     torch.Generator().manual_seed(s))[0, 5:].eq(tok.mask_token_id).any() for s in range(5))
