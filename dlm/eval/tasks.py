"""Evaluate a model on a task with exact answers (dlm.tasks): sample the responses of test prompts with any
sampler and score them exactly (for Sudoku: puzzles solved, cell accuracy, rule violations), with NFE and speed.

    from dlm.eval.tasks import evaluate_task
    summary = evaluate_task(network, process, tokenizer, make_task("sudoku", size=4), examples,
                            make_sampler("llada", steps=16), batch_size=64, seed=0)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dlm.sampler import Canvas, Sampler


def task_canvas(task, examples: list[dict], tokenizer, process, generator: torch.Generator | None = None) -> Canvas:
    """The canvas of a batch of examples, laid out as the SFT rows of dlm.data.pairs: [BOS] prompt (given), then
    the reference response's length plus one EOS slot to generate (the process's prior there). Exact for
    fixed-length answers such as Sudoku's; every row must have the same layout length. (B, L) with
    L = 1 + prompt + response + 1."""
    rows, starts = [], []
    for ex in examples:
        prompt = tokenizer.encode(task.format_prompt(ex), add_special_tokens=False)
        response = tokenizer.encode(task.format_response(ex), add_special_tokens=False)
        rows.append([tokenizer.bos_token_id] + prompt + [tokenizer.eos_token_id] * (len(response) + 1))
        starts.append(1 + len(prompt))
    if len({len(r) for r in rows}) != 1:
        raise ValueError("task_canvas needs examples whose prompt and response lengths are the same in a batch "
                         "(fixed-length answers); batch examples of equal lengths together")
    tokens = torch.tensor(rows, dtype=torch.long)  # (B, L)
    fixed = torch.arange(tokens.shape[1])[None, :] < torch.tensor(starts)[:, None]  # (B, L) prompt positions
    return Canvas.from_fixed(tokens, fixed, process, generator)


@torch.no_grad()
def evaluate_task(network, process, tokenizer, task, examples: list[dict], sampler, batch_size: int = 64,
                  seed: int = 0, device=None) -> dict:
    """Sample a response for every example and score it: the task's summary (mean metrics, e.g. `solved`), plus
    `nfe` (mean network calls per example: each row's calls), `seconds`, `tokens_per_second` (generated
    positions per second), `n`, and `scores` (one dict per example) and `responses` (the strings scored)."""
    generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    scores, responses, calls, generated = [], [], 0, 0
    t0 = time.perf_counter()
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        canvas = task_canvas(task, batch, tokenizer, process, generator)
        if device is not None:
            canvas = Canvas(canvas.tokens.to(device), canvas.to_generate.to(device))
        out = sampler.sample(network, process, canvas, generator)
        calls += int(out.nfe_per_row.sum())
        generated += int(canvas.to_generate.sum())
        for ex, tokens, gen in zip(batch, out.tokens.cpu(), canvas.to_generate.cpu()):
            ids = tokens[gen].tolist()  # the generated positions, in order
            responses.append(task.response_text(ids, tokenizer))
            scores.append(task.score(ex, responses[-1]))
    seconds = time.perf_counter() - t0
    summary = task.summarize(examples, scores)
    summary.update(n=len(examples), nfe=calls / max(len(examples), 1), seconds=seconds,
                   tokens_per_second=generated / seconds if seconds > 0 else float("inf"),
                   scores=scores, responses=responses)
    return summary


# ---------------------------------------------------------------------------------------- a DiffusionLM on a task
SPLIT_NAMES = {"val": "validation", "valid": "validation"}


def read_task_folder(folder) -> tuple:
    """(task, task.json's dict) of a folder written by a task (`python -m dlm.tasks.sudoku --out FOLDER`)."""
    from dlm.tasks import make_task

    path = Path(folder) / "task.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a task folder (no task.json): give a folder written by "
                                "`python -m dlm.tasks.sudoku --out FOLDER`, or --task-data generate")
    meta = json.loads(path.read_text())
    return make_task(meta["name"], **meta.get("options", {})), meta


