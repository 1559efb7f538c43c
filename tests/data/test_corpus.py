import json

import pytest

from dlm.data import Document, embedded_group, load_texts, split_documents
from dlm.data import corpus as corpus_mod


def test_embedded_corpus_has_three_sources(corpus):
    counts = {s: sum(d.source == s for d in corpus) for s in ("shakespeare", "kjv", "web")}
    assert counts == {"shakespeare": 42, "kjv": 66, "web": 66}
    ids = [d.id for d in corpus]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(d.text.strip() and d.title for d in corpus)
    assert sum(len(d.text) for d in corpus) > 12_000_000


def test_embedded_corpus_is_clean_prose(corpus):
    by_id = {d.id: d for d in corpus}
    assert "To be, or not to be" in by_id["shakespeare/hamlet"].text
    # Verse lines are kept as lines.
    assert "From fairest creatures we desire increase,\nThat thereby" in by_id["shakespeare/sonnets"].text
    assert by_id["kjv/genesis"].text.startswith("Genesis\n\nChapter 1\n\nIn the beginning God created the heaven")
    # The WEB module glues "God" and "created" around a footnote: the space must be back.
    assert by_id["web/genesis"].text.startswith("Genesis\n\nChapter 1\n\nIn the beginning, God created the heavens")
    for d in corpus:
        assert "<" not in d.text and "\x00" not in d.text and "\r" not in d.text
        assert "gutenberg" not in d.text.lower()
    assert "Glossary" not in by_id["web/revelation"].text


