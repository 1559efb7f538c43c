"""Watching the denoising: `dlm sample --visual` redraws the canvas in place on a terminal after every step
(`CanvasView`, a sampler callback), and `--save-trajectory FILE.html|.gif` writes an animation of a recorded
trajectory (`save_trajectory`): a self-contained HTML page with a slider and autoplay, or an animated GIF
(Pillow, which matplotlib brings).

A frame is the canvas after one step (`Generation.trajectory`, one (B, L) canvas per step event), rendered as
pieces (text, kind): kind "mask" (still noise, drawn as a symbol), "new" (changed in this step) or "token".
"""

from __future__ import annotations

import html
import json
import shutil
import sys
from pathlib import Path

import torch

MASK_SYMBOL = "░"
TRAJECTORY_SUFFIXES = (".html", ".htm", ".gif")


def frame_pieces(tokenizer, tokens: list[int], mask_id: int | None, previous: list[int] | None = None,
                 symbol: str = MASK_SYMBOL) -> list[tuple[str, str]]:
    """[(text, kind)] of one canvas: runs of tokens of one kind decoded together ("mask" runs as one symbol per
    position; "new": differs from `previous`; "token"); special tokens other than the mask vanish."""
    kinds = ["mask" if t == mask_id else "new" if previous is not None and previous[i] != t else "token"
             for i, t in enumerate(tokens)]
    pieces: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        j = i
        while j + 1 < len(tokens) and kinds[j + 1] == kinds[i]:
            j += 1
        run = tokens[i:j + 1]
        text = symbol * len(run) if kinds[i] == "mask" else tokenizer.decode(run, skip_special_tokens=True,
                                                                             clean_up_tokenization_spaces=False)
        if text:
            pieces.append((text, kinds[i]))
        i = j + 1
    return pieces


def frames_of(tokenizer, trajectory: list[torch.Tensor], mask_id: int | None, row: int = 0) -> list[list]:
    """The pieces of row `row` of every recorded canvas (one frame per step)."""
    out, previous = [], None
    for canvas in trajectory:
        tokens = canvas[row].tolist()
        out.append(frame_pieces(tokenizer, tokens, mask_id, previous))
        previous = tokens
    return out


def printable(text: str) -> str:
    """The text with control characters (an ESC from a generated token would drive the terminal) as U+FFFD."""
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)


class CanvasView:
    """A sampler callback that redraws the canvas in place after every step (ANSI: cursor up over the previous
    frame, clear to the end of the screen): masks as a symbol, tokens committed in this step highlighted, and a
    status line (step, masks left, NFE). Rows: the first `max_rows` of the batch. Needs a terminal: `stream`
    must be a TTY (`CanvasView.available(stream)`), else ValueError."""

    def __init__(self, tokenizer, mask_id: int | None, stream=None, max_rows: int = 2, symbol: str = MASK_SYMBOL,
                 width: int | None = None):
        self.stream = sys.stdout if stream is None else stream
        if not self.available(self.stream):
            raise ValueError("--visual redraws the canvas on a terminal, and the output is not one")
        self.tokenizer, self.mask_id, self.max_rows, self.symbol = tokenizer, mask_id, max_rows, symbol
        self.width = width or shutil.get_terminal_size((100, 24)).columns
        self.lines = 0  # lines of the frame on screen
        self.previous: torch.Tensor | None = None
        self.frames = 0

    @staticmethod
    def available(stream) -> bool:
        return bool(getattr(stream, "isatty", lambda: False)())

    def render(self, tokens: torch.Tensor, step: int, nfe: int) -> str:
        """The frame's text with ANSI colours: masks dim, new tokens bold green."""
        style = {"mask": "\x1b[2m{}\x1b[0m", "new": "\x1b[1;32m{}\x1b[0m", "token": "{}"}
        rows = []
        for r in range(min(self.max_rows, tokens.shape[0])):
            prev = None if self.previous is None or self.previous.shape != tokens.shape else self.previous[r].tolist()
            pieces = frame_pieces(self.tokenizer, tokens[r].tolist(), self.mask_id, prev, self.symbol)
            rows.append("".join(style[k].format(printable(t)) for t, k in pieces))
        masks = int((tokens == self.mask_id).sum()) if self.mask_id is not None else 0
        shown = f" (first {self.max_rows} of {tokens.shape[0]})" if tokens.shape[0] > self.max_rows else ""
        rows.append(f"\x1b[2m[step {step + 1} | masks left {masks} | NFE {nfe}{shown}]\x1b[0m")
        return "\n".join(rows)

    def _height(self, text: str) -> int:
        """Screen lines `text` takes when wrapped at the terminal's width (ANSI codes take no room)."""
        import re

        plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
        return sum(max(1, -(-len(line) // self.width)) for line in plain.split("\n"))

    def __call__(self, event) -> None:
        tokens = event.tokens.detach().cpu()
        if event.step == 0 and self.frames:  # a new sampler run (the next batch or window): draw below the last
            self.close()
        frame = self.render(tokens, event.step, event.nfe)
        up = f"\x1b[{self.lines}F\x1b[J" if self.lines else ""
        self.stream.write(up + frame + "\n")
        self.stream.flush()
        self.lines = self._height(frame)
        self.previous = tokens.clone()
        self.frames += 1

    def close(self) -> None:
        """Leave the last frame on screen and start the next output below it."""
        self.lines = 0
        self.previous = None


# ------------------------------------------------------------------------------------ writers
def check_trajectory_path(path: str | Path) -> Path:
    """A ValueError naming the fix when `path` is not a .html/.htm/.gif file name, or a GIF without Pillow."""
    path = Path(path)
    if path.suffix.lower() not in TRAJECTORY_SUFFIXES:
        raise ValueError(f"--save-trajectory writes .html (a page with a slider) or .gif (an animation); got "
                         f"'{path.name}': name the file FILE.html or FILE.gif")
    if path.suffix.lower() == ".gif":
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise ValueError("a .gif trajectory needs Pillow (pip install pillow); or write FILE.html") from None
    return path


def save_trajectory(path: str | Path, trajectory: list[torch.Tensor], tokenizer, mask_id: int | None,
                    row: int = 0, title: str = "dlm denoising", fps: float = 8.0) -> Path:
    """Write the denoising of row `row` (trajectory: one (B, L) canvas per step) as an HTML page or a GIF, by
    the file's suffix; one frame per step."""
    path = check_trajectory_path(path)
    if not trajectory:
        raise ValueError("no trajectory recorded; generate with record_trajectory=True")
    frames = frames_of(tokenizer, trajectory, mask_id, row)
    if path.suffix.lower() == ".gif":
        return write_gif(path, frames, fps)
    return write_html(path, frames, title, fps)


HTML_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 60em; }}
#canvas {{ font-family: monospace; white-space: pre-wrap; font-size: 15px; line-height: 1.5; border: 1px solid #ccc;
          padding: 1em; min-height: 6em; }}
