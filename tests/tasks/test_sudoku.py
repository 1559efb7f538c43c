"""Sudoku: the solver against brute force, unique solutions, disjoint and deterministic splits, exact metrics, the
tokenizer, pair files and the command."""

import itertools
import json
import random

import pytest

from dlm.data import load_tokenizer
from dlm.tasks import make_task, task_names
from dlm.tasks.sudoku import (Grid, Sudoku, count_solutions, from_string, main, solve, split_of, to_string)


def all_grids_4x4() -> list[list[int]]:
    """Every valid 4x4 grid by exhaustive enumeration of rows (permutations of 1..4; a row is skipped when it
    repeats a digit of a column above), independent of the solver."""
    g = Grid(4)
    perms = list(itertools.permutations(range(1, 5)))
    out = []

    def extend(rows):
        if len(rows) == 4:
            board = [d for row in rows for d in row]
            if all(len({board[i] for i in unit}) == 4 for unit in g.units):
                out.append(board)
            return
        for p in perms:
            if all(p[c] != r[c] for r in rows for c in range(4)):
                extend(rows + [p])

    extend([])
    return out


@pytest.fixture(scope="module")
def grids4():
    return all_grids_4x4()


def test_brute_force_finds_the_288_grids(grids4):
    assert len(grids4) == 288  # the known number of 4x4 Sudoku grids


def test_solver_counts_match_brute_force_4x4(grids4):
    rng = random.Random(0)
    counts = []
    for _ in range(300):
        board = list(rng.choice(grids4))
        for i in rng.sample(range(16), rng.randint(4, 14)):
            board[i] = 0
        if rng.random() < 0.2:  # some boards with a wrong given: 0 solutions or other ones
            board[rng.randrange(16)] = rng.randint(1, 4)
        expected = sum(all(b == 0 or b == s for b, s in zip(board, grid)) for grid in grids4)
        assert count_solutions(4, board, limit=1000) == expected, to_string(board)
        assert count_solutions(4, board, limit=2) == min(expected, 2)
        counts.append(expected)
    assert {0, 1}.issubset(counts) and max(counts) > 2  # the check saw every case


@pytest.mark.parametrize("size,givens", [(4, 5), (6, 12), (9, 30)])
def test_generated_puzzles_have_a_unique_solution(size, givens):
    task = Sudoku(size, givens)
    examples = task.generate("validation", 8 if size == 9 else 30, seed=1)
    for ex in examples:
        puzzle = from_string(ex["puzzle"])
        assert len(puzzle) == size * size and ex["givens"] == sum(d > 0 for d in puzzle) == givens
        assert count_solutions(size, puzzle, limit=2) == 1
        assert to_string(solve(size, puzzle)) == ex["solution"]
        assert task.score(ex, ex["solution"])["solved"] == 1.0


def test_few_givens_reports_the_achieved_count():
    ex = Sudoku(4, givens=0).generate("train", 20, seed=0)  # 4 is the fewest a 4x4 puzzle can have
    assert all(4 <= e["givens"] <= 8 for e in ex) and min(e["givens"] for e in ex) < 8
    assert all(count_solutions(4, from_string(e["puzzle"])) == 1 for e in ex)


def test_splits_are_disjoint_by_puzzle_and_solution():
    task = Sudoku(4, 6)
    splits = task.generate_splits({"train": 400, "validation": 40, "test": 40}, seed=0)
    for split, exs in splits.items():
        assert len({e["puzzle"] for e in exs}) == len(exs)  # distinct within a split
        assert all(split_of(e["solution"]) == split for e in exs)
    for a, b in itertools.combinations(splits, 2):
        assert not {e["puzzle"] for e in splits[a]} & {e["puzzle"] for e in splits[b]}
        assert not {e["solution"] for e in splits[a]} & {e["solution"] for e in splits[b]}


def test_generation_is_deterministic():
    task = Sudoku(6, 14)
    a = task.generate("train", 20, seed=3)
    assert a == Sudoku(6, 14).generate("train", 20, seed=3)
    assert a[:10] == task.generate("train", 10, seed=3)  # a prefix does not depend on n
    other = task.generate("train", 20, seed=4)
    assert not {e["puzzle"] for e in a} & {e["puzzle"] for e in other}


SOLVED = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


def test_metrics_on_hand_made_boards():
    puzzle = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
    task, ex = Sudoku(9), {"puzzle": puzzle, "solution": SOLVED}
    m = task.score(ex, SOLVED)
    assert m == {"solved": 1.0, "cell_accuracy": 1.0, "blank_accuracy": 1.0, "violations": 0.0,
                 "givens_kept": 1.0, "invalid_cells": 0.0}
    # Cells 2 and 3 (blank, same row, boxes 0 and 1) swapped: columns 2 and 3 and boxes 0 and 1 each hold a
    # digit twice; the row is still fine.
    swapped = SOLVED[:2] + SOLVED[3] + SOLVED[2] + SOLVED[4:]
    m = task.score(ex, swapped)
    assert m["solved"] == 0.0 and m["violations"] == 4.0 and m["givens_kept"] == 1.0
    assert m["cell_accuracy"] == 79 / 81 and m["blank_accuracy"] == (51 - 2) / 51
    # A valid grid (digits 1 and 2 relabelled) that changes givens: no violation, not solved.
    relabel = SOLVED.translate(str.maketrans("12", "21"))
    m = task.score(ex, relabel)
    assert m["violations"] == 0.0 and m["givens_kept"] == 0.0 and m["solved"] == 0.0
    # Short and non-digit predictions count as wrong cells.
    m = task.score(ex, SOLVED[:80])
    assert m["invalid_cells"] == 1.0 and m["solved"] == 0.0 and m["cell_accuracy"] == 80 / 81
    assert task.score(ex, SOLVED + "[EOS]")["solved"] == 1.0  # characters after the board are ignored


