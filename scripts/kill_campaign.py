"""Kill campaign: train a micro run while killing it again and again (SIGKILL at random moments and right after
checkpoint renames and other named points; SIGTERM at random moments and inside checkpoint writes), restart it
with the same command each time, and compare the finished run with an uninterrupted one, bit for bit.

    python scripts/kill_campaign.py --kills 20                 # accumulate=2, soft-masking on, half SIGTERM
    python scripts/kill_campaign.py --kills 100 --seed 3 --keep /tmp/campaign
    python scripts/kill_campaign.py --kills 20 --sigterm 0     # SIGKILL only (the campaign before SIGTERM)

A SIGTERM run must stop with exit status 143, one line "dlm: stopped by SIGTERM at step N of M; resume with the
same command" (or "... before training started ...") whose N is the step of the last.ckpt it leaves, no lock file
and no lost step (dlm/train/stop.py); half of them get a second SIGTERM soon after the first (ignored while the run
stops). A SIGTERM that lands after the last step's checkpoint lets the run finish (exit 0, compared like a run
that finished before its kill).

Prints kills / resumes / lost steps / identical (weights, EMA, optimizer state, best.ckpt, every logged CSV value,
each step exactly once). A run that finishes before its kill lands is compared too, then started over from
scratch; "identical" holds for every finished run. Exit status 0 when identical, 1 otherwise. A kill is either a named point
(`DLM_KILL_AT`, dlm/faults.py: the process SIGKILLs itself there) or a timer that fires at a random moment after
the process has started training.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MICRO = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.context=32", "data.vocab_size=300",
         "trainer.val_batches=1", "trainer.batch_size=4", "trainer.progress=false", "trainer.ema=0.99"]
POINTS = ["checkpoint_renamed", "checkpoint_written", "tokenizer_written", "export_written"]


def micro_texts(folder: Path) -> Path:
    """8 small text files (slices of the embedded corpus), as the test suite's micro run uses."""
    from dlm.data import load_embedded_corpus

    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(load_embedded_corpus()[::20][:8]):
        (folder / f"doc{i}.txt").write_text(doc.text[5000:7500])
    return folder


def train_args(out_dir: Path, texts: Path, steps: int, accumulate: int, softmask: bool) -> list[str]:
    return [*MICRO, f"trainer.max_steps={steps}", f"trainer.ckpt_every={max(1, steps // 4)}",
            f"trainer.val_every={max(1, steps // 2)}", f"trainer.accumulate={accumulate}",
            f"softmask.enabled={'true' if softmask else 'false'}", f"data.source={texts}", f"trainer.out_dir={out_dir}"]


def start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "dlm.cli", "train", *args], cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def run_once(args: list[str], log: Path, env: dict, kill: str | None, rng: random.Random,
             timeout: float = 600) -> tuple[int, str]:
    """One invocation; kill = None (let it finish), "point:<name>:<n>" or "random:<max seconds>" (SIGKILL), or
    the same behind "term:" (SIGTERM; "term:random:<max seconds>:2" sends a second SIGTERM soon after the first)."""
    env = dict(env)
    sig = signal.SIGKILL
    if kill and kill.startswith("term:"):
        kill, sig, env["DLM_KILL_SIGNAL"] = kill[len("term:"):], signal.SIGTERM, "TERM"
    if kill and kill.startswith("point:"):
        env["DLM_KILL_AT"] = kill[len("point:"):]
    proc = start(args, log, env)
    deadline = time.monotonic() + timeout
    if kill and kill.startswith("random:"):
        while proc.poll() is None and not re.search(r"dlm: (training|resuming)", log.read_text()):  # fit starts
            time.sleep(0.02)
        time.sleep(rng.uniform(0, float(kill.split(":")[1])))
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        if kill.endswith(":2"):  # a second signal while the run stops (e.g. during its checkpoint write)
            time.sleep(rng.uniform(0, 0.3))
            if proc.poll() is None:
                os.kill(proc.pid, sig)
    fit_started = None
    while proc.poll() is None:
        if fit_started is None and re.search(r"dlm: (training|resuming)", log.read_text()):
            fit_started = time.monotonic()
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"dlm train did not end in {timeout} s: {log}")
        time.sleep(0.02)
    run_once.fit_seconds = time.monotonic() - fit_started if fit_started else None
    return proc.returncode, log.read_text()


def checkpoint_step(run: Path) -> int | None:
    from dlm.checkpoint import read_checkpoint

    last = run / "checkpoints" / "last.ckpt"
    return int(read_checkpoint(last)["global_step"]) if last.is_file() else None


