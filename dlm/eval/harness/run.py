"""Running lm-evaluation-harness on a dlm model: `dlm eval MODEL --harness TASKS` and `python -m dlm.eval.harness`.

    from dlm.eval.harness.run import run_harness
    results = run_harness("runs/demo-mdlm", ["dlm_cloze"], {"mc_num": 32}, limit=20)
    print(harness_table(results))
"""

from __future__ import annotations

import json

from dlm.eval.harness import TASKS_DIR, register


def task_manager(defaults: bool = True):
    """lm_eval's TaskManager with dlm's offline tasks (dlm/eval/harness/tasks/) on its include path; defaults:
    lm_eval's own tasks too (indexing their thousands of YAML files takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=defaults)


def check_tasks(manager, tasks: list[str]) -> None:
    """A ValueError naming the unknown task names, dlm's own tasks and how to list the others."""
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        ours = sorted(t for t in known if t.startswith("dlm_"))
        raise ValueError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}. dlm's offline "
                         f"tasks: {', '.join(ours)}; every other task: `python -m dlm.eval.harness ls tasks` (a "
                         "hub task needs its data downloaded beforehand: docs/harness.md)")


def resolve_tasks(tasks: list[str]):
    """The TaskManager for `tasks`: dlm's tasks alone when they are all dlm's (fast), else with lm_eval's own;
    a ValueError for unknown names (a dlm_* name is checked against dlm's tasks without indexing lm_eval's)."""
    ours = task_manager(defaults=False)
    known = set(ours.all_tasks)
    if all(t in known for t in tasks):
        return ours
    check_tasks(ours, [t for t in tasks if t.startswith("dlm_")])
    manager = task_manager()
    check_tasks(manager, tasks)
    return manager


def run_harness(pretrained: str, tasks: list[str], model_args: dict | None = None, limit: int | float | None = None,
                num_fewshot: int | None = None, bootstrap_iters: int = 1000, apply_chat_template: bool = False,
                log_samples: bool = False, model=None) -> dict:
    """lm_eval's `simple_evaluate` of the dlm model at `pretrained` (or `model`, a DiffusionLM) on `tasks`, with
    dlm's offline tasks known; the results dict gains "dlm": the adapter's per-task Monte Carlo errors and NFE."""
    cls = register()
    from lm_eval import simple_evaluate

    manager = resolve_tasks(tasks)
    lm = cls(pretrained=pretrained, model=model, **(model_args or {}))
    seed = lm.seed
    from datasets.exceptions import DatasetNotFoundError

    try:
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  bootstrap_iters=bootstrap_iters, apply_chat_template=apply_chat_template,
                                  log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    except (ConnectionError, DatasetNotFoundError) as e:
        raise ValueError(f"a task's data is not available here ({e}); dlm's offline tasks (dlm_text, dlm_sudoku) "
                         "need none, a hub task needs its dataset in the local datasets cache (docs/harness.md, "
                         "'Any other lm-eval task')") from None
    results["dlm"] = lm.summary()
    return results


def harness_table(results: dict) -> str:
    """lm_eval's results table (with its standard errors over documents), then the adapter's Monte Carlo
    standard errors and NFE per task."""
    from lm_eval.utils import make_table

    lines = [make_table(results)]
    if results.get("groups"):
        lines.append(make_table(results, "groups"))
    rows = results.get("dlm", {})
    if rows:
        lines.append("| task/method | estimator | requests | NFE/request | mean ll ± MC s.e. | token ppl ± MC s.e. | tokens/forward |")
        lines.append("|---|---|---:|---:|---:|---:|---:|")
        for key, r in rows.items():
            ll = f"{r['mean_ll']:.4f} ± {r['mc_stderr_mean_ll']:.4f}" if "mean_ll" in r else ""
            ppl = f"{r['token_ppl']:.3f} ± {r['mc_stderr_token_ppl']:.3f}" if "token_ppl" in r else ""
            tpf = f"{r['tokens_per_forward']:.3f}" if "tokens_per_forward" in r else ""
            lines.append(f"| {key} | {r['estimator']} | {r['requests']} | {r['nfe_per_request']:.1f} | {ll} | {ppl} | {tpf} |")
    return "\n".join(lines)


def write_json(results: dict, path: str) -> None:
    from lm_eval.utils import handle_non_serializable

    results = {k: v for k, v in results.items() if k != "samples"} | (
        {"samples": results["samples"]} if "samples" in results else {})
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
