"""`train(cfg)`: wire the network, process, data and Lightning Trainer together for one run.

A run lives in `cfg.trainer.out_dir`: config.yaml, tokenizer/, checkpoints/ (last.ckpt, best.ckpt),
logs/ (CSV), loss_curve.png, and model/ (exported weights, Hugging Face style). Restarting the same
command in the same folder resumes exactly from checkpoints/last.ckpt.
"""

from __future__ import annotations

import dataclasses
import warnings
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dlm.allocator import keep_freed_memory
from dlm.build import build_network
from dlm.checkpoint import AtomicCheckpointIO, CheckpointError, read_checkpoint, save_pretrained
from dlm.config import ConfigError, RunConfig, to_yaml
from dlm.guards import check_accelerator
from dlm.precision import cpu_has_fast_bf16, use_bf16
from dlm.process.base import LIKELIHOOD_WORDS
from dlm.progress import resolve as resolve_progress
from dlm.train.adapt import check_init_process, is_causal_lm_spec, load_causal_lm
from dlm.train.lora import add_lora, has_lora, merged_state
from dlm.train.clip_search import adopt_saved_interval, run_clip_search
from dlm.train.callbacks import LossCurvePlot, PlainProgress, ProgressBar, StepTimer, Throughput
from dlm.train.data_module import TextDataModule, build_tokenizer, resolve_data
from dlm.train.durable import DurableCSVLogger, StepCheckpoint, truncate_logs
from dlm.train.lit_module import DiffusionLightningModule


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning's precision for trainer.precision: "auto" is bf16 autocast on GPUs that support it and on CPUs
    with bf16 instructions (dlm/precision.py), full fp32 elsewhere."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        device_type = "cuda"
    else:
        device_type = "cpu"
    if precision == "bf16" and device_type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn("trainer.precision=bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX): PyTorch "
                      "emulates bf16 there, many times slower than float32; use trainer.precision=auto", stacklevel=2)
    return "bf16-mixed" if use_bf16(precision, device_type) else "32-true"


def training_minutes(ckpt: dict) -> float:
    """Training time (minutes) that a checkpoint's run has used, summed over resumes, from the state of
    Lightning's Timer callback (every run keeps one; 0 for a checkpoint without it)."""
    timer = (ckpt.get("callbacks") or {}).get("Timer") or {}
    return float(timer.get("time_elapsed", {}).get("train", 0.0)) / 60.0


# What a resumed run must share with the run that wrote the checkpoint: the network, the objective, the data and
# the optimizer (their state is restored as it was), and everything the data order depends on (the batch of step k
# is a function of the seed, the batch size, the accumulation and the number of devices). trainer.max_steps may
# change (the learning-rate schedule follows it), and so may validation, checkpointing, logging and the budget.
RESUME_MUST_MATCH = {"model": None, "process": None, "data": None, "softmask": None, "optim": None,
                     "trainer": ("batch_size", "accumulate", "seed", "devices", "num_nodes", "lora_rank", "lora_alpha",
                                 "lora_embeddings")}


def _check_resumable(cfg: RunConfig, ckpt: dict, path: Path) -> None:
    saved = RunConfig.from_dict(ckpt["dlm"]["config"])
    if saved.process.mask_id < 0:  # written before the mask id was recorded: it was the tokenizer's
        saved.process.mask_id = cfg.process.mask_id
    for group, fields in RESUME_MUST_MATCH.items():
        a, b = dataclasses.asdict(getattr(saved, group)), dataclasses.asdict(getattr(cfg, group))
        diff = [k for k in (fields or a) if a[k] != b[k]]
        if diff:
            k = diff[0]
            raise ConfigError(f"{path} was trained with {group}.{k}={a[k]!r} but this run asks for {b[k]!r}; "
                              "resume with the same settings, or start a new run with another trainer.out_dir "
                              "(init_from=<this run> starts one from its weights)")