def logged_rows(run: Path) -> dict[tuple[int, str], list[float]]:
    """(step, metric) -> every value logged for it across the run's CSV parts (tokens/s, a timing, left out)."""
    rows: dict[tuple[int, str], list[float]] = {}
    for path in sorted((run / "logs").glob("*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key not in ("step", "epoch", "train/tokens_per_s") and value not in ("", None):
                        rows.setdefault((int(row["step"]), key), []).append(float(value))
    return rows


def compare(a: Path, b: Path) -> list[str]:
    """What differs between two finished runs ([] = bit-identical)."""
    import torch

    from dlm.checkpoint import read_checkpoint

    diffs = []
    ca, cb = (read_checkpoint(r / "checkpoints" / "last.ckpt") for r in (a, b))
    if ca["global_step"] != cb["global_step"]:
        diffs.append(f"global_step {ca['global_step']} vs {cb['global_step']}")

    def same(x, y, what):
        if x.keys() != y.keys():
            diffs.append(f"{what}: different keys")
            return
        for k in x:
            if not torch.equal(x[k], y[k]):
                diffs.append(f"{what} {k} (max |diff| {(x[k].float() - y[k].float()).abs().max():.3g})")

    same(ca["state_dict"], cb["state_dict"], "weights")
    for key in ("ema", "ema_process"):
        if (ca["dlm"].get(key) is None) != (cb["dlm"].get(key) is None):
            diffs.append(f"{key}: present in one run only")
        elif ca["dlm"].get(key) is not None:
            same(ca["dlm"][key], cb["dlm"][key], key)
    oa, ob = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    for i in oa:
        same(oa[i], ob.get(i, {}), f"optimizer state {i}")
    best_a, best_b = a / "checkpoints" / "best.ckpt", b / "checkpoints" / "best.ckpt"
    if best_a.is_file() != best_b.is_file():
        diffs.append("best.ckpt: present in one run only")
    elif best_a.is_file():
        ba, bb = read_checkpoint(best_a), read_checkpoint(best_b)
        if ba["global_step"] != bb["global_step"]:
            diffs.append(f"best.ckpt step {ba['global_step']} vs {bb['global_step']}")
        same(ba["state_dict"], bb["state_dict"], "best.ckpt weights")
    ra, rb = logged_rows(a), logged_rows(b)
    twice = sorted(k for k, v in rb.items() if len(v) > 1)
    if twice:
        diffs.append(f"logged more than once: {twice[:5]}")
    missing = sorted(set(ra) - set(rb))
    if missing:
        diffs.append(f"logged rows lost: {missing[:5]}")
    changed = sorted(k for k in set(ra) & set(rb) if ra[k] != rb[k][-1:])
    if changed:
        diffs.append(f"logged values differ: {changed[:5]}")
    if not (b / "model" / "integrity.json").is_file():
        diffs.append("the export is incomplete")
    return diffs


STOP_LINE = re.compile(r"^dlm: stopped by SIGTERM (?:at step (\d+) of (\d+)|before training started); resume with "
                       r"the same command$", re.M)


def check_sigterm_stop(out: str, victim: Path) -> list[str]:
    """What is wrong with a run that SIGTERM stopped (exit status 143): [] when it printed the line once, the
    line's step is its last.ckpt, its lock is gone, and no trained step was lost."""
    problems = []
    lines = STOP_LINE.findall(out)
    if len(lines) != 1 or "Traceback" in out:
        return [f"SIGTERM stop without exactly one 'stopped by SIGTERM' line (or with a traceback): {out[-800:]!r}"]
    step = lines[0][0]
    after = checkpoint_step(victim)
    if step and int(step) != after:
        problems.append(f"the line says step {step} but last.ckpt is at step {after}")
    if (victim / ".lock").exists():
        problems.append("the lock file is still there after a SIGTERM stop")
    rows = [s for (s, key) in logged_rows(victim) if key == "train/loss"]
    if max(rows, default=-1) + 1 > (after or 0):
        problems.append(f"a SIGTERM stop lost steps: rows up to {max(rows)} logged, checkpoint at step {after}")
    return problems


def campaign(kills: int, seed: int = 0, steps: int = 12, accumulate: int = 2, softmask: bool = True,
             work: Path | None = None, schedule: list[str] | None = None, verbose: bool = True,
             sigterm: float = 0.5) -> dict:
    """Run the campaign; `schedule` fixes the kinds of kill (else drawn at random, a share `sigterm` of them
    SIGTERM). Returns the counts and diffs."""
    rng = random.Random(seed)
    work = Path(work or tempfile.mkdtemp(prefix="dlm-kill-"))
    texts = micro_texts(work / "texts")
    env = {**os.environ, "DLM_CACHE": str(work / "cache"), "PYTHONPATH": f"{REPO}{os.pathsep}"
           + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DLM_KILL_AT", None)
    reference, victim = work / "reference", work / "victim"
    rc, out = run_once(train_args(reference, texts, steps, accumulate, softmask), work / "reference.log", env, None, rng)
    if rc != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{out[-3000:]}")
    window = 0.7 * (run_once.fit_seconds or 5.0)  # random kills land in a run's training, saving and export
    args = train_args(victim, texts, steps, accumulate, softmask)
    done_kills = resumes = lost = starts = compared = terms = 0
    diffs: list[str] = []
    while done_kills < kills:
        if schedule:  # "random", "point:<name>:<n>", and the same behind "term:"
            kind = schedule[done_kills % len(schedule)]
        else:
            point = rng.choice(POINTS)  # a checkpoint is renamed up to 6 times in a run; the others happen once or twice
            nth = rng.choice([1, 1, 2, 3]) if point.startswith("checkpoint") else 1
            kind = "random" if rng.random() < 0.5 else f"point:{point}:{nth}"
            if rng.random() < sigterm:
                kind = "term:" + kind + (":2" if kind == "random" and rng.random() < 0.5 else "")
        if kind.removeprefix("term:").startswith("random"):
            kind = kind.replace("random", f"random:{window:.2f}")
        before = checkpoint_step(victim)
        starts += 1
        rc, out = run_once(args, work / f"victim-{starts:03d}.log", env, kind, rng)
        resumes += "dlm: resuming" in out
        if kind.startswith("term:") and rc != 0:  # a SIGTERM that stopped the run: 143 and the line, no lost step
            found = [f"{kind}: exit status {rc}, not 143"] if rc != 143 else []
            found += [f"{kind}: {d}" for d in check_sigterm_stop(out, victim)]
            diffs += found
            done_kills += 1
            terms += 1
            if verbose:
                line = STOP_LINE.search(out)
                print(f"kill {done_kills:3d}: {kind:32s} checkpoint step {before} -> {checkpoint_step(victim)}, exit "
                      f"{rc}, {line.group(0) if line else 'NO LINE'}" + (f"  PROBLEM: {found}" if found else ""),
                      flush=True)
        elif rc == -signal.SIGKILL:
            done_kills += 1
            after = checkpoint_step(victim)
            # steps that were trained and are redone: from the checkpoint the next start resumes from to the step the
            # killed process had reached (its last logged training step + 1)
            rows = [s for (s, key) in logged_rows(victim) if key == "train/loss"]
            reached = max(rows, default=-1) + 1
            lost += max(0, reached - (after or 0))
            if verbose:
                print(f"kill {done_kills:3d}: {kind:32s} checkpoint step {before} -> {after}", flush=True)
        elif rc == 0:  # finished before the kill: compared like the final one, then started over from scratch
            found = compare(reference, victim)
            if STOP_LINE.search(out):
                found.append(f"{kind}: exit status 0 with a 'stopped by' line")
            diffs += found
            compared += 1
            if verbose:
                print(f"  (the run finished before the {kind} kill: {'identical' if not found else 'DIFFERENT'}; "
                      "starting over from scratch)", flush=True)
            shutil.rmtree(victim)
        else:
            raise RuntimeError(f"dlm train exited with {rc}:\n{out[-3000:]}")
    rc, out = run_once(args, work / "victim-final.log", env, None, rng)
    resumes += "dlm: resuming" in out
    if rc != 0:
        raise RuntimeError(f"the final restart failed:\n{out[-3000:]}")
    diffs += compare(reference, victim)
    return {"kills": done_kills, "sigterms": terms, "resumes": resumes, "lost_steps": lost, "identical": not diffs,
            "diffs": diffs, "work": work, "starts": starts + 2, "runs_compared": compared + 1}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of the micro run")
    p.add_argument("--accumulate", type=int, default=2)
    p.add_argument("--no-softmask", action="store_true")
    p.add_argument("--sigterm", type=float, default=0.5, help="share of the kills that are SIGTERM (default 0.5)")
    p.add_argument("--keep", default=None, help="work folder to keep (default: a temp folder, removed)")
    a = p.parse_args()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="dlm-kill-"))
    t0 = time.time()
    try:
        r = campaign(a.kills, a.seed, a.steps, a.accumulate, not a.no_softmask, work, sigterm=a.sigterm)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"kills {r['kills']} ({r['sigterms']} SIGTERM, each exit 143 with its line) / resumes {r['resumes']} / "
          f"lost steps {r['lost_steps']} / identical "
          f"{'yes' if r['identical'] else 'no'}  ({r['runs_compared']} finished runs compared; accumulate={a.accumulate}, soft-masking "
          f"{'off' if a.no_softmask else 'on'}, {a.steps} steps, seed {a.seed}, {time.time() - t0:.0f} s)")
    for d in r["diffs"]:
        print("  differs:", d)
    return 0 if r["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
