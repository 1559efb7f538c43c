"""One tiny-preset training step (MDLM loss, backward, AdamW; batch 16 x 128, float32) and one 32-step ancestral
sampling call (8 x 128), each the best of a few repeats. Run it on two checkouts to compare versions in one sitting:

    for tree in /path/to/old /path/to/new; do PYTHONPATH=$tree python bench/step_speed.py $tree; done

It uses only what both sides of the architecture refactor have (before it, samplers took (canvas, fixed)).
"""

import sys
import time

import torch

from dlm.config import build_config
from dlm.network import Transformer
from dlm.process import make_process
from dlm.sampler import AncestralSampler

try:  # after the refactor: `import dlm` no longer tunes the allocator, training does
    from dlm.allocator import keep_freed_memory
    from dlm.data.batch import make_batch
    from dlm.sampler import Canvas
except ImportError:  # before it
    from dlm.train.data_module import make_batch
    keep_freed_memory, Canvas = (lambda: None), None


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    cfg = build_config(["model=tiny"])
    cfg.model.vocab_size = 8192
    torch.manual_seed(0)
    net, proc = Transformer(cfg.model), make_process(cfg.process, 8191)
    batch = make_batch(torch.randint(0, 8190, (16, 128), generator=torch.Generator().manual_seed(0)), None)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def train_step():
        proc.loss(net, batch, torch.Generator().manual_seed(0)).loss.backward()
        opt.step()
        opt.zero_grad()

    canvas = torch.full((8, 128), 8191)
    canvas[:, 0] = 0
    fixed = canvas != 8191

    @torch.no_grad()
    def sample():
        sampler, g = AncestralSampler(steps=32, cache=False), torch.Generator().manual_seed(0)
        if Canvas is None:
            return sampler.sample(net, proc, canvas.clone(), fixed, g)
        return sampler.sample(net, proc, Canvas.from_fixed(canvas.clone(), fixed), g)

    train_step(), train_step(), sample()  # warm-up
    train = best_of(6, train_step)
    net.eval()
    sampling = best_of(3, sample)
    print(f"{sys.argv[1] if len(sys.argv) > 1 else 'this tree'}: train_step_s {train:.4f} sample_32steps_s {sampling:.4f}")


if __name__ == "__main__":
    main()