def train(cfg: RunConfig, stop=None) -> Path:
    """Train (or resume) one run; returns the run folder. The folder is locked while the run writes it
    (dlm/train/lock.py): a second `dlm train` on it gets a clear error. SIGTERM or SIGINT stops the run at the next
    optimizer-step boundary with a checkpoint and raises `RunStopped` (dlm/train/stop.py), the lock released.
    stop: a `StopSignals` already installed by the caller (the CLI keeps its handlers until the process exits),
    else one installed for the call."""
    from contextlib import nullcontext

    from dlm.train.lock import RunLock
    from dlm.train.stop import StopSignals

    keep_freed_memory()  # reuse freed tensor memory instead of page-faulting it in again (dlm/allocator.py)
    check_accelerator(cfg.trainer.accelerator, cfg.trainer.devices)
    run_dir = Path(cfg.trainer.out_dir)
    for folder in (run_dir, *run_dir.parents):  # the nearest existing one must be a folder
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise ConfigError(f"trainer.out_dir={run_dir}: {folder} is a file, not a folder; set trainer.out_dir "
                                  "to a new folder or to an existing run's folder")
            break
    with (nullcontext(stop) if stop is not None else StopSignals()) as stop, RunLock(run_dir):
        from dlm.integrity import remove_stale_stages

        for folder in (run_dir, run_dir / "checkpoints", run_dir / "model"):  # temp files of a killed run
            remove_stale_stages(folder)
        for leftover in (run_dir / "checkpoints").glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        return _train(cfg, run_dir, stop)


def _adopt_tokenizer(cfg: RunConfig, source: RunConfig, where) -> None:
    """A run started from another model's weights (init_from) uses that model's tokenizer: the config records it,
    and a data.tokenizer that asks for another one is an error, not silently ignored."""
    default = RunConfig().data.tokenizer
    if cfg.data.tokenizer not in (default, source.data.tokenizer):
        raise ConfigError(f"init_from={cfg.init_from} brings its own tokenizer (data.tokenizer="
                          f"{source.data.tokenizer!r}, from {where}) but this run asks for data.tokenizer="
                          f"{cfg.data.tokenizer!r}; leave data.tokenizer out (the weights only fit their own tokenizer)")
    cfg.data.tokenizer, cfg.data.vocab_size = source.data.tokenizer, source.data.vocab_size


