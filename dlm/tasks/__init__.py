"""Tasks with exact answers: seeded generators of prompt -> response examples, a tiny fixed vocabulary, and exact
metrics (no evaluator LM). A task writes pair files (`write_pairs`) that supervised fine-tuning reads
(`dlm.data.pairs`); `score` grades a model's response.

    from dlm.tasks import make_task
    task = make_task("sudoku", size=9, givens=30)
    task.write_pairs("data/sudoku9", {"train": 20000, "validation": 500, "test": 500}, seed=0)

A new task is one module of this package that subclasses `Task` and decorates it with `@register_task`.
"""

from __future__ import annotations

from dlm.tasks.base import TASKS, Task, register_task

_LOADED = False


def _load_all() -> None:
    """Import every task module of this package once, so each registers itself."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        import importlib
        import pkgutil

        for info in pkgutil.iter_modules(__path__):
            if info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")


def task_names() -> list[str]:
    """The names of the registered tasks, sorted."""
    _load_all()
    return sorted(TASKS)


def make_task(name: str, **options) -> Task:
    """The registered task `name` built with its options (e.g. size=9, givens=30 for sudoku)."""
    _load_all()
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: the registered tasks are {', '.join(sorted(TASKS))}")
    return TASKS[name](**options)


__all__ = ["TASKS", "Task", "make_task", "register_task", "task_names", "task_of_folder"]


def task_of_folder(folder) -> Task | None:
    """The task that wrote a pair folder, rebuilt from its `task.json` (name and options); None without one."""
    import json
    from pathlib import Path

    meta = Path(folder).expanduser() / "task.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    return make_task(info["name"], **info.get("options", {}))
