"""Pair files for SFT: tokenisation, the given / loss masks with LLaDA's EOS padding, chat templates (only assistant
turns scored), errors, and the length-bucketing batch sampler."""

import copy
import json
import random

import pytest
import torch

from dlm.data.pairs import LengthBucketBatchSampler, load_pairs, read_pairs, tokenize_pair
from dlm.tasks import make_task


@pytest.fixture(scope="module")
def tok():
    return make_task("sudoku", size=4).tokenizer()  # [BOS]=0 [EOS]=1 [PAD]=2 [MASK]=3 [UNK]=4 '.'=5 '1'..'9'=6..14


def write(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def test_prompt_response_row(tok):
    ids, resp = tokenize_pair(tok, {"prompt": "1.", "response": "12"})
    assert ids == [0, 6, 5, 6, 7, 1] and resp == [False, False, False, True, True, True]


def test_load_pairs_matches_tokenize_pair(bpe, tmp_path):
    objs = [{"prompt": "And God said", "response": " let there be light."}, {"prompt": "", "response": "x"},
            {"prompt": "Verily, ", "response": ""}]
    ds = load_pairs(write(tmp_path / "p.jsonl", objs), bpe)
    assert ds.rows == [tokenize_pair(bpe, o) for o in objs]


def test_batch_pads_with_eos_inside_the_loss(tok, tmp_path):
    ds = load_pairs(write(tmp_path / "p.jsonl", [{"prompt": "1.", "response": "12"},
                                                 {"prompt": "3", "response": "4123"}]), tok)
    batch = ds.collate([0, 1])
    assert set(batch) == {"input_ids", "loss_mask", "given"}  # every position attended: no attention_mask
    assert batch["input_ids"].tolist() == [[0, 6, 5, 6, 7, 1, 1], [0, 8, 9, 6, 7, 8, 1]]
    assert batch["given"].tolist() == [[True, True, True] + [False] * 4, [True, True] + [False] * 5]
    assert batch["loss_mask"].tolist() == [[False] * 3 + [True] * 4, [False] * 2 + [True] * 5]  # EOS pad scored
    assert not (batch["given"] & batch["loss_mask"]).any()


def test_pad_with_pad_is_not_attended_nor_scored(tok, tmp_path):
    ds = load_pairs(write(tmp_path / "p.jsonl", [{"prompt": "1", "response": "2"}, {"prompt": "1", "response": "234"}]),
                    tok, pad_with="pad")
    batch = ds.collate([0, 1])
    assert batch["input_ids"][0].tolist() == [0, 6, 7, 1, 2, 2]
    assert batch["attention_mask"][0].tolist() == [True] * 4 + [False] * 2
    assert batch["loss_mask"][0].tolist() == [False, False, True, True, False, False]
    assert batch["given"][0].tolist() == [True, True] + [False] * 4


def test_sudoku_pair_files(tok, tmp_path):
    make_task("sudoku", size=4).write_pairs(tmp_path, {"train": 20, "test": 5}, seed=0)
    ds = load_pairs(tmp_path / "train.jsonl", tok)
    batch = ds.collate(list(range(8)))
    assert batch["input_ids"].shape == (8, 34)  # [BOS] + 16 cells + 16 cells + [EOS]
    assert batch["given"].sum(1).tolist() == [17] * 8 and batch["loss_mask"].sum(1).tolist() == [17] * 8
    pair = read_pairs(tmp_path / "train.jsonl")[0]
    assert tok.decode(batch["input_ids"][0, 1:17]) == pair["prompt"]
    assert tok.decode(batch["input_ids"][0, 17:33]) == pair["response"]


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_messages_score_only_assistant_turns(bpe):
    tok = copy.deepcopy(bpe)
    tok.add_tokens(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], special_tokens=True)
    tok.chat_template = TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And God said"},
                {"role": "assistant", "content": "Let there be light"}, {"role": "user", "content": "Then?"},
                {"role": "assistant", "content": "and there was light."}]
    ids, resp = tokenize_pair(tok, {"messages": messages})
    scored = [i for i, r in zip(ids, resp) if r]
    given = [i for i, r in zip(ids, resp) if not r]
    assert tok.decode(scored) == "Let there be light<|end|>and there was light.<|end|>"
    assert tok.decode(given) == "<|system|>Be brief.<|end|><|user|>And God said<|end|><|assistant|><|user|>Then?<|end|><|assistant|>"
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        tokenize_pair(tok, {"messages": messages[:-1]})
    with pytest.raises(ValueError, match="chat template"):
        tokenize_pair(bpe, {"messages": messages})


def test_errors(tok, tmp_path):
    with pytest.raises(ValueError, match=r"p.jsonl:2: a pair line is"):
        read_pairs(write(tmp_path / "p.jsonl", [{"prompt": "1", "response": "2"}, {"text": "x"}]))
    path = write(tmp_path / "q.jsonl", [{"prompt": "1", "response": "2"}, {"prompt": "1", "response": "2341"}])
    with pytest.raises(ValueError, match="1 of 2 pairs .* longer than 5 tokens .* line 2"):
        load_pairs(path, tok, max_length=5)
    assert len(load_pairs(path, tok, max_length=5, drop_long=True)) == 1


def test_length_buckets():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(1003)]
    s = LengthBucketBatchSampler(lengths, batch_size=8, seed=1, bucket=10)
    assert len(s) == s.per_epoch == 125
    batches = list(s)
    rows = [i for b in batches for i in b]
    assert len(rows) == len(set(rows)) == 1000  # an epoch: each row at most once, 3 left out
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 60  # random batches of 8 from 10..500 spread ~380
    again = LengthBucketBatchSampler(lengths, batch_size=8, seed=1, bucket=10, start=40, total=260)
    assert list(again)[:85] == batches[40:]  # resuming at batch 40 gives the same batches
    assert {tuple(again.batch(k)) for k in range(125, 250)} != {tuple(b) for b in batches}  # a new epoch
    other = LengthBucketBatchSampler(lengths, batch_size=8, seed=2, bucket=10)
    assert list(other) != batches
    ranks = [LengthBucketBatchSampler(lengths, batch_size=4, seed=1, bucket=5, rank=r, world=2) for r in (0, 1)]
    for k in range(10):
        a, b = ranks[0].batch(k), ranks[1].batch(k)
        assert len(a) == len(b) == 4 and not set(a) & set(b)
    with pytest.raises(ValueError, match="fewer than one batch"):
        LengthBucketBatchSampler([5, 6], batch_size=4)


def test_dataloader(tok, tmp_path):
    make_task("sudoku", size=4).write_pairs(tmp_path, {"validation": 12}, seed=0)
    ds = load_pairs(tmp_path / "validation.jsonl", tok)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=LengthBucketBatchSampler(ds.lengths, 4, seed=0),
                                         collate_fn=ds.collate)
    shapes = [b["input_ids"].shape for b in loader]
    assert shapes == [(4, 34)] * 3
