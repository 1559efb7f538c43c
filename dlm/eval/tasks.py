"""Evaluate a model on a task with exact answers (dlm.tasks): sample the responses of test prompts with any
sampler and score them exactly (for Sudoku: puzzles solved, cell accuracy, rule violations), with NFE and speed.

    from dlm.eval.tasks import evaluate_task
    summary = evaluate_task(network, process, tokenizer, make_task("sudoku", size=4), examples,
                            make_sampler("llada", steps=16), batch_size=64, seed=0)
"""

from __future__ import annotations

import time

import torch

from dlm.sampler import Canvas


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
