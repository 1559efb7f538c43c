"""Sudoku at sizes 4 (2x2 boxes), 6 (2x3 boxes) and 9 (3x3 boxes): the testbed of Kim, Shah et al., "Train for the
Worst, Plan for the Best" (ICML 2025, arXiv 2502.06768), where the order of unmasking decides how many puzzles a
masked diffusion model solves.

A board is a string of size*size characters, row by row: digits 1..size, '.' for an empty cell; one token per
cell. The prompt is the puzzle, the response its unique solution.

Generation (a pure function of size, givens, split, n and seed): a full valid grid from a randomised backtracking
fill, then its cells are emptied in a random order, each removal kept only while an exact solver proves the
solution still unique, until `givens` cells remain (or no further cell can go: the achieved count is in each
example and in task.json). Splits are disjoint by construction: a solution grid belongs to the split that a hash
of it picks (test 10 %, validation 10 %, train 80 %), and a puzzle's unique solution is its grid.

    python -m dlm.tasks.sudoku --size 9 --train 20000 --val 500 --test 500 --seed 0 --out data/sudoku9
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time

from dlm.tasks.base import Task, register_task

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # size -> (box rows, box columns)
DEFAULT_GIVENS = {4: 6, 6: 14, 9: 30}
SPLIT_BUCKETS = {"test": range(0, 10), "validation": range(10, 20), "train": range(20, 100)}  # of sha256 % 100


class Grid:
    """The geometry of one size: for each cell i its row, column and box, and the 3*size units (lists of cells)."""

    def __init__(self, size: int):
        if size not in BOXES:
            raise ValueError(f"sudoku size must be one of {sorted(BOXES)}, got {size}")
        br, bc = BOXES[size]
        self.size, self.cells, self.full = size, size * size, (1 << size) - 1  # full: bit d-1 for each digit d
        self.row = [i // size for i in range(self.cells)]
        self.col = [i % size for i in range(self.cells)]
        self.box = [(r // br) * (size // bc) + c // bc for r, c in zip(self.row, self.col)]
        self.units = ([[i for i in range(self.cells) if self.row[i] == k] for k in range(size)]
                      + [[i for i in range(self.cells) if self.col[i] == k] for k in range(size)]
                      + [[i for i in range(self.cells) if self.box[i] == k] for k in range(size)])


class Solver:
    """Exact bitmask backtracking with the minimum-remaining-values rule. A board is a list of size*size ints
    (0 = empty, else the digit). `count(board, limit)` counts solutions up to `limit`; `first` returns one."""

    def __init__(self, grid: Grid, board: list[int]):
        g = self.g = grid
        self.rows, self.cols, self.boxes = [0] * g.size, [0] * g.size, [0] * g.size
        self.board = list(board)
        self.valid = True
        for i, d in enumerate(board):
            if d:
                bit = 1 << (d - 1)
                if (self.rows[g.row[i]] | self.cols[g.col[i]] | self.boxes[g.box[i]]) & bit:
                    self.valid = False  # the givens already break a rule: no solution
                self._set(i, bit)
        self.empties = [i for i, d in enumerate(board) if not d]
        self.nodes = 0  # cells with more than one candidate branched on (a difficulty measure)
        self.solution: list[int] | None = None

    def _set(self, i: int, bit: int) -> None:
        g = self.g
        self.rows[g.row[i]] ^= bit
        self.cols[g.col[i]] ^= bit
        self.boxes[g.box[i]] ^= bit

    def _search(self, k: int, limit: int, rng: random.Random | None) -> int:
        """Solutions (up to `limit`) with empties[:k] filled; records the first in self.solution."""
        g, empties = self.g, self.empties
        if k == len(empties):
            if self.solution is None:
                self.solution = list(self.board)
            return 1
        rows, cols, boxes, R, C, B = self.rows, self.cols, self.boxes, g.row, g.col, g.box
        best_j, best_m, best_n = k, 0, 99
        for j in range(k, len(empties)):  # the empty cell with the fewest candidates
            i = empties[j]
            m = g.full & ~(rows[R[i]] | cols[C[i]] | boxes[B[i]])
            n = m.bit_count()
            if n < best_n:
                best_j, best_m, best_n = j, m, n
                if n <= 1:
                    break
        if best_n == 0:
            return 0
        empties[k], empties[best_j] = empties[best_j], empties[k]
        i = empties[k]
        bits = [1 << d for d in range(g.size) if best_m >> d & 1]
        if rng is not None:
            rng.shuffle(bits)
        if len(bits) > 1:
            self.nodes += 1
        total = 0
        for bit in bits:
            self._set(i, bit)
            self.board[i] = bit.bit_length()
            total += self._search(k + 1, limit - total, rng)
            self._set(i, bit)
            self.board[i] = 0
            if total >= limit:
                break
        return total

    def count(self, limit: int = 2, rng: random.Random | None = None) -> int:
        """The number of solutions, counting stops at `limit` (2 decides uniqueness)."""
        return self._search(0, limit, rng) if self.valid else 0


def count_solutions(size: int, board: list[int], limit: int = 2) -> int:
    """Solutions of `board` (list of size*size ints, 0 = empty), counted up to `limit`."""
    return Solver(Grid(size), board).count(limit)


def solve(size: int, board: list[int]) -> list[int] | None:
    """One solution of `board`, or None."""
    s = Solver(Grid(size), board)
    return s.solution if s.count(1) else None


def random_grid(grid: Grid, rng: random.Random) -> list[int]:
    """A full valid grid: backtracking fill of the empty board with candidates tried in a random order."""
    s = Solver(grid, [0] * grid.cells)
    s.count(1, rng)
    return s.solution


def make_puzzle(grid: Grid, solution: list[int], givens: int, rng: random.Random) -> list[int]:
    """Empty the cells of `solution` in a random order while the solution stays unique, down to `givens` cells.

    Emptying cell i (digit v) of a board with a unique solution keeps it unique iff no completion puts another
    digit in cell i: one existence search per other candidate of cell i, on one solver state kept across
    removals (cheaper than counting solutions to 2 from scratch)."""
    s = Solver(grid, solution)
    order = list(range(grid.cells))
    rng.shuffle(order)
    left = grid.cells
    for i in order:
        if left <= givens:
            break
        v = s.board[i]
        bit = 1 << (v - 1)
        s._set(i, bit)  # empty cell i
        s.board[i] = 0
        others = grid.full & ~(s.rows[grid.row[i]] | s.cols[grid.col[i]] | s.boxes[grid.box[i]]) & ~bit
        unique = True
        while others and unique:
            other = others & -others
            others ^= other
            s._set(i, other)
            s.board[i] = other.bit_length()
            s.solution = None
            unique = s._search(0, 1, None) == 0
            s._set(i, other)
            s.board[i] = 0
        if unique:
            s.empties.append(i)
            left -= 1
        else:
            s._set(i, bit)  # put the digit back
            s.board[i] = v
    return s.board


def to_string(board: list[int]) -> str:
    return "".join(str(d) if d else "." for d in board)


def from_string(text: str) -> list[int]:
    """A board from its string: digits, '.' (or '0') empty; other characters are an error."""
    out = []
    for ch in text:
        if ch in ".0":
            out.append(0)
        elif ch.isdigit():
            out.append(int(ch))
        else:
            raise ValueError(f"a sudoku board holds digits and '.', got {ch!r} in {text!r}")
    return out


def split_of(solution: str) -> str:
    """The split a solution grid belongs to, from a hash of it (test 10 %, validation 10 %, train 80 %)."""
    bucket = int.from_bytes(hashlib.sha256(solution.encode()).digest()[:8], "big") % 100
    return next(name for name, r in SPLIT_BUCKETS.items() if bucket in r)


@register_task
class Sudoku(Task):
    """Sudoku of `size` 4, 6 or 9 with a target of `givens` given cells (fewer is harder)."""

    name = "sudoku"
    symbols = [".", *"123456789"]  # one vocabulary for every size: ids 5 ('.'), 6..14 (digits 1..9)

    def __init__(self, size: int = 9, givens: int | None = None):
        self.grid = Grid(int(size))
        self.size = int(size)
        self.givens = DEFAULT_GIVENS[self.size] if givens is None else int(givens)
        if not 0 <= self.givens <= self.grid.cells:
            raise ValueError(f"givens must be in 0..{self.grid.cells} for size {size}, got {givens}")

    def options(self) -> dict:
        return {"size": self.size, "givens": self.givens}

    def generate(self, split: str, n: int, seed: int, max_tries: int | None = None) -> list[dict]:
        """`n` distinct puzzles of `split`: {"puzzle", "solution", "givens" (achieved), "nodes" (branchings an
        MRV search needs: 0 = solvable by forced cells alone)}. Gives up with an error after `max_tries` grids
        (default 50 n + 1000), e.g. when a 4x4 split has fewer distinct puzzles than asked."""
        if split not in SPLIT_BUCKETS:
            raise ValueError(f"unknown split {split!r}: use {', '.join(SPLIT_BUCKETS)}")
        rng = random.Random(f"sudoku:{self.size}:{self.givens}:{seed}:{split}")  # str seeds are stable across runs
        max_tries = 50 * n + 1000 if max_tries is None else max_tries
        out, seen, tries = [], set(), 0
        while len(out) < n:
            tries += 1
            if tries > max_tries:
                raise ValueError(f"found only {len(out)} distinct {self.size}x{self.size} {split} puzzles with "
                                 f"{self.givens} givens in {max_tries} tries, {n} asked: ask fewer or use more givens")
            solution = random_grid(self.grid, rng)
            sol = to_string(solution)
            if split_of(sol) != split:
                continue
            puzzle = make_puzzle(self.grid, solution, self.givens, rng)
            text = to_string(puzzle)
            if text in seen:
                continue
            seen.add(text)
            s = Solver(self.grid, puzzle)
            s.count(1)
            out.append({"puzzle": text, "solution": sol, "givens": sum(d > 0 for d in puzzle), "nodes": s.nodes})
        return out

    def format_prompt(self, example: dict) -> str:
        return example["puzzle"]

    def format_response(self, example: dict) -> str:
        return example["solution"]

    def score(self, example: dict, predicted: str) -> dict:
        """Exact metrics of `predicted` (a board string; extra characters after size*size cells are ignored, a
        short or non-digit cell counts as wrong):
          solved         1.0 when every row, column and box holds each digit once and the givens are kept;
          cell_accuracy  fraction of cells equal to the unique solution; blank_accuracy the same over empty cells;
          violations     repeated digits: for each row, column and box, occurrences beyond the first of a digit;
          givens_kept    1.0 when every given cell is unchanged; invalid_cells cells not holding 1..size."""
        g, puzzle, solution = self.grid, example["puzzle"], example["solution"]
        cells = [predicted[i] if i < len(predicted) else "" for i in range(g.cells)]
        digits = [int(c) if c.isdigit() and 1 <= int(c) <= g.size else 0 for c in cells]
        invalid = sum(d == 0 for d in digits)
        violations = 0
        for unit in g.units:
            seen = [d for d in (digits[i] for i in unit) if d]
            violations += len(seen) - len(set(seen))
        givens_kept = all(cells[i] == puzzle[i] for i in range(g.cells) if puzzle[i] != ".")
        correct = [cells[i] == solution[i] for i in range(g.cells)]
        blanks = [i for i in range(g.cells) if puzzle[i] == "."]
        solved = invalid == 0 and violations == 0 and givens_kept
        return {"solved": float(solved), "cell_accuracy": sum(correct) / g.cells,
                "blank_accuracy": sum(correct[i] for i in blanks) / len(blanks) if blanks else 1.0,
                "violations": float(violations), "givens_kept": float(givens_kept), "invalid_cells": float(invalid)}

    def from_pair(self, prompt: str, response: str) -> dict:
        """The example of a pair-file line: the puzzle, its solution, the givens and the solver's branchings."""
        ex = self.from_prompt(prompt, solve_it=False)
        return {**ex, "solution": response}

    def from_prompt(self, prompt: str, solve_it: bool = True) -> dict:
        """An example from a puzzle string alone: its unique solution found by the exact solver (an error when the
        board is not a size x size puzzle, breaks a rule, or has no or several solutions)."""
        prompt = prompt.strip()
        if len(prompt) != self.grid.cells:
            raise ValueError(f"a {self.size}x{self.size} sudoku puzzle has {self.grid.cells} cells (digits and '.', "
                             f"row by row), got {len(prompt)} characters: {prompt!r}")
        board = from_string(prompt)
        if any(d > self.size for d in board):
            raise ValueError(f"a {self.size}x{self.size} sudoku holds digits 1..{self.size}, got {prompt!r}")
        s = Solver(self.grid, board)
        found = s.count(1)  # its branchings (nodes) as generate records them
        ex = {"puzzle": to_string(board), "givens": sum(d > 0 for d in board), "nodes": s.nodes}
        if not solve_it:
            return ex
        if not found or Solver(self.grid, board).count(2) != 1:
            raise ValueError(f"the puzzle {prompt!r} has {'no solution' if not found else 'several solutions'}; "
                             "give one with exactly one")
        return {**ex, "solution": to_string(s.solution)}

    def show(self, example: dict, predicted: str) -> str:
        """The puzzle and the predicted board side by side (a '?' for a missing or non-digit cell)."""
        left = board_text(example["puzzle"], self.size).splitlines()
        right = board_text(predicted, self.size).splitlines()
        width = max(len(line) for line in left)
        head = ["puzzle".ljust(width) + "    answer"]
        return "\n".join(head + [a.ljust(width) + "    " + b for a, b in zip(left, right)])

    def summarize(self, examples: list[dict], scores: list[dict]) -> dict:
        """Mean metrics, and `hardest_solved`: the solved fraction over the quarter of puzzles whose MRV search
        branches most (ties by order), since confidence-ordered decoding is reported to fail on the hard tail."""
        out = super().summarize(examples, scores)
        if scores:
            order = sorted(range(len(examples)), key=lambda i: -examples[i].get("nodes", 0))
            hard = order[:max(1, len(order) // 4)]
            out["hardest_solved"] = sum(scores[i]["solved"] for i in hard) / len(hard)
        return out

    def stats(self, examples: list[dict]) -> dict:
        """How many puzzles, and the givens achieved (min, mean, max) against the target."""
        givens = [ex["givens"] for ex in examples] or [0]
        return {"n": len(examples), "target_givens": self.givens, "givens_min": min(givens),
                "givens_mean": round(sum(givens) / len(givens), 3), "givens_max": max(givens),
                "nodes_mean": round(sum(ex["nodes"] for ex in examples) / max(len(examples), 1), 3)}


def board_text(board: str, size: int) -> str:
    """A board string as a grid of lines, boxes separated (for printing)."""
    br, bc = BOXES[size]
    lines = []
    for r in range(size):
        if r and r % br == 0:
            lines.append("-" * (2 * size + 2 * (size // bc - 1) - 1))
        row = board[r * size:(r + 1) * size].ljust(size, "?")
        lines.append(" | ".join(" ".join(row[c:c + bc]) for c in range(0, size, bc)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlm.tasks.sudoku",
                                description="Write Sudoku pair files: train/validation/test.jsonl and task.json.")
    p.add_argument("--size", type=int, default=9, choices=sorted(BOXES), help="board size (default 9)")
    p.add_argument("--givens", type=int, default=None,
                   help=f"target number of given cells (default {DEFAULT_GIVENS}); fewer is harder")
    p.add_argument("--train", type=int, default=20000, help="training puzzles (default 20000)")
    p.add_argument("--val", type=int, default=500, help="validation puzzles (default 500)")
    p.add_argument("--test", type=int, default=500, help="test puzzles (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    try:
        task = Sudoku(args.size, args.givens)
        t0 = time.perf_counter()
        folder = task.write_pairs(args.out, {"train": args.train, "validation": args.val, "test": args.test},
                                  args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder} ({args.train + args.val + args.test} puzzles, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
