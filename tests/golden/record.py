"""Record tests/golden/golden.json and tests/golden/legacy/ (run once, from the code before the refactor):

    python -m tests.golden.record

A change that is meant to change some recorded behaviour re-records only that, leaving everything else as it was
recorded (the legacy files are not retrained):

    python -m tests.golden.record --cases mdlm/ancestral/uncond prompted/none/count/t0.8   # these sampling cases
    python -m tests.golden.record --legacy-values    # what the stored legacy checkpoint/export generate and score
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from tests.golden import cases as G

LEGACY_RUN = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=32", "data.vocab_size=300",
              "trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.val_every=2", "trainer.val_batches=1",
              "trainer.batch_size=4", "trainer.progress=false", "trainer.ema=0.9", "softmask.enabled=true",
              "trainer.precision=32"]
LEGACY_TEXTS = "tests/golden/legacy/texts"


def write_tokenizer() -> None:
    from dlm.data import load_embedded_corpus
    from dlm.data.tokenizer import train_bpe

    if (G.HERE / "tokenizer" / "tokenizer.json").is_file():
        return
    tok = train_bpe([d.text for d in load_embedded_corpus()[::40]], vocab_size=300)
    tok.save_pretrained(str(G.HERE / "tokenizer"))


def legacy(tmp: Path) -> dict:
    """A soft-masking run with EMA (checkpoint and export) written by today's code, and what it generates."""
    from dlm.cli import main

    dest = G.HERE / "legacy"
    shutil.rmtree(dest, ignore_errors=True)
    run = tmp / "legacy"
    G.write_texts(dest / "texts")  # data.source is recorded relative to the repository root, where tests run
    assert main(["train", *LEGACY_RUN, f"data.source={LEGACY_TEXTS}", f"trainer.out_dir={run}"]) == 0
    for part in ("checkpoints", "model", "tokenizer"):
        shutil.copytree(run / part, dest / part, ignore=shutil.ignore_patterns("best.ckpt"))
    shutil.copy(run / "config.yaml", dest / "config.yaml")
    return _values_of(dest)


def _values_of(folder) -> dict:
    """What a soft-masking run folder's checkpoint and export generate and score (the golden "legacy" entry)."""
    from dlm.pipeline import load

    out = {}
    for name, path in (("ckpt", folder / "checkpoints" / "last.ckpt"), ("export", folder / "model")):
        model = load(path)
        gen = model.generate(num_samples=2, length=24, steps=8, seed=1, softmask=True, sampler="ancestral",
                             precision="32")
        out[name] = {"tokens": gen.tokens.tolist(), "nfe": gen.nfe,
                     "nelbo": model.nelbo(_batch(model), num_t_samples=2, seed=0, precision="32")}
    return out


def _batch(model):
    from dlm.data.batch import make_batch

    ids = torch.tensor([model.encode("In the beginning God created the heaven and the earth, and the")[:31]])
    return make_batch(torch.cat([torch.tensor([[model.tokenizer.bos_token_id]]), ids], 1), None)


def legacy_values() -> dict:
    """What the stored legacy checkpoint and export generate and score today (the files themselves unchanged)."""
    return _values_of(G.HERE / "legacy")


def rerecord(case_ids: list[str], legacy_too: bool) -> None:
    """Re-record the listed sampling cases (and the legacy values) in golden.json; print what changed."""
    torch.set_num_threads(1)
    golden = json.loads(G.GOLDEN.read_text())
    models, cases = G.models(), G.cases()
    for cid in case_ids:
        new = G.run_or_refuse(models, cases[cid])
        print(f"{cid}: {'changed' if new != golden['sampling'].get(cid) else 'unchanged'}")
        golden["sampling"][cid] = new
    if legacy_too:
        new = legacy_values()
        for name in new:
            print(f"legacy/{name}: {'changed' if new[name] != golden['legacy'][name] else 'unchanged'}")
        golden["legacy"] = new
    G.GOLDEN.write_text(json.dumps(golden, indent=0, sort_keys=True))


def main() -> None:
    import sys

    args = sys.argv[1:]
    if args:
        cases = args[args.index("--cases") + 1:] if "--cases" in args else []
        rerecord([c for c in cases if not c.startswith("--")], "--legacy-values" in args)
        return
    torch.set_num_threads(1)
    write_tokenizer()
    models = G.models()
    golden = {"sampling": {cid: G.run_or_refuse(models, case) for cid, case in G.cases().items()}}
    with tempfile.TemporaryDirectory() as tmp:
        golden["training"] = {run: G.train_losses(run, Path(tmp)) for run in G.TRAIN_RUNS}
        golden["legacy"] = legacy(Path(tmp))
    G.GOLDEN.write_text(json.dumps(golden, indent=0, sort_keys=True))
    print(f"{len(golden['sampling'])} sampling cases, {len(golden['training'])} training runs -> {G.GOLDEN}")


if __name__ == "__main__":
    main()