def task_folder_of(model) -> str | None:
    """The model's training data folder when it is a task folder (holds task.json), else None."""
    source = getattr(getattr(model, "cfg", None), "data", None)
    source = getattr(source, "source", "") or ""
    return source if source and (Path(source) / "task.json").is_file() else None


def task_examples(name: str, model=None, data: str | None = None, split: str = "test", limit: int | None = None,
                  seed: int | None = None, options: dict | None = None) -> tuple:
    """(task, examples, source): the examples of task `name` to evaluate a model on, from
    - `data`, a task folder: its `{split}.jsonl` (the first `limit` lines), the task built from its task.json;
    - else the model's training data folder when it is a task folder (the same);
    - else (or data="generate") fresh examples from the task's generator: `limit` (default 100) of `split` with
      `seed` (default: the model's task folder's seed, else 0), the task built with `options` over the task
      folder's options (if any).
    `source` says which, in words. A folder of another task, or options or a seed given with a folder, are errors."""
    from dlm.tasks import make_task

    split = SPLIT_NAMES.get(split, split)
    folder = data if data not in (None, "generate") else None
    own = task_folder_of(model) if model is not None else None
    if folder is None and data is None and not options and seed is None:
        folder = own
    if folder is not None:
        if options or seed is not None:
            raise ValueError("--task-option and --task-seed set generated examples; examples read from a task folder "
                             f"({folder}) are that folder's (give --task-data generate to generate them)")
        task, meta = read_task_folder(folder)
        if task.name != name:
            raise ValueError(f"{folder} holds the task {task.name!r}, not {name!r}")
        path = Path(folder) / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {split} split ({path.name}); its splits: "
                                    f"{', '.join(sorted(meta.get('sizes', {}))) or 'none'}")
        examples = []
        with open(path) as f:
            for line in f:
                if limit is not None and len(examples) >= limit:
                    break
                if line.strip():
                    pair = json.loads(line)
                    examples.append(task.from_pair(pair["prompt"], pair["response"]))
        return task, examples, f"{len(examples)} {split} examples from {path}"
    base_options, base_seed = {}, 0
    if own is not None:  # generate the run's own task, with other options or another seed
        own_task, meta = read_task_folder(own)
        if own_task.name == name:
            base_options, base_seed = dict(meta.get("options", {})), meta.get("seed", 0)
    task = make_task(name, **{**base_options, **(options or {})})
    seed = base_seed if seed is None else seed
    n = 100 if limit is None else limit
    examples = task.generate(split, n, seed)
    described = ", ".join(f"{k}={v}" for k, v in task.options().items())
    return task, examples, f"{n} {split} examples generated by {name} ({described}), seed {seed}"


def check_task_tokenizer(tokenizer, task) -> None:
    """An error unless `tokenizer` is the task's own (the same tokens at the same ids, the same special tokens)."""
    want = task.tokenizer()
    same = tokenizer.get_vocab() == want.get_vocab() and all(
        getattr(tokenizer, k, None) == getattr(want, k) for k in ("bos_token", "eos_token", "mask_token"))
    if not same:
        raise ValueError(f"this model's tokenizer ({len(tokenizer)} tokens) is not the {task.name} task's "
                         f"({len(want)} tokens, one per character: {' '.join(task.vocabulary)}); evaluate a model "
                         "trained on the task's pair files (data.format=pairs, data.source=the task folder)")