def _train(cfg: RunConfig, run_dir: Path, stop=None) -> Path:
    from dlm.checkpoint import tokenizer_from_state
    from dlm.integrity import check_tokenizer, save_tokenizer_dir, write_atomic

    t = cfg.trainer
    resolve_data(cfg)  # a task's pair folder: the task's tokenizer
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    resume = last.is_file()
    init_state = init_process = ckpt = None
    if resume:
        ckpt = read_checkpoint(last)
        if not (run_dir / "tokenizer").is_dir():  # restored from the checkpoint, which holds the run's tokenizer
            state, fingerprint = ckpt["dlm"]["tokenizer"], ckpt["dlm"].get("tokenizer_fingerprint", "")
            save_tokenizer_dir(tokenizer_from_state(state, fingerprint), run_dir / "tokenizer")
    if cfg.init_from and not resume:
        if is_causal_lm_spec(cfg.init_from):  # adaptation of a causal LM (dlm/train/adapt.py)
            init = load_causal_lm(cfg.init_from, cfg.model.context, cfg.data.vocab_size)
            init_state, init_process = init.state, {}
            if cfg.process.mask_id < 0:
                cfg.process.mask_id = init.cfg.process.mask_id
        else:
            from dlm.pipeline import DiffusionLM  # continued training: weights and tokenizer of another model

            init = DiffusionLM.load(cfg.init_from)
            check_init_process(cfg, init.cfg)  # not an AR model into a diffusion run
            init_state, init_process = init.network.state_dict(), init.process.state_dict()
        _adopt_tokenizer(cfg, init.cfg, cfg.init_from)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_tokenizer_dir(init.tokenizer, run_dir / "tokenizer")
        cfg.model = dataclasses.replace(init.cfg.model)  # the network must match the weights it starts from
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(cfg, run_dir)  # the run's own tokenizer once it has one (resume, init_from)
    # An adapted causal LM may have more embedding rows than tokens (padded vocabularies): the network keeps them.
    cfg.model.vocab_size = max(len(tokenizer), cfg.model.vocab_size) if cfg.init_from else len(tokenizer)
    if cfg.process.mask_id < 0:  # recorded with the model from now on: loading never asks the tokenizer for it
        cfg.process.mask_id = tokenizer.mask_token_id
    if resume:
        check_tokenizer(tokenizer, ckpt["dlm"].get("tokenizer_fingerprint", ""), run_dir / "tokenizer",
                        f"delete {run_dir / 'tokenizer'} and run the same command again (it is restored from {last})")
        if cfg.init_from:  # the network and tokenizer were taken from the init model when the run started: keep them
            saved = RunConfig.from_dict(ckpt["dlm"]["config"])
            _adopt_tokenizer(cfg, saved, last)
            cfg.model = saved.model
        if getattr(cfg.process, "clip_search", False):  # (bd3lm) the interval was chosen when the run started: keep it, no second search
            adopt_saved_interval(cfg, ckpt["dlm"]["config"])
        _check_resumable(cfg, ckpt, last)
        spent = training_minutes(ckpt)
        if 0 < t.max_minutes <= spent:  # Lightning would run one more step before its timer stops it again
            print(f"dlm: {last} has used its trainer.max_minutes={t.max_minutes:g} budget ({spent:.1f} min, step "
                  f"{ckpt['global_step']} of {t.max_steps}); raise trainer.max_minutes (or set 0) to train on",
                  flush=True)
            return run_dir

    from dlm.data.tokenizer import tokenizer_fingerprint

    write_atomic(run_dir / "config.yaml", to_yaml(cfg))

    L.seed_everything(t.seed, workers=True, verbose=False)
    module = DiffusionLightningModule(cfg, tokenizer, tokenizer_fingerprint(tokenizer))
    if init_state is not None:
        module.network.load_state_dict(init_state)
        # e.g. learned soft-masking w: continue from them too
        if init_process and init_process.keys() == module.process.state_dict().keys():
            module.process.load_state_dict(init_process)
    if t.lora_rank > 0:  # on top of the initial weights (the adapters start at zero); resume loads them
        add_lora(module.network, t.lora_rank, t.lora_alpha, t.lora_embeddings)
    if init_state is not None or t.lora_rank > 0:
        for name, target in (("ema", module.network), ("ema_process", module.process)):
            if getattr(module, name) is not None:  # the EMA starts from the weights the run starts from
                setattr(module, name, type(module.ema)(target, t.ema))
    if getattr(cfg.process, "clip_search", False):  # bd3lm: the training mask-rate interval, chosen on validation batches
        run_clip_search(cfg, module, tokenizer, run_dir)
    if t.compile:  # in place: parameter names (EMA, checkpoints, export) stay those of the plain network
        module.network.compile()
    data = TextDataModule(cfg, tokenizer)

    strategy = t.strategy
    if strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        if module.ema is not None:
            warnings.warn("EMA weights are not kept under FSDP (parameters are sharded); trainer.ema is ignored")
            module.ema = module.ema_process = None
        strategy = FSDPStrategy()
    accumulate = t.accumulate
    val_interval = min(t.val_every, t.max_steps) * accumulate
    callbacks = [
        Throughput(),
        LossCurvePlot(run_dir / "logs", run_dir / "loss_curve.png", module.process.likelihood),
        # Training time, kept in the checkpoint and summed over resumes; with trainer.max_minutes also the budget.
        StepTimer(timedelta(minutes=t.max_minutes) if t.max_minutes > 0 else None),
    ]
    if t.val_batches > 0:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/ppl", mode="min",
                                         save_top_k=1, enable_version_counter=False, save_last=False))
    # last.ckpt at optimizer-step boundaries only, after best.ckpt when the step is validated (dlm/train/durable.py)
    callbacks.append(StepCheckpoint(last, t.ckpt_every, stop))  # also the stop at a SIGTERM/SIGINT
    progress = resolve_progress(t.progress)  # bar on a terminal, plain lines in a log (dlm/progress.py)
    if progress != "off":
        callbacks.append(ProgressBar(refresh_rate=1) if progress == "bar" else PlainProgress(t.progress_every))
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=resolve_precision(t.precision, t.accelerator), max_steps=t.max_steps, max_epochs=-1,
        accumulate_grad_batches=accumulate, gradient_clip_val=cfg.optim.grad_clip or None,
        val_check_interval=val_interval if t.val_batches > 0 else None, check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches if t.val_batches > 0 else 0, num_sanity_val_steps=0,
        logger=_make_logger(t.logger, run_dir), callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress == "bar", enable_model_summary=False, use_distributed_sampler=False,
        log_every_n_steps=1, default_root_dir=run_dir,
    )
    n_params = module.network.num_params(non_embedding=False)
    why = ""
    if trainer.strategy.root_device.type == "cpu" and t.precision == "auto":
        why = " (this CPU has bf16 instructions)" if cpu_has_fast_bf16() else " (this CPU has no bf16 instructions)"
    what = cfg.process.name + (" + soft-masking" if cfg.softmask.enabled else "")
    what += f"; validation perplexity {LIKELIHOOD_WORDS[module.process.likelihood]}"
    print(f"dlm: {'resuming' if resume else 'training'} {what} ({n_params / 1e6:.1f}M parameters, "
          f"vocab {cfg.model.vocab_size}, context {cfg.model.context}) for {t.max_steps} steps on "
          f"{trainer.accelerator.__class__.__name__.replace('Accelerator', '').lower()} x {trainer.num_devices}, "
          f"precision {trainer.precision}{why}, in {run_dir}" + (f" from {last}" if resume else ""), flush=True)
    if trainer.is_global_zero:  # rows a killed run logged after its last checkpoint (or before a first) are redone
        truncate_logs(run_dir / "logs", int(ckpt["global_step"]) if resume else 0)
    if resume:  # instead of Lightning's "dataloader is not resumable" warning, which does not apply to dlm
        print(f"dlm: the resume is exact: the batch of every step is a function of (trainer.seed, step, rank) "
              f"(dlm/train/data_module.py), so steps {ckpt['global_step']}+ see the data they would have seen",
              flush=True)
    with warnings.catch_warnings():  # Lightning's resume warnings: the folder holds the run's own checkpoints, and
        for message in (r".*your dataloader is not resumable",  # the data order is a function of the step
                        r"Checkpoint directory .* exists and is not empty",
                        r"You're resuming from a checkpoint that ended before the epoch ended"):
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume else None, weights_only=True)
    if stop is not None:  # from here (the export) a signal is only recorded: the run completes
        stop.in_training = True  # (a run resumed at its last step never started training: not set by the callback)
    if stop is not None and stop.requested:  # a signal during the last step's save: saved, the export left
        from dlm.train.stop import RunStopped

        raise RunStopped(stop.signum, trainer.global_step, t.max_steps)
    timer = next(c for c in trainer.callbacks if isinstance(c, StepTimer))
    if trainer.is_global_zero:
        print(f"dlm: step {trainer.global_step} of {t.max_steps}, {timer.time_elapsed('train') / 60:.1f} min of training "
              "in all (summed over resumes)", flush=True)
    if t.max_minutes > 0 and trainer.global_step < t.max_steps and not trainer.interrupted:
        print(f"dlm: stopped by trainer.max_minutes={t.max_minutes:g} at step {trainer.global_step} of {t.max_steps}; "
              "run the same command with a larger trainer.max_minutes (or 0) to continue", flush=True)
    if trainer.is_global_zero:
        export(module, run_dir / "model")
    return run_dir


