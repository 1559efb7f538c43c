"""BD3-LM vs MDLM vs AR on the embedded corpus (Arriola et al. 2025; SPEC §3).

    python experiments/block_diffusion/run.py                    # full run, writes docs/block_diffusion.{md,png}
    python experiments/block_diffusion/run.py --quick --out DIR  # seconds: the same pipeline on a toy scale
    python experiments/block_diffusion/run.py --estimate         # time short full-scale runs, extrapolate

The full run was sized with --estimate: about 71 min on one thread of a shared 2-core machine (MDLM 0.32, AR 0.44,
BD3-LM 0.69 s/step at batch 32 x 128 tokens; each BD3-LM clip search ~1 min; evaluation ~2 min).

Protocol (one model size, one data set, one optimiser):
  1. pretrain an MDLM and an AR model for `pretrain` steps each;
  2. spend the same `extra` steps on every row: MDLM continued from its checkpoint, AR continued from its
     checkpoint, and BD3-LM with block sizes 4, 8 and 16 fine-tuned from the SAME MDLM checkpoint
     (`dlm train process=bd3lm process.block_size=B init_from=<mdlm>`, the reference recipe), each after the
     data-driven clip search (process.clip_search=true);
  3. evaluate on the test split: perplexity (diffusion: the full-range NELBO bound, fixed seed and time samples;
     AR: exact), and samples of `context` tokens: generative perplexity (SmolLM2-135M; the experiment's own AR model
     in --quick), unigram entropy, tokens/s and NFE. AR samples left to right with a KV cache; MDLM with the cached
     ancestral sampler, `context` steps; BD3-LM block by block with the KV cache, B cached-ancestral steps per block
     (about one token per step everywhere).
The published ordering of perplexities is AR < BD3(4) < BD3(8) < BD3(16) < MDLM; the report says what we get.
Equal extra compute means equal optimiser steps on equal batches (the paper's protocol); a BD3-LM step runs 2L
tokens, so its wall time is reported next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]
BLOCK_SIZES = (4, 8, 16)

SCALES = {
    "full": {
        "model": ["model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.context=128"],
        "data": ["data.vocab_size=4096"], "batch_size": 32, "pretrain": 1800, "extra": 900, "warmup": 100,
        "val_batches": 4, "eval_rows": 512, "t_samples": 4, "num_samples": 16, "ema": 0.995,
    },
    "quick": {
        "model": ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.context=16"],
        "data": ["data.vocab_size=300"], "batch_size": 4, "pretrain": 6, "extra": 3, "warmup": 1,
        "val_batches": 1, "eval_rows": 8, "t_samples": 1, "num_samples": 2, "ema": 0.0,
    },
}


def quick_corpus(out: Path) -> Path:
    """A ~60 KB slice of the embedded corpus as one .txt file (split 90/5/5 by lines), for --quick."""
    from dlm.data import load_embedded_corpus

    path = out / "quick_corpus.txt"
    if not path.exists():
        docs = load_embedded_corpus()
        path.write_text("\n".join(d.text[20_000:26_000] for d in docs[::17]))
    return path


def train_run(name: str, overrides: list[str], out: Path) -> dict:
    from dlm.config import build_config
    from dlm.train.run import train

    run_dir = out / "runs" / name
    timing = run_dir / "train_seconds.txt"  # the wall time of the run that trained it, clip search included
    if (run_dir / "model" / "config.json").is_file() and timing.is_file():  # finished earlier: reuse, keep its time
        return {"run": str(run_dir), "train_seconds": float(timing.read_text())}
    start = time.perf_counter()
    run_dir = train(build_config([*overrides, f"trainer.out_dir={run_dir}"]))
    timing.write_text(f"{time.perf_counter() - start:.1f}")
    return {"run": str(run_dir), "train_seconds": float(timing.read_text())}


def run_overrides(scale: dict, source: str) -> tuple[list[str], list[str]]:
    """`dlm train` overrides of the pretraining runs and of the extra-compute runs."""
    s = scale
    common = [*s["model"], *s["data"], f"data.source={source}", f"trainer.batch_size={s['batch_size']}",
              f"trainer.val_batches={s['val_batches']}", f"trainer.ema={s['ema']}", "trainer.progress=false",
              f"optim.warmup_steps={s['warmup']}"]
    pre = [*common, f"trainer.max_steps={s['pretrain']}", f"trainer.val_every={s['pretrain']}",
           f"trainer.ckpt_every={s['pretrain']}", "optim.lr=1e-3", "optim.decay=cosine"]
    extra = [*common, f"trainer.max_steps={s['extra']}", f"trainer.val_every={s['extra']}",
             f"trainer.ckpt_every={s['extra']}", "optim.lr=3e-4", "optim.decay=constant"]
    return pre, extra


def train_all(scale: dict, out: Path, source: str) -> dict[str, dict]:
    pre, extra = run_overrides(scale, source)
    runs: dict[str, dict] = {}
    mdlm_pre = train_run("mdlm_pretrain", [*pre, "process=mdlm"], out)
    tokenizer = Path(mdlm_pre["run"]) / "tokenizer"  # one tokenizer for every model
    ar_pre = train_run("ar_pretrain", [*pre, "process=ar", f"data.tokenizer={tokenizer}"], out)
    runs["AR"] = train_run("ar", [*extra, "process=ar", f"init_from={ar_pre['run']}"], out)
    runs["MDLM"] = train_run("mdlm", [*extra, "process=mdlm", f"init_from={mdlm_pre['run']}"], out)
    for B in BLOCK_SIZES:
        runs[f"BD3-LM (B={B})"] = train_run(f"bd3lm_b{B}", [*extra, "process=bd3lm", f"process.block_size={B}",
                                                           "process.clip_search=true", f"init_from={mdlm_pre['run']}"], out)
    for name, pre_run in (("AR", ar_pre), ("MDLM", mdlm_pre)):
        runs[name]["pretrain_seconds"] = pre_run["train_seconds"]
    for B in BLOCK_SIZES:
        runs[f"BD3-LM (B={B})"]["pretrain_seconds"] = mdlm_pre["train_seconds"]
    return runs


def evaluate(runs: dict[str, dict], scale: dict, source: str, eval_lm) -> list[dict]:
    import dlm
    from dlm.data.entropy import mean_sample_entropy
    from dlm.eval.genppl import generative_perplexity

    rows = []
    for name, info in runs.items():
        model = dlm.load(info["run"])
        ppl = model.perplexity(source=source, split="test", num_t_samples=scale["t_samples"], seed=0,
                               max_rows=scale["eval_rows"], precision="32")
        L = model.context
        if model.process.name == "bd3lm":
            gen = model.generate(num_samples=scale["num_samples"], length=L, steps=model.process.block_size, seed=0)
        else:
            gen = model.generate(num_samples=scale["num_samples"], length=L, sampler="ancestral_cache", steps=L, seed=0)
        g = generative_perplexity(gen.texts, eval_lm)
        p = model.cfg.process
        rows.append({
            "model": name, "val_ppl": ppl["ppl"], "bound": ppl["bound"], "num_tokens": ppl["num_tokens"],
            "gen_ppl": g["gen_ppl"], "eval_model": g["eval_model"], "entropy": mean_sample_entropy(gen.tokens.tolist()),
            "tokens_per_s": gen.tokens_per_second, "nfe": gen.nfe, "num_samples": scale["num_samples"],
            "clip": [p.clip_low, p.clip_high] if p.name == "bd3lm" else None,
            "train_seconds": info["train_seconds"], "pretrain_seconds": info["pretrain_seconds"],
            "sample": gen.texts[0][:300],
        })
        print(f"{name}: val ppl {ppl['ppl']:.2f}, gen ppl {g['gen_ppl']:.1f}, entropy {rows[-1]['entropy']:.2f}, "
              f"{gen.tokens_per_second:.0f} tokens/s", flush=True)
    return rows


def ordering(rows: list[dict]) -> tuple[str, bool]:
    """Our perplexity ordering and whether it matches the published AR < BD3(4) < BD3(8) < BD3(16) < MDLM."""
    published = ["AR", *(f"BD3-LM (B={B})" for B in BLOCK_SIZES), "MDLM"]
    ours = [r["model"] for r in sorted(rows, key=lambda r: r["val_ppl"])]
    return " < ".join(ours), ours == published


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"].replace("BD3-LM ", "BD3\n") for r in rows]
    colors = ["#555555" if r["model"] == "AR" else "#1f77b4" if r["model"] == "MDLM" else "#ff7f0e" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].bar(names, [r["val_ppl"] for r in rows], color=colors)
    axes[0].set(title="test perplexity (diffusion: NELBO bound)", ylabel="perplexity")
    for r, name in zip(rows, names):
        axes[1].scatter(r["entropy"], r["gen_ppl"], color=colors[names.index(name)], s=40)
        axes[1].annotate(name.replace("\n", " "), (r["entropy"], r["gen_ppl"]), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    axes[1].set(title="samples: generative perplexity vs entropy", xlabel="unigram entropy (nats)",
                ylabel="generative perplexity")
    axes[2].bar(names, [r["tokens_per_s"] for r in rows], color=colors)
    axes[2].set(title="sampling speed", ylabel="tokens / s")
    for ax in (axes[0], axes[2]):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], scale_name: str, scale: dict, total_seconds: float, md_path: Path,
                 png_path: Path, source: str) -> None:
    order, matches = ordering(rows)
    lines = [
        "# Block diffusion (BD3-LM) vs MDLM vs AR",
        "",
        f"Generated by `python experiments/block_diffusion/run.py{' --quick' if scale_name == 'quick' else ''}` "
        f"({scale_name} scale) in {total_seconds / 60:.1f} min on this machine (torch threads: "
        f"{__import__('torch').get_num_threads()}).",
        "",
        f"Model: {' '.join(scale['model'])} ({' '.join(scale['data'])}), data: "
        f"{'the embedded corpus' if source == 'embedded' else 'a 60 KB slice of the embedded corpus'}, "
        f"batch {scale['batch_size']}. "
        f"MDLM and AR pretrained {scale['pretrain']} steps (lr 1e-3, cosine); then {scale['extra']} extra steps for "
        "every row (lr 3e-4): MDLM and AR continued from their checkpoints, BD3-LM fine-tuned from the same MDLM "
        "checkpoint with the data-driven clip search.",
        "",
        "| model | test PPL | gen. PPL | entropy | tokens/s | NFE | clip [β, ω] | extra-train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        clip = f"[{r['clip'][0]:.2f}, {r['clip'][1]:.2f}]" if r["clip"] else "–"
        lines.append(f"| {r['model']} | {'≤ ' if r['bound'] else ''}{r['val_ppl']:.2f} | {r['gen_ppl']:.1f} | "
                     f"{r['entropy']:.2f} | {r['tokens_per_s']:.0f} | {r['nfe']} | {clip} | {r['train_seconds']:.0f} |")
    r0 = rows[0]
    lines += [
        "",
        f"- Test perplexity on {r0['num_tokens']:,} tokens of the test split; diffusion rows are NELBO upper bounds "
        f"over the full mask-rate range ({scale['t_samples']} time samples per block/sequence, seed 0, fp32), "
        "whatever interval the model was trained on; AR is exact.",
        f"- Samples: {r0['num_samples']} of {scale['model'][-1].split('=')[1]} tokens each; generative perplexity by "
        f"{r0['eval_model']}; entropy = mean unigram entropy of each sample's token ids. NFE = network calls for all "
        "samples (BD3-LM includes one cache-filling pass per finished block).",
        f"- Published ordering: AR < BD3(4) < BD3(8) < BD3(16) < MDLM. Ours: {order} "
        f"({'matches' if matches else 'differs'}).",
        "",
        f"![BD3-LM vs MDLM vs AR]({png_path.name})",
        "",
        "First sample of each model:",
        "",
    ]
    lines += [f"- **{r['model']}**: {r['sample']!r}" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")


def seconds_per_step(run: dict, tokens_per_step: int) -> float:
    """Median training step time of a run, from the tokens/s its Throughput callback logged (start-up excluded)."""
    import statistics

    from dlm.train.callbacks import read_metrics

    rates = read_metrics(Path(run["run"]) / "logs")["train/tokens_per_s"]
    return statistics.median(tokens_per_step / r for step, r in rates.items() if step >= 2)


def estimate(scale: dict, out: Path, source: str, eval_spec: str, steps: int = 20) -> float:
    """Extrapolate the full run's duration from short runs at full scale: MDLM (building the tokenizer), AR and
    BD3-LM (with the clip search) for `steps` steps each; per-step times from their logs, start-up = the rest; plus
    an evaluation of those three models with the full evaluation settings, scaled to the five rows."""
    pre, extra = run_overrides(scale, source)
    cap = [f"trainer.max_steps={steps}", f"trainer.val_every={steps}", f"trainer.ckpt_every={steps}"]
    short = {"mdlm": train_run("est_mdlm", [*pre, "process=mdlm", *cap], out)}
    tokenizer = Path(short["mdlm"]["run"]) / "tokenizer"
    short["ar"] = train_run("est_ar", [*pre, "process=ar", f"data.tokenizer={tokenizer}", *cap], out)
    short["bd3lm"] = train_run("est_bd3", [*extra, "process=bd3lm", "process.block_size=4", "process.clip_search=true",
                                           f"init_from={short['mdlm']['run']}", *cap], out)
    tokens = scale["batch_size"] * int(scale["model"][-1].split("=")[1])
    per_step = {k: seconds_per_step(run, tokens) for k, run in short.items()}
    startup = {k: short[k]["train_seconds"] - steps * per_step[k] for k in short}
    P, E = scale["pretrain"], scale["extra"]
    # Runs: MDLM and AR pretraining + continuation, 3 BD3-LM fine-tunes. Only the first builds the tokenizer.
    train_s = ((per_step["mdlm"] + per_step["ar"]) * (P + E) + 3 * per_step["bd3lm"] * E
               + startup["mdlm"] + 3 * startup["ar"] + 3 * startup["bd3lm"])
    from dlm.eval.report import load_eval_lm

    start = time.perf_counter()
    runs = {name: {**short[k], "pretrain_seconds": 0.0} for name, k in
            (("AR", "ar"), ("MDLM", "mdlm"), ("BD3-LM (B=4)", "bd3lm"))}
    evaluate(runs, scale, source, load_eval_lm(eval_spec))
    eval_s = (time.perf_counter() - start) * 5 / 3
    for k in per_step:
        print(f"{k}: {per_step[k]:.3f} s/step, start-up {startup[k]:.1f} s")
    print(f"estimated full run: training {train_s / 60:.1f} min + evaluation {eval_s / 60:.1f} min = "
          f"{(train_s + eval_s) / 60:.1f} min with {__import__('torch').get_num_threads()} thread(s)")
    return train_s + eval_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy scale (seconds), for the test")
    parser.add_argument("--out", default=None, help="work folder (runs, results.json; --quick also writes its "
                                                     "report here). Default: runs/block_diffusion")
    parser.add_argument("--eval-model", default=None, help="smollm2 (full default) or dlm:PATH; --quick uses its AR")
    parser.add_argument("--estimate", action="store_true",
                        help="time short runs at full scale and extrapolate the full run's duration; trains nothing else")
    args = parser.parse_args(argv)
    scale_name = "quick" if args.quick else "full"
    scale = SCALES[scale_name]
    out = Path(args.out or REPO / "runs" / "block_diffusion").resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "settings.json"  # finished runs in `out` are reused: only for the scale that trained them
    if settings.is_file() and json.loads(settings.read_text()).get("scale") != scale_name:
        raise SystemExit(f"{out} holds the runs of the '{json.loads(settings.read_text()).get('scale')}' scale, not "
                         f"'{scale_name}'; use another --out, or delete that folder to start over")
    settings.write_text(json.dumps({"scale": scale_name}))
    start = time.perf_counter()
    source = str(quick_corpus(out)) if args.quick else "embedded"
    if args.estimate:
        estimate(scale, out / "estimate", source, args.eval_model or "smollm2")
        return 0
    runs = train_all(scale, out, source)

    from dlm.eval.report import load_eval_lm

    eval_spec = args.eval_model or (f"dlm:{runs['AR']['run']}" if args.quick else "smollm2")
    rows = evaluate(runs, scale, source, load_eval_lm(eval_spec))
    total = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps({"scale": scale_name, "seconds": total, "rows": rows}, indent=1))
    docs = out if args.quick else REPO / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    md, png = docs / "block_diffusion.md", docs / "block_diffusion.png"
    plot(rows, png)
    write_report(rows, scale_name, scale, total, md, png, source)
    order, matches = ordering(rows)
    print(f"ordering: {order} ({'matches' if matches else 'differs from'} the published one); "
          f"total {total / 60:.1f} min; report {md}, plot {png}")
    return 0 if all(math.isfinite(r["val_ppl"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