def test_score_generated_ids():
    task = Sudoku(4)
    tok = task.tokenizer()
    ex = task.generate("test", 4, seed=0)
    ids = tok.encode(ex[0]["solution"], add_special_tokens=False)
    assert task.response_text(ids + [tok.eos_token_id, 6, 6], tok) == ex[0]["solution"]  # cut at the first EOS
    assert task.score_ids(ex[0], ids + [tok.eos_token_id], tok)["solved"] == 1.0
    masked = [tok.mask_token_id] + ids[1:]
    assert task.response_text(masked, tok) == "?" + ex[0]["solution"][1:]  # one character per token
    m = task.score_ids(ex[0], masked, tok)
    assert m["solved"] == 0.0 and m["invalid_cells"] == 1.0 and m["cell_accuracy"] == 15 / 16
    scores = [task.score(e, e["solution"] if i % 2 else e["puzzle"]) for i, e in enumerate(ex)]
    summary = task.summarize(ex, scores)
    assert summary["solved"] == 0.5 and 0.0 <= summary["hardest_solved"] <= 1.0


def test_tokenizer_round_trip_and_save(tmp_path):
    task = make_task("sudoku", size=9)
    tok = task.tokenizer()
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == task.vocabulary
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id, tok.unk_token_id) == (0, 1, 2, 3, 4)
    puzzle = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
    ids = tok.encode(puzzle, add_special_tokens=False)
    assert len(ids) == 81 and ids[:4] == [10, 8, 5, 5]
    assert tok.decode(ids) == puzzle
    assert tok.encode("1 x", add_special_tokens=False) == [6, 4, 4]  # unknown characters, a space too: [UNK]
    assert tok.encode("[MASK]12", add_special_tokens=False) == [3, 6, 7]
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again.encode(puzzle, add_special_tokens=False) == ids and again.decode(ids) == puzzle
    assert again.mask_token_id == 3


def test_registry():
    assert "sudoku" in task_names()
    assert make_task("sudoku", size=4).options() == {"size": 4, "givens": 6}
    with pytest.raises(ValueError, match="registered tasks are"):
        make_task("nope")
    with pytest.raises(ValueError, match="size must be one of"):
        make_task("sudoku", size=5)


def test_command_writes_pair_files(tmp_path, capsys):
    out = tmp_path / "s4"
    assert main(["--size", "4", "--train", "50", "--val", "10", "--test", "10", "--seed", "0", "--out", str(out)]) == 0
    meta = json.loads((out / "task.json").read_text())
    assert meta["name"] == "sudoku" and meta["options"] == {"size": 4, "givens": 6} and meta["seed"] == 0
    assert meta["vocabulary"][:5] == ["[BOS]", "[EOS]", "[PAD]", "[MASK]", "[UNK]"]
    assert meta["stats"]["test"]["givens_min"] == 6
    rows = {s: [json.loads(line) for line in open(out / f"{s}.jsonl")] for s in ("train", "validation", "test")}
    assert [len(r) for r in rows.values()] == [50, 10, 10]
    first = rows["train"][0]
    assert set(first) == {"prompt", "response"} and len(first["prompt"]) == len(first["response"]) == 16
    assert main(["--size", "4", "--givens", "99", "--out", str(tmp_path / "bad")]) == 2
    assert "givens must be in 0..16" in capsys.readouterr().err


def test_board_text():
    from dlm.tasks.sudoku import board_text

    assert board_text("12..34..........", 4).splitlines() == ["1 2 | . .", "3 4 | . .", "-" * 9, ". . | . .", ". . | . ."]
    lines = board_text(SOLVED, 9).splitlines()
    assert len(lines) == 11 and lines[0] == "5 3 4 | 6 7 8 | 9 1 2" and lines[3] == "-" * 21
    assert board_text("12", 4).splitlines()[0] == "1 2 | ? ?"  # a short board shows '?' cells


@pytest.mark.parametrize("size", [4, 9])
def test_examples_read_back_from_pairs_and_from_a_puzzle_alone(size):
    """from_pair inverts write_pairs' lines; from_prompt finds the unique solution with the solver; both record the
    givens and the branchings as generate does."""
    task = make_task("sudoku", size=size)
    for ex in task.generate("test", 3, seed=0):
        assert task.from_pair(task.format_prompt(ex), task.format_response(ex)) == ex
        assert task.from_prompt(ex["puzzle"]) == ex
    with pytest.raises(ValueError, match="has 16 cells"):
        make_task("sudoku", size=4).from_prompt("12")
    with pytest.raises(ValueError, match="several solutions"):
        make_task("sudoku", size=4).from_prompt("." * 16)
    with pytest.raises(ValueError, match="no solution"):
        make_task("sudoku", size=4).from_prompt("11" + "." * 14)  # breaks a rule
    with pytest.raises(ValueError, match="holds digits 1..4"):
        make_task("sudoku", size=4).from_prompt("5" + "." * 15)


def test_show_puts_the_answer_beside_the_puzzle():
    task = make_task("sudoku", size=4)
    lines = task.show({"puzzle": "12..34.........."}, "1234341221434321").splitlines()
    assert lines == ["puzzle       answer", "1 2 | . .    1 2 | 3 4", "3 4 | . .    3 4 | 1 2", "-" * 9 + "    " + "-" * 9,
                     ". . | . .    2 1 | 4 3", ". . | . .    4 3 | 2 1"]