.mask {{ color: #bbb; }} .new {{ background: #c8f0c8; font-weight: bold; }}
#controls {{ margin: 1em 0; display: flex; gap: 1em; align-items: center; }} #slider {{ flex: 1; }}
</style></head><body>
<h2>{title}</h2>
<div id="controls"><button id="play">pause</button>
<input id="slider" type="range" min="0" max="{last}" value="0"><span id="label"></span></div>
<div id="canvas"></div>
<script>
const frames = {frames};
const canvas = document.getElementById("canvas"), slider = document.getElementById("slider"),
      label = document.getElementById("label"), play = document.getElementById("play");
function show(i) {{
  canvas.textContent = "";
  for (const [text, kind] of frames[i]) {{
    const span = document.createElement("span");
    span.className = kind; span.textContent = text; canvas.appendChild(span);
  }}
  const masks = frames[i].filter(p => p[1] === "mask").reduce((n, p) => n + [...p[0]].length, 0);
  slider.value = i; label.textContent = "step " + (i + 1) + " / " + frames.length + " | masks left " + masks;
}}
let timer = null;
function start() {{ timer = setInterval(() => {{ const i = (+slider.value + 1) % frames.length; show(i); }},
                                        {interval}); play.textContent = "pause"; }}
function stop() {{ clearInterval(timer); timer = null; play.textContent = "play"; }}
play.onclick = () => timer ? stop() : start();
slider.oninput = () => {{ stop(); show(+slider.value); }};
show(0); start();
</script></body></html>
"""


def write_html(path: Path, frames: list[list], title: str = "dlm denoising", fps: float = 8.0) -> Path:
    """A self-contained page (no external file): the frames as JSON, a slider, play/pause, autoplay at `fps`."""
    data = json.dumps(frames, ensure_ascii=True).replace("</", "<\\/")  # no "</script>" inside the script
    path.write_text(HTML_PAGE.format(title=html.escape(title), last=len(frames) - 1, frames=data,
                                     interval=max(1, round(1000 / fps))), encoding="utf-8")
    return path


def write_gif(path: Path, frames: list[list], fps: float = 8.0, width: int = 90) -> Path:
    """An animated GIF, one image per frame: the text wrapped at `width` characters, masks as grey cells, new
    tokens green."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    char_w, line_h = 7, 14
    colours = {"mask": (170, 170, 170), "new": (0, 140, 0), "token": (0, 0, 0)}

    def layout(pieces):  # [(x, y, char, colour)]: characters placed on a grid, wrapped at `width`
        placed, x, y = [], 0, 0
        for text, kind in pieces:
            for ch in text:
                if ch == "\n" or x >= width:
                    x, y = 0, y + 1
                    if ch == "\n":
                        continue
                placed.append((x, y, ch, colours[kind]))
                x += 1
        return placed, y + 1

    laid = [layout(p) for p in frames]
    height = max(rows for _, rows in laid) + 2
    images = []
    for i, (placed, _) in enumerate(laid):
        img = Image.new("RGB", (width * char_w + 20, height * line_h + 20), "white")
        draw = ImageDraw.Draw(img)
        for x, y, ch, colour in placed:
            left, top = 10 + x * char_w, 10 + y * line_h
            if colour == colours["mask"]:  # a grey cell (fonts may lack the symbol)
                draw.rectangle((left, top + 2, left + char_w - 2, top + line_h - 3), fill=colour)
            else:
                draw.text((left, top), ch, fill=colour, font=font)
        draw.text((10, 10 + (height - 1) * line_h), f"step {i + 1} / {len(frames)}", fill=(90, 90, 90), font=font)
        images.append(img)
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(20, round(1000 / fps)), loop=0,
                   disposal=1, optimize=False)
    return path


class FirstRunRecorder:
    """A sampler callback keeping row `row` of the canvas after each step of the first sampler run only (the
    first batch; a long sample's first window): `frames`, one (1, L) canvas per step. A later run is known by
    its step counter starting again at 0."""

    def __init__(self, row: int = 0):
        self.row, self.frames, self.done = row, [], False

    def __call__(self, event) -> None:
        if event.step == 0 and self.frames:
            self.done = True
        if not self.done:
            self.frames.append(event.tokens[self.row:self.row + 1].detach().to("cpu", copy=True))
