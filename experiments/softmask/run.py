"""Soft-masking experiment (SPEC section 2): does continued pretraining with SM help an MDLM at our scale?

    python experiments/softmask/run.py                 # full run (~90 min on 2 CPU cores): docs/softmask.md + plot
    python experiments/softmask/run.py --quick --out /tmp/sm   # seconds; a smoke test of every stage

1. Pretrain one MDLM on the embedded corpus (or reuse one with --base).
2. From it, continue training three ways, per seed: plain MDLM for N steps ("equal steps"), plain MDLM for
   N (1 + p_sm / 3) steps ("equal compute": an SM step costs one extra forward, 1/3 of a forward-backward,
   on a fraction p_sm of the batches), and MDLM with soft-masking for N steps.
3. Validation perplexity (NELBO bound on the val split; the SM model also with its soft-masked two-pass bound).
4. Unconditional samples at NFE in {8, 16, 32, 64, 128} with the ancestral sampler and ReMDM, with and without
   SM at sampling time (learned w for the SM model, training-free w for the plain ones), scored by generative
   perplexity, unigram entropy and MAUVE against held-out test text of the same token length, all with
   features and likelihoods from the evaluation model (SmolLM2-135M). The headline comparison (SM model with
   SM sampling vs the equal-compute plain model without) runs for every seed; the other rows for the first.
Every stage is cached in --work (runs and results.jsonl): re-running resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `experiments.softmask.*` imports when run as a script


@dataclass
class Sizes:
    model: list[str]  # config overrides of the network (and data)
    base_steps: int
    base_lr: float
    steps: int  # continued-training steps of the equal-steps runs
    lr: float
    batch: int
    seeds: tuple[int, ...]
    nfe: tuple[int, ...]
    num_samples: int
    ppl_rows: int  # validation rows for the perplexity (each with `ppl_t` Monte Carlo times)
    ppl_t: int


# Sized from single-thread measurements (OMP_NUM_THREADS=1, machine shared, tiny preset, batch 32): a plain step
# 0.74 s, an SM step (p_sm 0.8) 0.90 s, one sampling NFE on 32 x 128 tokens 0.44 s, scoring 32 samples with
# SmolLM2 14 s. Training 1500 + 3 x (400 + 507 + 400 SM) steps ~ 70 min, evaluation (18 sampler settings x 5 NFE,
# 248 NFE each, + scoring) ~ 57 min, on one thread; about 75-90 min on 2 cores.
FULL = Sizes(model=["model=tiny", "data.vocab_size=8192"], base_steps=1500, base_lr=1e-3, steps=400, lr=3e-4,
             batch=32, seeds=(1, 2, 3), nfe=(8, 16, 32, 64, 128), num_samples=32, ppl_rows=128, ppl_t=2)
QUICK = Sizes(model=["model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.context=32",
                     "data.vocab_size=300"],
              base_steps=8, base_lr=1e-3, steps=3, lr=3e-4, batch=4, seeds=(1, 2), nfe=(4, 8), num_samples=8,
              ppl_rows=4, ppl_t=1)
SAMPLERS = ("ancestral", "remdm")


def train_run(out_dir: Path, overrides: list[str]) -> tuple[Path, float]:
    """Train (or reuse) one run; returns its folder and its training wall time in seconds."""
    from dlm.config import build_config
    from dlm.train.run import train

    timing = out_dir / "train_seconds.txt"
    if (out_dir / "model" / "config.json").is_file() and timing.is_file():
        return out_dir, float(timing.read_text())
    t0 = time.perf_counter()
    train(build_config([*overrides, f"trainer.out_dir={out_dir}"]))
    timing.write_text(f"{time.perf_counter() - t0:.1f}")
    return out_dir, float(timing.read_text())


RESULT_SETTINGS = ("quick", "base", "data", "p_sm", "remdm", "top_p", "train_free_omega_s")


def check_settings(work: Path, args) -> None:
    """The cached runs and results in `work` are reused only for the settings that made them: a re-run with other
    settings would otherwise report old numbers under new labels. The first run records them."""
    path = work / "settings.json"
    settings = {k: getattr(args, k) for k in RESULT_SETTINGS}
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = [k for k in RESULT_SETTINGS if saved.get(k) != settings[k]]
        if changed:
            raise SystemExit(f"{work} holds the runs and results of other settings ("
                             + ", ".join(f"{k}: {saved.get(k)!r} there, {settings[k]!r} now" for k in changed)
                             + "); use another --work folder, or delete that one to start over")
    else:
        path.write_text(json.dumps(settings, indent=1))


def quick_corpus(folder: Path) -> str:
    """A small text folder (slices of the embedded corpus) so that --quick trains its tokenizer in a blink."""
    from dlm.data import load_embedded_corpus

    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(load_embedded_corpus()[::20][:8]):
        (folder / f"doc{i}.txt").write_text(doc.text[5000:9000])
    return str(folder)


def training_stage(args, sizes: Sizes, work: Path) -> dict:
    """The base run and, per seed, the three continued runs. Returns {name: run folder} and times."""
    common = [*sizes.model, f"trainer.batch_size={sizes.batch}", "trainer.progress=false", "trainer.val_batches=0",
              "trainer.ema=0.99", f"data.source={args.data}"]
    runs, seconds = {}, {}
    if args.base:
        runs["base"], seconds["base"] = Path(args.base), 0.0
    else:
        runs["base"], seconds["base"] = train_run(work / "base", [
            *common, f"trainer.max_steps={sizes.base_steps}", f"optim.lr={sizes.base_lr}", "optim.decay=cosine",
            f"optim.warmup_steps={max(1, sizes.base_steps // 10)}",
            f"trainer.ckpt_every={max(1, sizes.base_steps // 4)}"])
    compute_steps = round(sizes.steps * (1 + args.p_sm / 3))
    variants = {"mdlm_steps": (sizes.steps, []), "mdlm_compute": (compute_steps, []),
                "sm": (sizes.steps, ["softmask.enabled=true", f"softmask.p_sm={args.p_sm}"])}
    for seed in sizes.seeds:
        for name, (steps, extra) in variants.items():
            runs[f"{name}/{seed}"], seconds[f"{name}/{seed}"] = train_run(work / f"{name}-s{seed}", [
                *common, f"init_from={runs['base']}", f"trainer.seed={seed}", f"trainer.max_steps={steps}",
                f"optim.lr={sizes.lr}", "optim.warmup_steps=10", f"trainer.ckpt_every={max(1, steps // 2)}", *extra])
    return {"runs": runs, "seconds": seconds, "compute_steps": compute_steps}


def sample_configs(sizes: Sizes) -> list[tuple[str, int, str, bool]]:
    """(variant, seed, sampler, SM at sampling) to evaluate: all rows for the first seed, the headline for all."""
    configs = []
    for i, seed in enumerate(sizes.seeds):
        for sampler in SAMPLERS:
            configs += [("sm", seed, sampler, True), ("mdlm_compute", seed, sampler, False)]
            if i == 0:
                configs += [("sm", seed, sampler, False), ("mdlm_compute", seed, sampler, True),
                            ("mdlm_steps", seed, sampler, False)]
    return configs


def evaluation_stage(args, sizes: Sizes, runs: dict, work: Path) -> list[dict]:
    import dlm
    from dlm.eval.reference import human_reference
    from experiments.softmask.scoring import random_eval_lm, sample_metrics, score_texts

    results_path = work / "results.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    have = {r["key"] for r in done}

    def record(row: dict) -> None:
        done.append(row)
        with open(results_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    base = dlm.load(runs["base"])
    length = base.context
    if args.quick:
        eval_lm = random_eval_lm(base.tokenizer, base.network.cfg.vocab_size, base.context)
    else:
        from dlm.eval.genppl import EvalLM

        eval_lm = EvalLM.smollm2()
    reference = human_reference(base, sizes.num_samples, length, args.data, "test")
    ref_feats = score_texts(reference, eval_lm)["features"]
    if "human" not in have:  # the ceiling: other held-out text (val split) against the reference
        human = human_reference(base, sizes.num_samples, length, args.data, "val")
        ids = [[base.tokenizer.bos_token_id, *base.encode(t)] for t in human]  # as samples: BOS + text
        record({"key": "human", "variant": "human", **sample_metrics(human, ids, eval_lm, ref_feats)})
        print(f"human text: {done[-1]}", flush=True)

    for name, path in runs.items():
        if f"ppl/{name}" in have:
            continue
        model = dlm.load(path)
        variant, _, seed = name.partition("/")
        row = {"key": f"ppl/{name}", "variant": variant, "seed": int(seed or 0)}
        for sm in ([False, True] if model.softmask is not None else [False]):
            p = model.perplexity(source=args.data, split="val", num_t_samples=sizes.ppl_t, max_rows=sizes.ppl_rows,
                                 softmask=sm)
            row["val_ppl_sm" if sm else "val_ppl"] = p["ppl"]
        if model.softmask is not None:
            row["omegas"] = model.softmask.omegas()
        record(row)
        print(row, flush=True)

    for variant, seed, sampler, sm in sample_configs(sizes):
        model = dlm.load(runs[f"{variant}/{seed}"])
        for nfe in sizes.nfe:
            key = f"gen/{variant}/{seed}/{sampler}/{'sm' if sm else 'plain'}/{nfe}"
            if key in have:
                continue
            softmask = False  # plain masks, also for a model trained with soft-masking (its default is on)
            if sm:
                softmask = True if model.softmask is not None else {"omega_s": args.train_free_omega_s}
            name = "ancestral" if sampler == "ancestral" else args.remdm
            t0 = time.perf_counter()
            gen = model.generate(num_samples=sizes.num_samples, length=length, sampler=name, steps=nfe,
                                 top_p=args.top_p, seed=10_000 + seed, batch_size=sizes.num_samples, softmask=softmask)
            row = {"key": key, "variant": variant, "seed": seed, "sampler": sampler, "sm": sm, "nfe": gen.nfe,
                   "steps": nfe, "sample_seconds": time.perf_counter() - t0,
                   **sample_metrics(gen.texts, gen.tokens.tolist(), eval_lm, ref_feats)}
            record(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, random evaluator: a smoke test in seconds")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="where the table and the plot go")
    parser.add_argument("--work", default=None, help="runs and cached results (default: runs/softmask, or "
                                                     "OUT/work with --quick)")
    parser.add_argument("--base", default=None, help="reuse this MDLM run as the base instead of training one")
    parser.add_argument("--data", default="embedded", help="data source (as data.source)")
    parser.add_argument("--p-sm", type=float, default=0.8)
    parser.add_argument("--remdm", default="remdm_loop", help="the ReMDM variant (remdm_cap, remdm_rescale, ...)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--train-free-omega-s", type=float, default=0.5,
                        help="w_s for SM sampling of the plain models (w_a, w_b at their initial values)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sizes = QUICK if args.quick else FULL
    out = Path(args.out)
    work = Path(args.work) if args.work else (out / "work" if args.quick else ROOT / "runs" / "softmask")
    work.mkdir(parents=True, exist_ok=True)
    check_settings(work, args)
    if args.quick and args.data == "embedded":
        args.data = quick_corpus(work / "data")
    from experiments.softmask.report import write_report

    t0 = time.perf_counter()
    trained = training_stage(args, sizes, work)
    t1 = time.perf_counter()
    results = evaluation_stage(args, sizes, trained["runs"], work)
    t2 = time.perf_counter()
    timing = {"train_seconds": t1 - t0, "eval_seconds": t2 - t1, "run_seconds": trained["seconds"]}
    md, png = write_report(results, sizes, args, trained, timing, out)
    print(f"wrote {md} and {png} ({(t2 - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
