"""evaluate_task: the canvas layout of a task's prompts, exact scoring of the sampled responses, NFE counting."""

import torch

from dlm.eval.tasks import evaluate_task, task_canvas
from dlm.process import MaskedDiffusion
from dlm.process.schedules import LogLinearSchedule
from dlm.sampler import SampleOutput
from dlm.sampler.registry import make_sampler
from dlm.tasks import make_task


class Oracle:
    """A 'sampler' that writes the reference solution (or leaves masks in every other row): checks the plumbing
    from canvas to score without a trained network."""

    def __init__(self, task, tok, examples, leave_masked_rows=()):
        self.task, self.tok, self.examples, self.leave = task, tok, examples, set(leave_masked_rows)
        self.seen = 0

    def sample(self, network, process, canvas, generator=None, callback=None):
        tokens = canvas.tokens.clone()
        for b in range(tokens.shape[0]):
            ex = self.examples[self.seen + b]
            if self.seen + b not in self.leave:
                ids = self.tok.encode(self.task.format_response(ex), add_special_tokens=False) + [self.tok.eos_token_id]
                tokens[b, canvas.to_generate[b]] = torch.tensor(ids)
        self.seen += tokens.shape[0]
        B = tokens.shape[0]
        return SampleOutput(tokens, 3, torch.full((B,), 3), torch.zeros(B, dtype=torch.bool))


def setup():
    task = make_task("sudoku", size=4)
    tok = task.tokenizer()
    process = MaskedDiffusion(LogLinearSchedule(1e-3), tok.mask_token_id)
    return task, tok, process, task.generate("test", 6, seed=0)


def test_canvas_layout():
    task, tok, process, examples = setup()
    canvas = task_canvas(task, examples[:2], tok, process)
    assert canvas.tokens.shape == (2, 34)
    assert canvas.fixed[:, :17].all() and canvas.to_generate[:, 17:].all()
    assert (canvas.tokens[:, 17:] == tok.mask_token_id).all() and (canvas.tokens[:, 0] == tok.bos_token_id).all()
    assert tok.decode(canvas.tokens[0, 1:17]) == examples[0]["puzzle"]


def test_scores_and_nfe_through_a_perfect_sampler():
    task, tok, process, examples = setup()
    out = evaluate_task(None, process, tok, task, examples, Oracle(task, tok, examples, leave_masked_rows=[1, 4]),
                        batch_size=4)
    assert out["n"] == 6 and out["nfe"] == 3.0
    assert out["solved"] == 4 / 6 and out["givens_kept"] == 4 / 6 and out["invalid_cells"] == 2 * 16 / 6
    assert out["responses"][0] == examples[0]["solution"] and out["responses"][1] == "?" * 17  # 16 cells and the EOS slot left masked
    assert out["scores"][1]["solved"] == 0.0 and out["tokens_per_second"] > 0


def test_a_random_network_with_a_real_sampler(tiny_network):
    task, tok, process, examples = setup()
    net = tiny_network(len(tok), context=40)
    out = evaluate_task(net, process, tok, task, examples, make_sampler("ancestral", steps=8), batch_size=4)
    assert out["n"] == 6 and 1 <= out["nfe"] <= 8
    assert all(len(r) <= 17 for r in out["responses"])  # cut at the first EOS a random network samples
    assert 0.0 <= out["solved"] <= 1.0 and 0.0 <= out["cell_accuracy"] <= 1.0
    again = evaluate_task(net, process, tok, task, examples, make_sampler("ancestral", steps=8), batch_size=4)
    assert again["responses"] == out["responses"]  # seeded