def test_corrupt_embedded_corpus_is_reported(tmp_path, monkeypatch):
    good = corpus_mod.embedded_corpus_path().read_bytes()
    bad = tmp_path / "corpus.jsonl.gz"
    bad.write_bytes(good[: len(good) // 2])  # truncated download / checkout
    monkeypatch.setattr(corpus_mod, "embedded_corpus_path", lambda: bad)
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        corpus_mod.load_embedded_corpus()


def test_split_is_deterministic_disjoint_and_complete(corpus):
    a = split_documents(corpus, group=embedded_group)
    b = split_documents(list(corpus), group=embedded_group)
    assert {k: [d.id for d in v] for k, v in a.items()} == {k: [d.id for d in v] for k, v in b.items()}
    ids = {k: {d.id for d in v} for k, v in a.items()}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert ids["train"] | ids["val"] | ids["test"] == {d.id for d in corpus}
    assert ids["val"] and ids["test"] and len(ids["train"]) > 0.8 * len(corpus)


def test_both_translations_of_a_book_share_a_split(corpus):
    split_of = {d.id: s for s, docs in split_documents(corpus, group=embedded_group).items() for d in docs}
    for d in corpus:
        if d.source == "kjv":
            assert split_of[d.id] == split_of["web/" + d.id.split("/", 1)[1]]


def test_adding_documents_does_not_move_others():
    docs = [Document(f"doc{i}", "t", "", "x") for i in range(200)]
    before = {d.id: s for s, v in split_documents(docs).items() for d in v}
    more = docs + [Document(f"new{i}", "t", "", "x") for i in range(50)]
    after = {d.id: s for s, v in split_documents(more).items() for d in v}
    assert all(after[k] == s for k, s in before.items())


def test_small_sets_get_val_and_test():
    docs = [Document(f"d{i}", "t", "", "x") for i in range(3)]
    parts = split_documents(docs)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [1, 1, 1]
    two = split_documents(docs[:2])  # too few for the guarantee: the hash alone decides
    assert sorted(d.id for v in two.values() for d in v) == ["d0", "d1"]


def test_load_texts_embedded_splits(corpus):
    texts = {s: load_texts("embedded", s) for s in ("train", "val", "test")}
    assert sum(len(t) for t in texts.values()) == len(corpus)
    assert not set(texts["train"]) & set(texts["val"])
    assert load_texts("embedded", "val") == texts["val"]
    with pytest.raises(ValueError, match="unknown split"):
        load_texts("embedded", "validation")


def test_single_text_file_is_split_by_lines(tmp_path):
    path = tmp_path / "book.txt"
    text = "".join(f"line {i}\n" for i in range(100))
    path.write_text(text)
    parts = [load_texts(str(path), s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [1, 1, 1]
    assert "".join(p[0] for p in parts) == text
    assert parts[1][0] == "".join(f"line {i}\n" for i in range(90, 95))
    one_line = tmp_path / "text8.txt"  # one long line: split by words
    one_line.write_text(" ".join(f"w{i}" for i in range(1000)))
    parts = [load_texts(str(one_line), s) for s in ("train", "val", "test")]
    assert "".join(p[0] for p in parts) == one_line.read_text()
    assert parts[2][0] == " ".join(f"w{i}" for i in range(950, 1000))
    (tmp_path / "tiny.txt").write_text("two words")
    with pytest.raises(ValueError, match="too short to split"):
        load_texts(str(tmp_path / "tiny.txt"), "val")
    no_spaces = tmp_path / "zh.txt"  # one line without spaces: split into runs of characters
    no_spaces.write_text("起初神创造天地。" * 1000)
    parts = [load_texts(str(no_spaces), s) for s in ("train", "val", "test")]
    assert "".join(p[0] for p in parts) == no_spaces.read_text() and all(p[0] for p in parts)


def test_a_hub_name_without_the_prefix_that_looks_like_a_path_gets_a_hint():
    with pytest.raises(FileNotFoundError, match="write hf:someone/some_dataset"):
        load_texts("someone/some_dataset:config")


def test_folder_of_documents(tmp_path):
    for i in range(30):
        sub = tmp_path / ("a" if i % 2 else "b") / f"{i:02d}.{'md' if i % 3 == 0 else 'txt'}"
        sub.parent.mkdir(exist_ok=True)
        sub.write_text(f"document {i}\n")
    (tmp_path / "skip.py").write_text("not text")
    (tmp_path / "empty.txt").write_text("  \n")
    parts = {s: load_texts(str(tmp_path), s) for s in ("train", "val", "test")}
    everything = sorted(t for p in parts.values() for t in p)
    assert everything == sorted(f"document {i}\n" for i in range(30))
    assert parts["val"] and parts["test"]


def test_jsonl_file(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"body": f"text number {i}", "n": i} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    texts = [t for s in ("train", "val", "test") for t in load_texts(str(path), s, text_field="body")]
    assert sorted(texts) == sorted(r["body"] for r in rows)
    as_list = tmp_path / "data.json"
    as_list.write_text(json.dumps(rows))
    assert load_texts(str(as_list), "train", text_field="body") == load_texts(str(path), "train", text_field="body")


def test_error_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_texts(str(tmp_path / "nope.txt"))


def test_error_empty_file_and_folder(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text found in"):
        load_texts(str(tmp_path / "empty.txt"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "other.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"no text found in folder .*\*\.txt"):
        load_texts(str(tmp_path / "folder"))


def test_error_jsonl_line_without_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "wrong field"}\n')
    with pytest.raises(ValueError, match=r"line 2 has no field 'text' \(it has: content\); pass text_field"):
        load_texts(str(path))
    path.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_texts(str(path))


def test_error_unknown_dataset():
    with pytest.raises(ValueError, match="could not load Hugging Face dataset 'no_such_dataset_xyz'"):
        load_texts("no_such_dataset_xyz")


def test_hf_dataset_from_local_files(tmp_path):
    rows = [{"text": f"row {i} " * 5, "label": i} for i in range(40)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parts = {s: load_texts(f"hf:json:{path}", s) for s in ("train", "val", "test")}
    assert sorted(t for p in parts.values() for t in p) == sorted(r["text"] for r in rows)
    assert parts["val"] and parts["test"]
    # The same documents split the same way whether read directly or through `datasets`.
    assert sorted(parts["val"]) == sorted(load_texts(str(path), "val"))
    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "".join(f"sentence {i},{i}\n" for i in range(10)))
    assert len(load_texts(f"hf:csv:{csv}", "train")) >= 7
    with pytest.raises(ValueError, match="no column 'body'"):
        load_texts(f"hf:json:{path}", text_field="body")
    with pytest.raises(ValueError, match="does not exist"):
        load_texts(f"hf:json:{tmp_path / 'missing.jsonl'}")


def test_hf_dataset_saved_to_disk_maps_val_to_validation(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a train text", "another"]}),
        "validation": datasets.Dataset.from_dict({"text": ["a validation text"]}),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    assert load_texts(str(tmp_path / "ds"), "val") == ["a validation text"]
    assert load_texts(str(tmp_path / "ds"), "train") == ["a train text", "another"]
    with pytest.raises(ValueError, match="has no 'test' split"):
        load_texts(str(tmp_path / "ds"), "test")
