"""The functions dlm's task YAMLs name: their datasets (read from dlm.eval.harness.data's files, written on first
use), per-document results carrying the adapter's Monte Carlo standard errors, and their aggregations."""

from __future__ import annotations

import math
import re


def _dataset(name: str):
    from datasets import Dataset, DatasetDict

    from dlm.eval.harness.data import read_rows

    return DatasetDict({"test": Dataset.from_list(read_rows(name))})


def ppl_dataset(**_):  # lm_eval passes the run's metadata (model_args) as keywords: not needed here
    return _dataset("ppl")


def cloze_dataset(**_):
    return _dataset("cloze")


def continuation_dataset(**_):
    return _dataset("continuation")


def sudoku_dataset(**_):
    return _dataset("sudoku")


def _stderr(x) -> float:
    """The Monte Carlo standard error a dlm estimate carries (0.0 for a plain float: exact, or another model)."""
    return float(getattr(x, "stderr", 0.0))


# ------------------------------------------------------------------------------------------------ rolling perplexity
def ppl_results(doc, results):
    """word/byte perplexity and bits per byte as lm_eval's wikitext task computes them, plus the Monte Carlo error
    of the word perplexity (`mc_stderr_word_perplexity`)."""
    (ll,) = results
    words = len(re.split(r"\s+", doc["text"]))
    nbytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (ll, words), "byte_perplexity": (ll, nbytes), "bits_per_byte": (ll, nbytes),
            "mc_stderr_word_perplexity": (float(ll), _stderr(ll), words)}


def mc_stderr_weighted_perplexity(items) -> float:
    """exp(-sum ll / sum n) times the standard error of the summed ll over sum n (the delta method); the documents'
    estimates are independent, so their variances add."""
    ll = sum(i[0] for i in items)
    n = sum(i[2] for i in items)
    return math.exp(-ll / n) * math.sqrt(sum(i[1] ** 2 for i in items)) / n


# ------------------------------------------------------------------------------------------------ cloze
def cloze_results(doc, results):
    """LAMBADA's metrics (perplexity of the target word, greedy accuracy) and the Monte Carlo error of the mean
    log-likelihood (`mc_stderr_mean_ll`)."""
    ll, is_greedy = results[0]
    return {"perplexity": float(ll), "acc": int(is_greedy), "mc_stderr_mean_ll": _stderr(ll)}


def mc_stderr_mean(items) -> float:
    """The standard error of the mean of independent estimates with standard errors `items`."""
    return math.sqrt(sum(s * s for s in items)) / len(items)


# ------------------------------------------------------------------------------------------------ continuation
def continuation_results(doc, results):
    """exact_match: the first three words of the generation equal the next line's (or sentence's) first three."""
    words = results[0].split()[:3]
    return {"exact_match": float(words == doc["target"].split())}


# ------------------------------------------------------------------------------------------------ sudoku
def sudoku_results(doc, results):
    """dlm's exact Sudoku metrics (dlm.tasks.sudoku.Sudoku.score) of the generated board."""
    from dlm.tasks.sudoku import Sudoku

    scores = Sudoku(doc["size"], doc["givens"]).score(doc, results[0].strip())
    return {k: scores[k] for k in ("solved", "cell_accuracy", "blank_accuracy")}
