"""Golden behaviour: tokens and NFE of every sampler on tiny fixed-seed networks, and the first training losses
of every process. Recorded once from the code before the architecture refactor (issue 12) by
`python -m tests.golden.record`; `tests/test_golden.py` checks that today's code reproduces them exactly.

The networks are random (seeded, std 0.3 so predictions depend strongly on the context); the tokenizer is a
300-token BPE stored beside this file. Everything runs in float32 (bf16 autocast would make the numbers depend
on the CPU). `run_case` is the only place that calls the generation API: when the API
changes, it changes here and the recorded numbers must not.
"""

from __future__ import annotations

from pathlib import Path

import torch

HERE = Path(__file__).parent
GOLDEN = HERE / "golden.json"

PROMPT = "And the king said unto"
TEMPLATE = "In the beginning [MASK*6] and the earth [MASK*4]."
PROMPTS = ["And the king said unto", "The Lord"]


def tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(HERE / "tokenizer"))


def network(vocab_size: int, seed: int):
    from dlm.config import ModelConfig
    from dlm.network import Transformer

    torch.manual_seed(seed)
    net = Transformer(ModelConfig(n_layer=2, n_head=2, d_model=32, context=32, vocab_size=vocab_size))
    with torch.no_grad():
        for _, p in net.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
    return net.eval()


def models() -> dict:
    """name -> DiffusionLM: mdlm, bd3lm (block 8), ar, sm (MDLM with a learned soft-masking mixer)."""
    from dlm.build import build_process
    from dlm.config import build_config
    from dlm.pipeline import DiffusionLM
    from dlm.softmask import SoftMaskMixer
    from dlm.softmask.process import SoftMaskedDiffusion

    tok = tokenizer()
    out = {}
    for name, seed, overrides in (("mdlm", 0, []), ("bd3lm", 1, ["process=bd3lm", "process.block_size=8"]),
                                  ("ar", 2, ["process=ar"]), ("sm", 0, ["softmask.enabled=true"])):
        cfg = build_config(["model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.context=32",
                            "data.vocab_size=300", *overrides])
        cfg.model.vocab_size = len(tok)
        process = build_process(cfg, tok.mask_token_id)
        if name == "sm":
            process = SoftMaskedDiffusion(process.plain, SoftMaskMixer(3, 0.6, 1.0, -8.0))
        out[name] = DiffusionLM(network(len(tok), seed), process, tok, cfg)
    return out


SAMPLERS = ["ancestral", "ancestral_cache", "first_hitting", "remdm_cap", "remdm_rescale", "remdm_conf", "remdm_loop",
            "llada", "blockwise"]
FEEDBACK = {"omega_s": 0.7, "omega_a": 1.0, "omega_b": -8.0, "schedule": "linear"}  # strong: a random net has high entropy


def cases() -> dict[str, dict]:
    """case id -> keyword description of one generation."""
    out = {}
    for s in SAMPLERS:
        opts = {"block_length": 8} if s == "blockwise" else {}
        for mode in ("uncond", "prompt", "infill"):
            out[f"mdlm/{s}/{mode}"] = dict(model="mdlm", sampler=s, mode=mode, options=opts)
        out[f"mdlm/{s}/uncond/sm"] = dict(model="mdlm", sampler=s, mode="uncond", options=opts, softmask=FEEDBACK)
        out[f"sm/{s}/prompt/learned"] = dict(model="sm", sampler=s, mode="prompt", options=opts, softmask=True)
    out["mdlm/ancestral/long"] = dict(model="mdlm", sampler="ancestral", mode="long")
    out["mdlm/ancestral_cache/long"] = dict(model="mdlm", sampler="ancestral_cache", mode="long")
    out["mdlm/blockwise/infill"]["options"] = {"block_length": 8}
    for s in ("ancestral_cache", "first_hitting", "ancestral"):
        out[f"bd3lm/{s}/uncond"] = dict(model="bd3lm", sampler=s, mode="uncond")
        out[f"bd3lm/{s}/prompt"] = dict(model="bd3lm", sampler=s, mode="prompt")
    out["bd3lm/ancestral_cache/long"] = dict(model="bd3lm", sampler="ancestral_cache", mode="long")
    for mode in ("uncond", "prompt"):
        out[f"ar/{mode}"] = dict(model="ar", sampler="ancestral", mode=mode)
    # Prompted (LLaDA / Fast-dLLM) generation, batched with left padding.
    for cache in ("none", "prefix", "dual"):
        for policy in ({}, {"threshold": 0.3}, {"factor": 1.0}):
            key = "count" if not policy else next(iter(policy))
            out[f"prompted/{cache}/{key}"] = dict(model="mdlm", prompted=True, cache=cache, block_length=8, steps=16,
                                                  **policy)
    out["prompted/none/count/t0.8"] = dict(model="mdlm", prompted=True, cache="none", block_length=8, steps=16,
                                           temperature=0.8)
    out["prompted/dual/cfg"] = dict(model="mdlm", prompted=True, cache="dual", block_length=8, steps=16, cfg_scale=1.0)
    out["prompted/prefix/sm"] = dict(model="sm", prompted=True, cache="prefix", block_length=8, steps=16,
                                     softmask=True)
    out["prompted/none/margin"] = dict(model="mdlm", prompted=True, cache="none", block_length=16, steps=8,
                                       remasking="margin", temperature=0.5)
    return out