def evaluate_model(model, task, examples: list[dict], *, seed: int = 0, batch_size: int = 64,
                   progress: bool | str = False, **generate_kw) -> dict:
    """`evaluate_task` for a DiffusionLM (dlm.load): each example's response sampled through `model.generate`
    (so any sampler, its options, soft-masking and autocast work as there: sampler=, steps=, remasking=,
    threshold=, ...), the canvas laid out as `task_canvas`: [BOS] prompt, then the response's length plus one EOS
    slot. Example i draws from its own generator (seed `sample_seed(seed, i)`), so its answer does not depend on
    the batch. A sampler with a step budget gets one generated position per call unless `steps` (or
    sampler_options["steps"]) is given. Returns the task's summary (e.g. `solved`), `nfe` (mean calls per example), `seconds`,
    `tokens_per_second` (generated positions), `peak_memory_mib`, `n`, `scores` and `responses`."""
    from dlm.pipeline import sample_seed
    from dlm.sampler.registry import sampler_spec

    check_task_tokenizer(model.tokenizer, task)
    sampler = generate_kw.get("sampler")
    default_steps = (generate_kw.get("steps") is None and "steps" not in (generate_kw.get("sampler_options") or {})
                     and not isinstance(sampler, Sampler)
                     and "steps" in sampler_spec(model.sampler_name(sampler)).options)
    tok = model.tokenizer
    groups: dict[tuple[int, int], list[int]] = {}  # examples of one layout are batched together
    for i, ex in enumerate(examples):
        key = (len(tok.encode(task.format_prompt(ex), add_special_tokens=False)),
               len(tok.encode(task.format_response(ex), add_special_tokens=False)))
        groups.setdefault(key, []).append(i)
    responses, calls = [None] * len(examples), [0] * len(examples)
    seconds, generated, peak = 0.0, 0, None
    for (prompt_len, response_len), idx in groups.items():
        if 1 + prompt_len + response_len + 1 > model.context:
            raise ValueError(f"a {task.name} example needs {2 + prompt_len + response_len} positions ([BOS], "
                             f"{prompt_len} of prompt, {response_len} of response, an EOS) but the model's context is "
                             f"{model.context}")
        kw = {**generate_kw, "steps": response_len + 1} if default_steps else generate_kw
        gen = model.generate([task.format_prompt(examples[i]) for i in idx], gen_length=response_len + 1,
                             seed=[sample_seed(seed, i) for i in idx], batch_size=batch_size, progress=progress, **kw)
        for r, i in enumerate(idx):
            responses[i] = task.response_text(gen.tokens[r][gen.generated[r]].tolist(), tok)
            calls[i] = int(gen.nfe_per_row[r])
        seconds += gen.seconds
        generated += gen.generated_tokens
        if gen.peak_memory_mib is not None:
            peak = max(peak or 0.0, gen.peak_memory_mib)
    scores = [task.score(ex, r) for ex, r in zip(examples, responses)]
    summary = task.summarize(examples, scores)
    summary.update(n=len(examples), nfe=sum(calls) / max(len(examples), 1), seconds=seconds,
                   tokens_per_second=generated / seconds if seconds > 0 else float("inf"), peak_memory_mib=peak,
                   scores=scores, responses=responses)
    return summary


