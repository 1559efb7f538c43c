"""The terminal view (`dlm sample --visual`, dlm/view.py CanvasView) on a fake terminal, and the trajectory
writers (`--save-trajectory FILE.html|.gif`): one frame per step, masks in the first frame."""

import io
import json
import re

import pytest
import torch

from dlm.view import MASK_SYMBOL, CanvasView, FirstRunRecorder, frame_pieces, printable, save_trajectory
from tests.golden.cases import models

STEPS = 6


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(scope="module")
def mdlm():
    return models()["mdlm"]


def run(model, callback, num_samples=1):
    return model.generate(num_samples=num_samples, length=16, steps=STEPS, sampler="ancestral", seed=1,
                          callback=callback)


def test_frame_pieces_show_masks_and_new_tokens(mdlm):
    tok, mask = mdlm.tokenizer, mdlm.process.mask_id
    ids = tok("And the king", add_special_tokens=False)["input_ids"]
    pieces = frame_pieces(tok, [tok.bos_token_id, ids[0], mask, mask, ids[2]], mask, [tok.bos_token_id, ids[0],
                                                                                      mask, mask, mask])
    assert pieces == [(tok.decode(ids[:1]), "token"), (MASK_SYMBOL * 2, "mask"), (tok.decode(ids[2:3]), "new")]


def test_html_trajectory_has_one_frame_per_step(mdlm, tmp_path):
    events, rec = [], FirstRunRecorder()
    run(mdlm, lambda e: (events.append(e.step), rec(e)) and None)
    path = save_trajectory(tmp_path / "t.html", rec.frames, mdlm.tokenizer, mdlm.process.mask_id)
    page = path.read_text()
    frames = json.loads(re.search(r"const frames = (.*);\n", page).group(1).replace("<\\/", "</"))
    assert len(frames) == len(events) >= STEPS  # one per step event (the final argmax is a step when it commits)
    assert any(kind == "mask" for _, kind in frames[0])  # the first step leaves masks
    assert not any(kind == "mask" for _, kind in frames[-1])
    assert "<script src" not in page and 'type="range"' in page and "setInterval" in page  # self-contained, slider


def test_gif_trajectory_has_one_image_per_step(mdlm, tmp_path):
    from PIL import Image

    rec = FirstRunRecorder()
    run(mdlm, rec, num_samples=2)
    path = save_trajectory(tmp_path / "t.gif", rec.frames, mdlm.tokenizer, mdlm.process.mask_id)
    with Image.open(path) as img:
        assert img.n_frames == len(rec.frames) >= STEPS
        first = img.convert("RGB")
        assert (170, 170, 170) in {c for _, c in first.getcolors(1 << 16)}  # grey mask symbols in frame 0


def test_trajectory_paths_are_checked(mdlm, tmp_path):
    with pytest.raises(ValueError, match="FILE.html or FILE.gif"):
        save_trajectory(tmp_path / "t.png", [torch.zeros(1, 3, dtype=torch.long)], mdlm.tokenizer, 0)
    with pytest.raises(ValueError, match="no trajectory"):
        save_trajectory(tmp_path / "t.html", [], mdlm.tokenizer, 0)


def test_visual_redraws_in_place_on_a_terminal(mdlm):
    screen, events = FakeTTY(), []
    view = CanvasView(mdlm.tokenizer, mdlm.process.mask_id, stream=screen, width=200)
    gen = run(mdlm, lambda e: (events.append(e.step), view(e)) and None)
    out = screen.getvalue()
    frames = out.split("[step ")
    assert view.frames == len(events) == len(frames) - 1
    assert out.count("\x1b[2F\x1b[J") == len(events) - 1  # each later frame moves up over the last (2 lines) first
    assert MASK_SYMBOL in frames[1] and MASK_SYMBOL not in frames[-1].split("\n", 1)[1] + frames[-2]
    assert printable(mdlm.tokenizer.decode(gen.tokens[0], skip_special_tokens=True)) in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out)
    with pytest.raises(ValueError, match="not one"):
        CanvasView(mdlm.tokenizer, mdlm.process.mask_id, stream=io.StringIO())


def test_sample_command_visual_and_save_trajectory(micro_run, tmp_path, capsys):
    from dlm.cli import main

    out = tmp_path / "traj.html"
    argv = ["sample", str(micro_run), "--num-samples", "1", "--length", "12", "--steps", "5", "--sampler", "ancestral"]
    assert main([*argv, "--visual", "--save-trajectory", str(out)]) == 0
    captured = capsys.readouterr()
    assert "not one: printing the samples only" in captured.err and "--- sample 0 ---" in captured.out
    assert "\x1b[" not in captured.out  # not a terminal: plain output
    frames = json.loads(re.search(r"const frames = (.*);\n", out.read_text()).group(1))
    assert len(frames) >= 5 and "written to" in captured.err
    assert main([*argv, "--save-trajectory", str(tmp_path / "traj.png")]) == 2
    assert "FILE.html or FILE.gif" in capsys.readouterr().err


def test_visual_never_writes_control_characters_of_tokens(mdlm):
    screen = FakeTTY()
    view = CanvasView(mdlm.tokenizer, mdlm.process.mask_id, stream=screen, width=200)
    esc = mdlm.tokenizer.convert_tokens_to_ids(mdlm.tokenizer.tokenize("\x1b")) or [0]
    tokens = torch.tensor([[mdlm.tokenizer.bos_token_id, *esc, mdlm.process.mask_id]])
    view(type("Event", (), {"tokens": tokens, "step": 0, "nfe": 1})())
    shown = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", screen.getvalue())  # the view's own colour codes
    assert "\x1b" not in shown and "\ufffd" in shown