def run_case(models: dict, case: dict) -> dict:
    """Run one case with today's API: {"tokens": list of rows, "nfe": network calls}."""
    model = models[case["model"]]
    if case.get("prompted"):
        kw = {k: v for k, v in case.items() if k not in ("model", "prompted")}
        out = model.generate_prompted(PROMPTS, gen_length=16, seed=3, precision="32", **kw)
        return {"tokens": out.tokens[:, -16:].tolist(), "nfe": out.nfe, "row_calls": out.row_calls}
    mode = case["mode"]
    kw = dict(num_samples=2, sampler=case["sampler"], steps=8, seed=5, precision="32", temperature=1.0, top_p=1.0,
              softmask=case.get("softmask"), sampler_options=dict(case.get("options") or {}))
    if mode == "uncond":
        kw["length"] = 24
    elif mode == "prompt":
        kw.update(length=24, prompt=PROMPT)
    elif mode == "infill":
        kw["template"] = TEMPLATE
    elif mode == "long":
        kw.update(length=56, stride=16)
    if case["sampler"] == "blockwise" or model.process.block_size is not None:  # block by block
        kw["steps"] = 8 * _blocks_to_generate(model, kw, case)  # recorded with 8 steps per block; steps is now the total
    from dlm.sampler.registry import sampler_spec

    takes = sampler_spec(model.sampler_name(kw["sampler"])).options  # generate refuses what the sampler does not
    for key in ("steps", "temperature", "top_p"):  # take; recorded when it dropped them silently (same tokens)
        if key not in takes:
            kw.pop(key)
    out = model.generate(**kw)
    return {"tokens": out.tokens.tolist(), "nfe": out.nfe}


def _blocks_to_generate(model, kw: dict, case: dict) -> int:
    """Blocks of the generation's canvas with something to generate."""
    block = (case.get("options") or {}).get("block_length") or model.process.block_size
    from dlm.generation import template_canvas

    if kw.get("template"):
        _, fixed = template_canvas(kw["template"], model.encode, [0], 0)
    else:
        given = 1 + len(model.encode(kw["prompt"])) if kw.get("prompt") else 1  # BOS (+ the prompt)
        fixed = [True] * given + [False] * ((kw.get("length") or model.context) - given)
    return sum(1 for s in range(0, len(fixed), block) if not all(fixed[s:s + block]))


def run_or_refuse(models: dict, case: dict) -> dict:
    """`run_case`, or {"error": class name} for a combination that is refused (the refusal is behaviour too)."""
    try:
        return run_case(models, case)
    except ValueError as e:
        return {"error": type(e).__name__}


# ------------------------------------------------------------------------------------------ training
TRAIN_RUNS = {"mdlm": [], "ar": ["process=ar"], "bd3lm": ["process=bd3lm", "process.block_size=8"],
              "sm": ["softmask.enabled=true", "softmask.p_sm=0.5"],
              "mdlm_acc2_tc": ["trainer.accumulate=2", "model.time_conditioning=true", "process.schedule=cosine"]}


def train_args(text_folder: Path, out_dir: Path) -> list[str]:
    return ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.context=32", "data.vocab_size=300",
            "trainer.max_steps=20", "trainer.ckpt_every=10", "trainer.val_every=10", "trainer.val_batches=1",
            "trainer.batch_size=4", "trainer.progress=false", "trainer.ema=0.9", "trainer.precision=32",
            f"data.source={text_folder}",
            f"trainer.out_dir={out_dir}"]


def write_texts(folder: Path) -> Path:
    """The training texts: 8 slices of the embedded corpus (as tests/conftest.py's text_folder)."""
    from dlm.data import load_embedded_corpus

    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(load_embedded_corpus()[::20][:8]):
        (folder / f"doc{i}.txt").write_text(doc.text[5000:7500])
    return folder


def train_losses(run: str, tmp: Path) -> dict:
    """Train one 20-step run in-process; its logged training losses by step and its validation NLLs."""
    from dlm.cli import main
    from dlm.train.callbacks import read_metrics

    out = tmp / run
    assert main(["train", *train_args(write_texts(tmp / "texts"), out), *TRAIN_RUNS[run]]) == 0
    metrics = read_metrics(out / "logs")
    return {"train/loss": {str(k): v for k, v in sorted(metrics["train/loss"].items())},
            "val/nll": {str(k): v for k, v in sorted(metrics.get("val/nll", {}).items())}}