def export(module: DiffusionLightningModule, folder: Path) -> Path:
    """Export the EMA weights and w (or the live ones without EMA) with config and tokenizer."""
    module.swap_in_ema()
    try:
        network = module.network
        if has_lora(network):  # the adapters merged into plain weights: the export is an ordinary network
            network = build_network(module.cfg)
            network.load_state_dict(merged_state(module.network))
        return save_pretrained(folder, network, module.cfg.to_dict(), module.tokenizer,
                               extra={"tokenizer_fingerprint": module.fingerprint,
                                      "trained_steps": int(module.global_step)}, process=module.process)
    finally:
        module.swap_out_ema()


def _make_logger(name: str, run_dir: Path):
    if name == "csv":
        # One folder per invocation (logs/part-000, part-001 after a resume, ...): a resumed run must not
        # overwrite the metrics of the part before it. Readers merge the parts, later ones winning.
        part = len(list((run_dir / "logs").glob("part-*")))
        return DurableCSVLogger(run_dir, name="logs", version=f"part-{part:03d}")
    try:
        if name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            return TensorBoardLogger(run_dir, name="logs", version="")
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(save_dir=str(run_dir), project="dlm")
    except ModuleNotFoundError as e:  # Lightning's loggers import their package lazily
        package = "tensorboard" if name == "tensorboard" else "wandb"
        raise ConfigError(f"trainer.logger={name} needs the '{package}' package, which is not installed: "
                          f"pip install -c constraints.txt {package} (or use trainer.logger=csv)") from e


__all__ = ["train", "export", "resolve_precision", "CheckpointError"]
