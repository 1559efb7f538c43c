"""dlm: diffusion language models — MDLM, soft-masking, block diffusion — trained, sampled and evaluated
on a laptop CPU or a GPU cluster.

Layout: `network/` (backbones), `process/` (noising and objectives), `sampler/` (denoising loops),
`softmask/` (soft-masking), `train/` (Lightning engine), `eval/` (metrics), `data/` (corpus, tokenizers, packing),
`pipeline.py` (`dlm.load` -> `DiffusionLM`), `config.py` (typed configs), `checkpoint.py`, `precision.py`,
`memory.py`, `cli.py`.
"""

__version__ = "0.1.0"

# Importing dlm changes nothing process-wide: the allocator tuning (dlm/allocator.py) is applied by the `dlm` command
# and by training, not by this import.


def load(path, device: str = "cpu", **kw):
    """Load a model (run folder, exported folder, .ckpt, open checkpoint folder or .gguf) as a `DiffusionLM`;
    keywords as `DiffusionLM.load`: use_ema, tokenizer, dtype ("float32" / "bfloat16" / "float16" / "auto")."""
    from dlm.pipeline import load as _load

    return _load(path, device=device, **kw)


__all__ = ["load", "__version__"]
