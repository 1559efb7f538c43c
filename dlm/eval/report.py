"""`dlm eval`: perplexity of each model on held-out text, and optionally generative perplexity and entropy of
its samples, as rows of one table."""

from __future__ import annotations

import time


def load_eval_lm(spec: str):
    """The evaluation LM: "smollm2", "gemma3" (Gemma 3 270M), "dlm:PATH" (a dlm autoregressive model) or a Hugging
    Face causal LM."""
    from dlm.eval.genppl import EvalLM

    if spec == "smollm2":
        return EvalLM.smollm2()
    if spec == "gemma3":
        return EvalLM.gemma3()
    if spec.startswith("dlm:"):
        from dlm.pipeline import load

        return EvalLM.from_dlm(load(spec[4:]), name=spec)
    from pathlib import Path

    looks_like_path = spec.startswith((".", "~", "/")) or Path(spec).expanduser().exists() or spec.count("/") > 1
    if looks_like_path and not Path(spec).expanduser().is_dir():
        raise ValueError(f"--eval-model {spec}: no such folder; give smollm2, gemma3, a folder holding a Hugging "
                         "Face causal LM, or dlm:PATH for a dlm autoregressive model")
    try:
        return EvalLM.from_pretrained(str(Path(spec).expanduser()) if looks_like_path else spec)
    except (OSError, ValueError, KeyError) as e:  # transformers: missing files, no network for a Hub id, ...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"--eval-model {spec} could not be loaded ({first}); give smollm2, a folder holding a "
                         "Hugging Face causal LM, or dlm:PATH") from None


def evaluate_models(args) -> list[dict]:
    from dlm.pipeline import load
    from dlm.data.entropy import mean_sample_entropy
    from dlm.eval.genppl import generative_perplexity
    from dlm.sampler.registry import sampler_spec
    from dlm.progress import emit
    from dlm.progress import resolve as resolve_progress

    want_mauve = getattr(args, "mauve", False)
    progress = getattr(args, "progress", "auto")  # per batch: a bar on a terminal, plain lines in a log
    eval_lm = load_eval_lm(args.eval_model) if args.gen_ppl or want_mauve else None
    rows = []
    for path in args.models:
        model = load(path, dtype=getattr(args, "dtype", None))
        row = {"model": str(path), "process": model.process.name, "params": model.network.num_params(False)}
        if getattr(args, "dtype", None) not in (None, "auto"):  # asked for: the table shows it
            row["dtype"] = model.weight_dtype
        if resolve_progress(progress) != "off":  # which model the progress lines below are about
            emit(f"eval: {path} ({model.process.name})")
        if model.trained_steps is not None:  # a run a time budget stopped early is not comparable at face value
            row["steps"] = model.trained_steps
        t0 = time.perf_counter()
        ppl = model.perplexity(source=args.source, split=args.split, num_t_samples=args.num_t_samples,
                               seed=args.seed, batch_size=args.batch_size, max_rows=args.max_rows, progress=progress,
                               iw_orders=0 if model.is_autoregressive else getattr(args, "iw_orders", 0) or 0)
        row.update({f"val_{k}": v for k, v in ppl.items()}, val_seconds=time.perf_counter() - t0)
        if eval_lm is not None:
            softmask, feedback = getattr(args, "softmask_kw", None), getattr(args, "feedback_kw", None)
            fed = model.feedback_for(softmask, feedback)  # what the sampler is fed (the model's own by default)
            sampler = args.sampler or model.process.default_sampler  # each model's own unless one is named
            options = {**(getattr(args, "sampler_kw", None) or {}),
                       **model.sampler_options(sampler, getattr(args, "option", None) or [])}
            takes_steps = "steps" in sampler_spec(model.sampler_name(sampler)).options
            steps = None if "steps" in options else args.steps if args.steps is not None else 128 if takes_steps else None
            gen = model.generate(num_samples=args.num_samples, sampler=sampler, steps=steps,
                                 top_p=args.top_p, seed=args.seed, softmask=softmask, feedback=feedback,
                                 sampler_options=options,
                                 progress=progress)
            g = generative_perplexity(gen.texts, eval_lm, progress=progress)
            row.update(gen_ppl=g["gen_ppl"], eval_model=g["eval_model"],
                       entropy=mean_sample_entropy(gen.tokens.tolist()), nfe=gen.nfe,
                       tokens_per_s=gen.tokens_per_second, sampler="autoregressive" if model.is_autoregressive
                       else f"{sampler}/{options.get('steps', steps)}"
                       + ("" if fed is None else "+" + getattr(fed, "short", "FB")),
                       num_samples=args.num_samples)
            if want_mauve:
                from dlm.eval.mauve import mauve_score
                from dlm.eval.reference import human_reference

                refs = human_reference(model, args.num_samples, gen.tokens.shape[1], args.source, args.split)
                m = mauve_score(refs, gen.texts, eval_lm)
                row.update(mauve=m["mauve"], mauve_buckets=m["num_buckets"])
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    cols = [("model", "model", "{}"), ("process", "process", "{}"), ("params", "params", "{:,}"),
            ("dtype", "dtype", "{}"), ("steps", "steps", "{:,}"),
            ("val_ppl", "val ppl", "{:.2f}"), ("val_likelihood", "ppl is", "{}"), ("val_iw_ppl", "iw ppl", "{:.2f}"),
            ("val_ao_ppl", "ao ppl", "{:.2f}"), ("val_num_tokens", "tokens", "{:,}"),
            ("gen_ppl", "gen ppl", "{:.1f}"), ("entropy", "entropy", "{:.2f}"), ("mauve", "MAUVE", "{:.3f}"),
            ("nfe", "NFE", "{}"),
            ("tokens_per_s", "tok/s", "{:.0f}")]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    cells = [[fmt.format(r[key]) if key in r else "" for key, _, fmt in cols] for r in rows]
    widths = [max(len(head), *(len(c[i]) for c in cells)) for i, (_, head, _) in enumerate(cols)]
    print("  ".join(head.ljust(w) for (_, head, _), w in zip(cols, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    r0 = rows[0]
    mc = next((r for r in rows if r.get("val_likelihood") != "exact"), None)  # a Monte Carlo row: its settings
    notes = [f"perplexity on the '{r0['val_split']}' split; 'ppl is': exact (an AR model's NLL), bound (a NELBO: "
             "an upper bound) or estimate (neither)"]
    if mc is not None:
        notes[0] += f"; bounds and estimates use {mc['val_num_t_samples']} time samples per sequence (seed {mc['val_seed']})"
    iw = next((r for r in rows if "val_iw_orders" in r), None)
    if iw is not None:
        notes.append(f"iw ppl: the any-order likelihood estimated with {iw['val_iw_orders']} orders per sequence "
                     "(importance-weighted: above the exact perplexity in expectation, tending to it as the orders "
                     "grow); ao ppl: the mean single-order NLL (L_AO, a bound)")
    if "eval_model" in r0:
        notes.append(f"generative perplexity by {r0['eval_model']} on {r0['num_samples']} samples; entropy = mean "
                     "unigram entropy of each sample's token ids (low = repetitive)")
    if "mauve" in r0:
        notes.append(f"MAUVE of {r0['num_samples']} samples against as many held-out '{r0['val_split']}' texts of the "
                     f"same token length, features from {r0['eval_model']} ({r0['mauve_buckets']} k-means buckets)")
    for n in notes:
        print("  * " + n)