# ---------------------------------------------------------------------------------------- `dlm eval --task`
def parse_task_options(items: list[str] | None) -> dict:
    """`--task-option KEY=VALUE` strings as a dict, each value an int, float or bool where it reads as one."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--task-option {item!r}: write KEY=VALUE, e.g. --task-option size=4")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def evaluate_models_on_task(args) -> list[dict]:
    """`dlm eval MODEL... --task NAME`: one row per model, its responses to the task's examples (task_examples)
    sampled with --sampler / -o / --steps (default: one position per call) and scored."""
    from dlm.pipeline import load
    from dlm.progress import emit
    from dlm.progress import resolve as resolve_progress
    from dlm.sampler.registry import sampler_spec
    from dlm.tasks import make_task

    progress = getattr(args, "progress", "auto")
    rows = []
    for path in args.models:
        model = load(path, dtype=getattr(args, "dtype", None))
        check_task_tokenizer(model.tokenizer, make_task(args.task))  # one vocabulary for every option of a task
        task, examples, source = task_examples(args.task, model, args.task_data, args.split, args.limit,
                                               args.task_seed, parse_task_options(args.task_option))
        if not examples:
            raise ValueError(f"no example to evaluate ({source})")
        check_task_tokenizer(model.tokenizer, task)
        sampler = args.sampler or model.process.default_sampler
        options = {**(getattr(args, "sampler_kw", None) or {}), **model.sampler_options(sampler, args.option or [])}
        positions = len(model.tokenizer.encode(task.format_response(examples[0]), add_special_tokens=False)) + 1
        takes_steps = "steps" in sampler_spec(model.sampler_name(sampler)).options
        steps = None if "steps" in options or not takes_steps else args.steps or positions
        if resolve_progress(progress) != "off":
            emit(f"eval: {path} ({model.process.name}) on {source}")
        softmask, feedback = getattr(args, "softmask_kw", None), getattr(args, "feedback_kw", None)
        fed = model.feedback_for(softmask, feedback)  # what the sampler is fed (the model's own by default)
        out = evaluate_model(model, task, examples, seed=args.seed, batch_size=args.batch_size, progress=progress,
                             sampler=sampler, steps=steps, top_p=args.top_p, softmask=softmask, feedback=feedback,
                             sampler_options=options)
        shown = {"steps": options.get("steps", steps), **{k: v for k, v in options.items() if k != "steps"}}
        if options.get("threshold") is not None or options.get("factor") is not None:
            shown.pop("steps")  # the threshold and factor rules take as many calls as they need
        label = "autoregressive" if model.is_autoregressive else " ".join(
            [model.sampler_name(sampler)] + [f"{k}={v}" for k, v in shown.items() if v is not None])
        row = {"model": str(path), "process": model.process.name, "task": task.name, "task_options": task.options(),
               "source": source, "sampler": label + ("" if fed is None else f" +{getattr(fed, 'short', 'feedback')}"), "seed": args.seed,
               "generated_positions": positions}
        if model.trained_steps is not None:
            row["steps"] = model.trained_steps
        row.update({k: v for k, v in out.items() if k not in ("scores", "responses")})
        row["solved_per_example"] = [s.get("solved") for s in out["scores"]]
        rows.append(row)
    return rows


PERCENT = ("solved", "cell_accuracy", "blank_accuracy", "givens_kept", "hardest_solved")


def print_task_table(rows: list[dict]) -> None:
    """The rows of evaluate_models_on_task as a table: fractions in %, mean violations, NFE per example."""
    skip = {"model", "process", "task", "task_options", "source", "sampler", "seed", "generated_positions",
            "steps", "n", "nfe", "seconds", "tokens_per_second", "peak_memory_mib", "solved_per_example"}
    metrics = [k for k in rows[0] if k not in skip]
    cols = [("model", "model", "{}"), ("sampler", "sampler", "{}"), ("n", "n", "{}")]
    cols += [(k, k.replace("_", " ") + (" %" if k in PERCENT else ""), "{:.1f}" if k in PERCENT else "{:.2f}")
             for k in metrics]
    cols += [("nfe", "NFE/example", "{:.1f}"), ("tokens_per_second", "tok/s", "{:.0f}")]
    cells = [[fmt.format(100 * r[k] if k in PERCENT else r[k]) if k in r else "" for k, _, fmt in cols] for r in rows]
    widths = [max(len(head), *(len(c[i]) for c in cells)) for i, (_, head, _) in enumerate(cols)]
    print("  ".join(head.ljust(w) for (_, head, _), w in zip(cols, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    for source in dict.fromkeys(r["source"] for r in rows):
        print(f"  * examples: {source}")
    print(f"  * {rows[0]['task']}: each response is {rows[0]['generated_positions']} generated positions (the answer "
          "and one EOS slot); NFE/example = network calls per example; tok/s = generated positions per second; "
          f"sampling seed {rows[0]['seed']}")
