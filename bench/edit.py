"""Instant edit benchmark: held-out sentences with 5-15 % of their tokens replaced by random tokens, repaired by
`DiffusionLM.edit` in auto mode; restored fraction of the corrupted tokens, fraction of the clean tokens changed,
NFE per sentence, against doing nothing and an autoregressive model's greedy rescoring.

    python bench/edit.py                                   # trains a small demo-size MDLM first (--train-steps)
    python bench/edit.py --model runs/demo-mdlm --ar runs/demo-ar --sentences 100
    python bench/edit.py --model /tmp/micro --quick        # a smoke run

Sentences: the embedded corpus's test split cut at sentence ends (. ; : ? !), those of 12 to 48 tokens, picked
evenly over the split. Corruption: per sentence a rate drawn uniformly in [0.05, 0.15] (at least one token);
each chosen token is replaced by a uniformly drawn non-special token such that the corrupted text tokenizes back
to exactly the corrupted ids (so the positions stay aligned; a draw that merges with its neighbours is redrawn).
Seeded: the same sentences and corruptions every run.

Methods. "do nothing": the corrupted text as is. "dlm edit": `model.edit(text, threshold=..., budget=...)`
(auto mode; its defaults and a few other thresholds), scoring each token masked in interleaved groups, remasking
the least likely, regenerating them with the model's sampler at temperature 0. "AR greedy rescoring" (--ar): left
to right, the first token whose probability given its prefix is below the threshold (and not the argmax) is
replaced by the argmax, and the scan restarts there with a new call; the AR model sees only the left context.
NFE: network calls per sentence (the AR's calls are over the prefix, with no cache). "corrupted changed": the
corrupted tokens the method changed at all (found, restored or not).
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dlm  # noqa: E402


def test_sentences(model, n: int, min_tokens: int = 12, max_tokens: int = 48) -> list[str]:
    """n held-out sentences of min_tokens..max_tokens tokens (and within the context), evenly over the split."""
    from dlm.data.corpus import load_texts

    found = []
    for text in load_texts("embedded", split="test"):
        for s in re.split(r"(?<=[.;:?!])\s+", " ".join(text.split())):
            if min_tokens <= len(model.encode(s)) <= min(max_tokens, model.context - 1):
                found.append(s)
    if len(found) < n:
        raise SystemExit(f"the test split holds only {len(found)} sentences of {min_tokens}-{max_tokens} tokens")
    return [found[round(i * (len(found) - 1) / max(n - 1, 1))] for i in range(n)]


def corrupt(tokenizer, text: str, generator: torch.Generator, low: float = 0.05, high: float = 0.15
            ) -> tuple[list[int], str, list[int]] | None:
    """(clean ids, corrupted text, corrupted positions) with a rate in [low, high] of the tokens replaced by random
    non-special tokens, the corrupted text tokenizing back to the corrupted ids; None when no such draw is found."""
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    clean = encode(text)
    if encode(tokenizer.decode(clean, clean_up_tokenization_spaces=False)) != clean:
        return None
    rate = low + (high - low) * float(torch.rand((), generator=generator))
    k = max(1, round(rate * len(clean)))
    special = set(tokenizer.all_special_ids)
    ids, done = list(clean), []
    for p in torch.randperm(len(clean), generator=generator).tolist():
        if len(done) == k:
            break
        for _ in range(20):
            trial = list(ids)
            trial[p] = int(torch.randint(len(tokenizer), (), generator=generator))
            if trial[p] in special or trial[p] == clean[p]:
                continue
            if encode(tokenizer.decode(trial, clean_up_tokenization_spaces=False)) == trial:
                ids = trial
                done.append(p)
                break
    if len(done) < k:
        return None
    return clean, tokenizer.decode(ids, clean_up_tokenization_spaces=False), sorted(done)


@torch.no_grad()
def ar_greedy_rescore(ar, ids: list[int], threshold: float) -> tuple[list[int], int]:
    """(repaired ids, network calls): left to right, the first token whose probability given its prefix is below
    `threshold` and is not the argmax becomes the argmax; rescanned from there with a fresh call."""
    bos = ar.tokenizer.bos_token_id
    x = torch.tensor([bos] + ids, device=ar.device)
    special = torch.tensor(sorted(ar.tokenizer.all_special_ids), device=ar.device)
    start, calls = 1, 0
    while start < x.shape[0]:
        logits = ar.network.next_token_logits(x[None])[0].float()  # (L, V): position l's logits about token l + 1
        calls += 1
        probs = logits.softmax(-1)
        candidates = probs.clone()
        candidates[:, special] = 0.0  # never a special token (BOS, EOS, PAD, MASK) as the replacement
        fixed = False
        for i in range(start, x.shape[0]):
            p, best = probs[i - 1, x[i]], candidates[i - 1].argmax()
            if p < threshold and best != x[i]:
                x[i] = best
                start, fixed = i + 1, True
                break
        if not fixed:
            break
    return x[1:].tolist(), calls


def score(clean: list[int], new: list[int], bad: list[int], corrupted: list[int]) -> tuple[int, ...]:
    """(corrupted restored, corrupted, clean changed, clean, corrupted changed at all) of one sentence."""
    bad_set = set(bad)
    restored = sum(new[p] == clean[p] for p in bad)
    changed = sum(new[p] != clean[p] for p in range(len(clean)) if p not in bad_set)
    touched = sum(new[p] != corrupted[p] for p in bad)
    return restored, len(bad), changed, len(clean) - len(bad), touched


def train_small(out: Path, steps: int, process: str = "mdlm") -> Path:
    """A demo-size model (run=demo: 4 layers, width 256, context 128) trained `steps` steps on the embedded corpus."""
    from dlm.cli import main

    extra = [] if process == "mdlm" else [f"process={process}"]
    if main(["train", "run=demo", *extra, f"trainer.max_steps={steps}", f"trainer.out_dir={out}",
             "trainer.progress=plain"]) != 0:
        raise SystemExit(f"training the {process} model failed")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="an MDLM run folder (default: train one, --train-steps)")
    ap.add_argument("--ar", default=None, help="an autoregressive run folder for the greedy-rescoring baseline")
    ap.add_argument("--train-steps", type=int, default=400, help="steps of the MDLM trained without --model")
    ap.add_argument("--sentences", type=int, default=60)
    ap.add_argument("--thresholds", default="0.0001,0.001,0.01", help="auto mode's thresholds to run (comma-separated)")
    ap.add_argument("--budget", type=float, default=0.15)
    ap.add_argument("--max-rounds", default="1,4", help="auto mode's max_rounds to run (comma-separated)")
    ap.add_argument("--ar-thresholds", default="0.0001,0.001", help="the AR baseline's thresholds (comma-separated)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="8 sentences, one threshold (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.quick:
        args.sentences, args.thresholds, args.max_rounds = 8, "0.0001", "4"
    model_path = args.model or train_small(Path(tempfile.mkdtemp(prefix="dlm-edit-bench-")) / "mdlm", args.train_steps)
    model = dlm.load(model_path)
    ar = dlm.load(args.ar) if args.ar else None
    g = torch.Generator().manual_seed(args.seed)
    cases = []
    for s in test_sentences(model, args.sentences * 2):
        c = corrupt(model.tokenizer, s, g)
        if c is not None:
            cases.append(c)
        if len(cases) == args.sentences:
            break
    rows = [("do nothing", [score(clean, model.encode(text), bad, model.encode(text)) + (0,)
                            for clean, text, bad in cases], 0.0)]
    for rounds in [int(x) for x in str(args.max_rounds).split(",")]:
        for thr in [float(x) for x in args.thresholds.split(",")]:
            results, started = [], time.perf_counter()
            for i, (clean, text, bad) in enumerate(cases):
                out = model.edit(text, threshold=thr, budget=args.budget, max_rounds=rounds, seed=args.seed + i)
                new = out.tokens[1:].tolist()
                if len(new) != len(clean):
                    raise SystemExit(f"sentence {i}: the edit's canvas is {len(new)} tokens, the text {len(clean)}")
                results.append(score(clean, new, bad, model.encode(text)) + (out.nfe,))
            rows.append((f"dlm edit (auto, threshold {thr:g}, budget {args.budget:g}, max {rounds} rounds)", results,
                         time.perf_counter() - started))
    if ar is not None:
        if ar.tokenizer.get_vocab() != model.tokenizer.get_vocab():
            raise SystemExit("the AR model's tokenizer differs from the MDLM's: train both on the same data")
        for thr in [float(x) for x in args.ar_thresholds.split(",")]:
            results, started = [], time.perf_counter()
            for clean, text, bad in cases:
                new, calls = ar_greedy_rescore(ar, model.encode(text), thr)
                results.append(score(clean, new, bad, model.encode(text)) + (calls,))
            rows.append((f"AR greedy rescoring (threshold {thr:g})", results, time.perf_counter() - started))
    corrupted = sum(b for _, b, _, _ in (r[:4] for r in rows[0][1]))
    clean_total = sum(c for *_, c in (r[:4] for r in rows[0][1]))
    print(f"# instant edit: {len(cases)} held-out sentences, {corrupted} corrupted of {corrupted + clean_total} "
          f"tokens ({100 * corrupted / (corrupted + clean_total):.1f} %)")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} "
          f"({platform.processor() or 'cpu'}), {torch.get_num_threads()} threads, float32; model {model_path} "
          f"({model.trained_steps} steps){'; AR ' + str(args.ar) if ar is not None else ''}")
    print("| method | corrupted restored | corrupted changed | clean tokens changed | sentences fully repaired "
          "| NFE / sentence | s |")
    print("|---|---|---|---|---|---|---|")
    for name, results, seconds in rows:
        restored = sum(r[0] for r in results)
        touched = sum(r[4] for r in results)
        changed = sum(r[2] for r in results)
        full = sum(r[0] == r[1] and r[2] == 0 for r in results)
        nfe = sum(r[5] for r in results) / len(results)
        print(f"| {name} | {100 * restored / corrupted:.1f} % | {100 * touched / corrupted:.1f} % | "
              f"{100 * changed / clean_total:.2f} % | {full}/{len(results)} | {nfe:.1f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
