"""Speed of the Sudoku generator (dlm.tasks.sudoku): puzzles with a unique solution per second, by size and
target number of givens, one process.

    python bench/sudoku_generation.py                          # 9x9 at 30 givens, 10,000 training puzzles
    python bench/sudoku_generation.py --sizes 4 6 9 --n 2000 --givens 0   # the fewest givens each size reaches

Columns: size, target givens, puzzles, seconds, ms per puzzle, the givens achieved (min / mean / max), and the mean
number of branchings the solver's MRV search needs per puzzle (0 = every cell forced; higher is harder).
"""

from __future__ import annotations

import argparse
import time

from dlm.tasks.sudoku import DEFAULT_GIVENS, Sudoku


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[9])
    p.add_argument("--n", type=int, default=10_000, help="training puzzles per size")
    p.add_argument("--givens", type=int, default=None, help="target givens (default: the task's per size)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print("| size | target givens | puzzles | seconds | ms / puzzle | givens min / mean / max | branchings (mean) |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        task = Sudoku(size, DEFAULT_GIVENS[size] if args.givens is None else args.givens)
        t0 = time.perf_counter()
        examples = task.generate("train", args.n, args.seed)
        dt = time.perf_counter() - t0
        s = task.stats(examples)
        print(f"| {size} | {task.givens} | {args.n:,} | {dt:.1f} | {1000 * dt / args.n:.2f} | "
              f"{s['givens_min']} / {s['givens_mean']} / {s['givens_max']} | {s['nodes_mean']} |", flush=True)


if __name__ == "__main__":
    main()
