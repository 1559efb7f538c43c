"""Prompted samplers on a trained model: quality (generative perplexity, entropy) against speed (tokens/s,
network calls) for MDLM ancestral sampling, the LLaDA count schedule, and threshold / factor parallel
decoding, the last three with no cache, the prefix cache and the dual cache.

    python bench/prompted_samplers.py                          # runs/demo-mdlm -> docs/prompted_samplers.{md,png}
    python bench/prompted_samplers.py MODEL --eval-model dlm:AR_MODEL --num-prompts 64
    python bench/prompted_samplers.py /tmp/micro --quick       # a smoke run; writes to a temporary folder

Prompts are windows of the embedded corpus's test split: `--prompt-length` tokens after BOS, then the model
continues with `--gen-length` tokens (the held-out continuation is scored too, as a reference).
Generative perplexity is conditional on the prompt: exp(sum over samples of [NLL(prompt + continuation) -
NLL(prompt)] / sum of the continuation's evaluator tokens), under an independent causal LM (SmolLM2-135M by
default). Entropy is the mean unigram entropy of each continuation's token ids. All samplers of one row run
the whole prompt batch at once in float32; times are the best of `--repeats` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dlm  # noqa: E402
from dlm.data.entropy import mean_sample_entropy  # noqa: E402
from dlm.eval.genppl import sequence_nll  # noqa: E402
from dlm.eval.report import load_eval_lm  # noqa: E402
from dlm.sampler import AncestralSampler, Canvas  # noqa: E402
from dlm.sampler.llada import generate_llada  # noqa: E402
from dlm.sampler.policies import ConfidenceThreshold, CountSchedule, FactorRule  # noqa: E402

CACHES = ("none", "prefix", "dual")


def test_prompts(model, n: int, prompt_length: int, gen_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """n (prompt ids with BOS, held-out continuation ids) pairs, spread evenly over the test split."""
    from dlm.data.corpus import load_texts

    windows = []
    for text in load_texts("embedded", split="test"):
        ids = model.encode(text)
        span = prompt_length + gen_length
        windows += [ids[i:i + span] for i in range(0, len(ids) - span, 4 * span)]
    if len(windows) < n:
        raise SystemExit(f"the test split holds only {len(windows)} windows of {prompt_length}+{gen_length} tokens")
    picked = [windows[round(i * (len(windows) - 1) / max(n - 1, 1))] for i in range(n)]
    bos = model.tokenizer.bos_token_id
    return [[bos] + w[:prompt_length] for w in picked], [w[prompt_length:] for w in picked]


def conditional_genppl(model, eval_lm, prompts, continuations) -> float:
    """exp(sum [NLL(prompt + continuation) - NLL(prompt)] / sum [tokens(prompt + continuation) - tokens(prompt)])."""
    full = [model.decode(torch.tensor([p + c]))[0] for p, c in zip(prompts, continuations)]
    head = [model.decode(torch.tensor([p]))[0] for p in prompts]
    seqs = [[eval_lm.prefix_id] + eval_lm.encode(t) for t in full + head]
    nll, counts = sequence_nll(seqs, eval_lm, batch_size=8, progress=False)
    n = len(prompts)
    nll_sum = sum(nll[:n]) - sum(nll[n:])
    tokens = sum(counts[:n]) - sum(counts[n:])
    return math.exp(nll_sum / max(tokens, 1))


def run_ancestral(model, prompts, gen_length, steps, cache, seed):
    net, proc = model.network, model.process
    canvas = torch.tensor([p + [proc.mask_id] * gen_length for p in prompts])
    fixed = torch.zeros_like(canvas, dtype=torch.bool)
    fixed[:, :len(prompts[0])] = True
    started = time.perf_counter()
    out = AncestralSampler(steps, temperature=1.0, cache=cache).sample(net, proc, Canvas.from_fixed(canvas, fixed),
                                                                       torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - started
    return out.tokens[:, len(prompts[0]):], out.nfe, out.nfe, seconds  # every call includes every prompt


def run_llada(model, prompts, gen_length, block_length, steps, policy, cache, temperature, seed):
    started = time.perf_counter()
    out = generate_llada(model.network, model.process, prompts, gen_length, block_length, steps, temperature,
                         policy=policy, cache=cache, generator=torch.Generator().manual_seed(seed),
                         pad_id=model.tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    return out.tokens, float(out.nfe_per_row.float().mean()), out.nfe, seconds


def configurations(args):
    """(family, cache, callable(model, prompts, seed) -> (tokens, NFE per prompt, batch NFE, seconds))."""
    g, b, tau = args.gen_length, args.block_length, args.temperature
    rows = [("MDLM ancestral", "none", lambda m, p, s: run_ancestral(m, p, g, g, False, s)),
            ("MDLM ancestral", "ddpm_cache", lambda m, p, s: run_ancestral(m, p, g, g, True, s))]
    policies = [("LLaDA count", lambda: CountSchedule(), g),
                (f"threshold {args.threshold}", lambda: ConfidenceThreshold(args.threshold), g),
                (f"factor {args.factor}", lambda: FactorRule(args.factor), g)]
    for family, make, steps in policies:
        for cache in CACHES:
            rows.append((family, cache, lambda m, p, s, make=make, steps=steps, cache=cache:
                         run_llada(m, p, g, b, steps, make(), cache, tau, s)))
    for threshold in args.sweep:
        rows.append((f"threshold {threshold}", "dual", lambda m, p, s, threshold=threshold:
                     run_llada(m, p, g, b, g, ConfidenceThreshold(threshold), "dual", tau, s)))
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (speed, ppl) not dominated by another (faster and no worse, or better and no slower)."""
    front = []
    for i, (s, q) in enumerate(points):
        if not any((s2 >= s and q2 <= q) and (s2 > s or q2 < q) for j, (s2, q2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot(results, reference, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"none": "o", "prefix": "s", "dual": "D", "ddpm_cache": "^"}
    fig, ax = plt.subplots(figsize=(9, 5))
    families = list(dict.fromkeys(r["family"] for r in results))
    colors = dict(zip(families, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for r in results:
        ax.scatter(r["tokens_per_s"], r["gen_ppl"], marker=markers[r["cache"]], color=colors[r["family"]], s=45,
                   label=f"{r['family']} / {r['cache']}")
        ax.annotate(f"H {r['entropy']:.2f}", (r["tokens_per_s"], r["gen_ppl"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=6, color=colors[r["family"]])
    front = pareto_front([(r["tokens_per_s"], r["gen_ppl"]) for r in results])
    ax.plot([results[i]["tokens_per_s"] for i in front], [results[i]["gen_ppl"] for i in front], "k--", lw=1,
            label="Pareto front")
    ax.axhline(reference["gen_ppl"], color="grey", lw=0.8, ls=":", label="held-out text")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("generated tokens / s (log)")
    ax.set_ylabel("generative perplexity (log; lower is better)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="runs/demo-mdlm", help="a trained masked diffusion model")
    parser.add_argument("--eval-model", default="smollm2", help="smollm2 | dlm:PATH | a Hugging Face causal LM")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.7, 0.5, 0.3, 0.2, 0.1, 0.05],
                        help="further confidence thresholds, run with the dual cache only (the NFE-quality trade-off)")
    parser.add_argument("--factor", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=0.0, help="of the LLaDA-style samplers (MDLM uses 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per sampler; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None, help="default docs/ (a temporary folder with --quick)")
    parser.add_argument("--quick", action="store_true", help="4 prompts, 32 tokens, 1 repeat: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.num_prompts, args.gen_length, args.block_length, args.repeats = 4, 32, 8, 1
        if args.out_dir and Path(args.out_dir).resolve() == (ROOT / "docs").resolve():
            raise SystemExit("--quick results are not benchmark results; they are never written to docs/")
    out_dir = Path(args.out_dir or (tempfile.mkdtemp(prefix="prompted_samplers_") if args.quick else ROOT / "docs"))
    if not Path(args.model).exists():
        raise SystemExit(f"no trained model at {args.model}: train one first (e.g. `dlm train run=demo "
                         f"trainer.out_dir={args.model}`), or pass the path of a masked diffusion model")
    model = dlm.load(args.model)
    if model.is_autoregressive:
        raise SystemExit(f"{args.model} is autoregressive; this benchmark needs a masked diffusion model")
    if args.prompt_length + 1 + args.gen_length > model.context:
        raise SystemExit(f"prompt {args.prompt_length} + BOS + gen {args.gen_length} exceeds the model's context "
                         f"({model.context}); lower --prompt-length or --gen-length")
    prompts, held_out = test_prompts(model, args.num_prompts, args.prompt_length, args.gen_length)
    eval_lm = load_eval_lm(args.eval_model)
    reference = {"gen_ppl": conditional_genppl(model, eval_lm, prompts, held_out),
                 "entropy": mean_sample_entropy(held_out)}
    print(f"{args.model}: {model.network.num_params(False):,} parameters | {len(prompts)} prompts x "
          f"{args.prompt_length} tokens -> {args.gen_length} new | threads {torch.get_num_threads()} | "
          f"evaluator {eval_lm.name}")
    print(f"held-out continuation: gen ppl {reference['gen_ppl']:.2f}, entropy {reference['entropy']:.3f}")
    print(f"\n{'sampler':22s} {'cache':>10s} {'NFE':>7s} {'batch':>6s} {'tok/NFE':>8s} {'seconds':>8s} {'tok/s':>8s} "
          f"{'gen ppl':>8s} {'entropy':>8s}")
    results = []
    with torch.inference_mode():
        run_llada(model, prompts[:2], 8, 8, 8, CountSchedule(), "dual", 0.0, 0)  # warm-up
        for family, cache, fn in configurations(args):
            best = None
            for _ in range(args.repeats):
                tokens, nfe, batch_nfe, seconds = fn(model, prompts, args.seed)
                best = seconds if best is None else min(best, seconds)
            r = {"family": family, "cache": cache, "nfe": nfe, "batch_nfe": batch_nfe,
                 "tokens_per_nfe": args.gen_length / nfe,
                 "seconds": best, "tokens_per_s": tokens.numel() / best,
                 "gen_ppl": conditional_genppl(model, eval_lm, prompts, tokens.tolist()),
                 "entropy": mean_sample_entropy(tokens.tolist())}
            results.append(r)
            print(f"{family:22s} {cache:>10s} {nfe:7.1f} {batch_nfe:6d} {r['tokens_per_nfe']:8.2f} {best:8.3f} "
                  f"{r['tokens_per_s']:8.0f} {r['gen_ppl']:8.2f} {r['entropy']:8.3f}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = (f"{Path(args.model).name}: {len(prompts)} prompts, {args.gen_length} new tokens, "
             f"block {args.block_length}\nevaluator {eval_lm.name}; H = entropy of the samples")
    plot(results, reference, out_dir / "prompted_samplers_pareto.png", title)
    write_report(out_dir / "prompted_samplers.md", args, model, eval_lm, reference, results)
    print(f"\nwritten: {out_dir / 'prompted_samplers.md'}, {out_dir / 'prompted_samplers_pareto.png'}")
    return 0


def count_row(results) -> dict:
    """The reference of the target: the LLaDA count schedule without cache."""
    return next(r for r in results if r["family"] == "LLaDA count" and r["cache"] == "none")


def target_line(results) -> str:
    """The issue's target: some confidence threshold with the dual cache makes >= 3x fewer network calls per prompt
    than the count schedule without cache at <= 1% worse generative perplexity (threshold 0.9 shown first)."""
    count = count_row(results)
    cells, met = [], []
    for r in sorted((r for r in results if r["family"].startswith("threshold") and r["cache"] == "dual"),
                    key=lambda r: -float(r["family"].split()[1])):
        calls, worse = count["nfe"] / r["nfe"], r["gen_ppl"] / count["gen_ppl"] - 1
        cells.append(f"{r['family'].split()[1]}: {calls:.2f}x fewer calls, gen. ppl {100 * worse:+.1f}%, "
                     f"entropy {r['entropy']:.2f}")
        if calls >= 3 and worse <= 0.01:
            met.append(r["family"].split()[1])
    verdict = f"met at threshold {', '.join(met)}" if met else "not met at any threshold"
    return ("Target (a confidence threshold with the dual cache vs the count schedule without cache: >= 3x fewer "
            f"network calls per prompt at <= 1% worse generative perplexity; the count schedule's entropy is "
            f"{count['entropy']:.2f}): {'; '.join(cells)} -> **{verdict}**.")


def write_report(path: Path, args, model, eval_lm, reference, results) -> None:
    front = set(pareto_front([(r["tokens_per_s"], r["gen_ppl"]) for r in results]))
    lines = [
        "# Prompted samplers: quality against speed", "",
        f"Written by `python bench/prompted_samplers.py {' '.join(sys.argv[1:]) or args.model}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} "
        f"({platform.processor() or 'cpu'}), {torch.get_num_threads()} threads, float32, model "
        f"{model.network.num_params(False):,} parameters (context {model.context}).", "",
        f"{len(model.tokenizer)}-token vocabulary; {args.num_prompts} prompts of {args.prompt_length} tokens from the "
        f"embedded corpus's test split, each continued by {args.gen_length} tokens in blocks of {args.block_length}; "
        f"the LLaDA-style samplers at temperature {args.temperature}, MDLM ancestral at temperature 1 with "
        f"{args.gen_length} steps; the count schedule with {args.gen_length} steps (one token per call). "
        f"Generative perplexity of the continuation given the prompt, by {eval_lm.name}; entropy = mean unigram "
        f"entropy of each continuation's ids. Seconds: best of {args.repeats} runs of the whole batch. NFE per "
        "prompt: the network calls each prompt takes part in (what it costs alone: a prompt whose block is done "
        "leaves the batch until the next block); batch NFE: the batch's steps, set by its slowest prompt.", "",
        f"Held-out continuations: generative perplexity {reference['gen_ppl']:.2f}, "
        f"entropy {reference['entropy']:.3f}.",
        "", "| sampler | cache | NFE per prompt | batch NFE | tokens/NFE | seconds | tokens/s | gen. ppl | entropy "
        "| Pareto |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for i, r in enumerate(results):
        lines.append(f"| {r['family']} | {r['cache']} | {r['nfe']:.1f} | {r['batch_nfe']} | {r['tokens_per_nfe']:.2f} "
                     f"| {r['seconds']:.3f} "
                     f"| {r['tokens_per_s']:.0f} | {r['gen_ppl']:.2f} | {r['entropy']:.3f} "
                     f"| {'*' if i in front else ''} |")
    lines += ["", target_line(results), "",
              "![Pareto front](prompted_samplers_pareto.png)", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
