"""dlm models in lm-evaluation-harness (issue 24; docs/harness.md).

lm_eval 0.4.13 finds a model by name in its registry, filled by its own module list and by `@register_model` when
a module is imported; it reads no entry-point group, so `lm_eval --model dlm` cannot find dlm by itself.
`register()` puts `DLMHarnessLM` there as "dlm"; `python -m dlm.eval.harness ...` (lm_eval's command line with dlm
registered and dlm's offline tasks on the include path) and `dlm eval --harness TASKS` do it for you.

`estimator.py` holds the maths (no lm_eval import); `model.py` the LM; `tasks/` the offline task YAMLs and
`data.py` the files they read.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"


def register() -> type:
    """Register the adapter in lm_eval's model registry as "dlm" (idempotent); returns the class. Raises
    ModuleNotFoundError naming the fix when lm_eval is not installed."""
    try:
        from lm_eval.api.registry import model_registry
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("lm-evaluation-harness is not installed: pip install 'dlm[eval]' (or "
                                  "pip install lm-eval==0.4.13)") from e
    from dlm.eval.harness.model import DLMHarnessLM

    if model_registry.get("dlm", None) is not DLMHarnessLM:
        model_registry.register("dlm")(DLMHarnessLM)
    return DLMHarnessLM
