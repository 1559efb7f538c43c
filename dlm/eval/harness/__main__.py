"""`python -m dlm.eval.harness ...`: lm-evaluation-harness's own command line with dlm's model registered as
"dlm" and dlm's offline tasks on the include path; `python -m dlm.eval.harness data [--out DIR] [--force]` writes
the offline tasks' files.

    python -m dlm.eval.harness --model dlm --model_args pretrained=runs/demo-mdlm,mc_num=128 --tasks dlm_cloze
    python -m dlm.eval.harness ls tasks
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["data"]:
        from dlm.eval.harness.data import write_task_data

        p = argparse.ArgumentParser(prog="python -m dlm.eval.harness data",
                                    description="write the files of dlm's offline lm-eval tasks")
        p.add_argument("--out", default=None, help="folder (default: $DLM_HARNESS_DATA, else ~/.cache/dlm/harness; "
                                                   "the tasks read that folder)")
        p.add_argument("--force", action="store_true", help="rewrite files that exist")
        args = p.parse_args(argv[1:])
        for name, path in write_task_data(args.out, args.force).items():
            print(f"{name}: {path}")
        return 0
    try:
        from dlm.eval.harness import TASKS_DIR, register

        register()
    except ModuleNotFoundError as e:
        print(f"dlm.eval.harness: error: {e}", file=sys.stderr)
        return 2
    import logging

    from lm_eval.__main__ import cli_evaluate

    log = logging.getLogger("dlm.harness")  # the per-task Monte Carlo errors and NFE, after every method call
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [dlm.harness] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False

    if not any(a.startswith("--include_path") for a in argv) and len(argv) > 1:
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
