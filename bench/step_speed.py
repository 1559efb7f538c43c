"""One tiny-preset training step (MDLM loss, backward, AdamW; batch 16 x 128, float32) and one 32-step ancestral
sampling call (8 x 128), the best of a few repeats: run it on two checkouts to compare versions in one sitting,

    for tree in /path/to/old /path/to/new; do PYTHONPATH=$tree python bench/step_speed.py $tree; done

(it uses only APIs both sides of the architecture refactor have: before it, samplers took (canvas, fixed)).
"""
import sys
import time

import torch
try:
    from dlm.allocator import keep_freed_memory; keep_freed_memory()
except ImportError: pass
torch.set_num_threads(2)
from dlm.config import build_config
from dlm.network import Transformer
from dlm.process import make_process
cfg = build_config(["model=tiny"]); cfg.model.vocab_size = 8192
torch.manual_seed(0)
net = Transformer(cfg.model)
proc = make_process(cfg.process, 8191)
try:
    from dlm.data.batch import make_batch
except ImportError:
    from dlm.train.data_module import make_batch
x = torch.randint(0, 8190, (16, 128), generator=torch.Generator().manual_seed(0))
batch = make_batch(x, None)
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
def step(i):
    out = proc.loss(net, batch, torch.Generator().manual_seed(i)); out.loss.backward(); opt.step(); opt.zero_grad()
for i in range(2): step(i)
ts = []
for i in range(6):
    t0 = time.perf_counter(); step(i); ts.append(time.perf_counter() - t0)
train = min(ts)
net.eval()
from dlm.sampler import AncestralSampler
canvas = torch.full((8, 128), 8191); canvas[:, 0] = 0; fixed = canvas != 8191
def sample():
    s = AncestralSampler(steps=32, cache=False)
    with torch.no_grad():
        try:
            from dlm.sampler import Canvas
            return s.sample(net, proc, Canvas.from_fixed(canvas.clone(), fixed), torch.Generator().manual_seed(0))
        except ImportError:
            return s.sample(net, proc, canvas.clone(), fixed, torch.Generator().manual_seed(0))
sample()
ts = []
for i in range(3):
    t0 = time.perf_counter(); out = sample(); ts.append(time.perf_counter() - t0)
print(f"{sys.argv[1]} train_step_s {train:.4f} sample_32steps_s {min(ts):.4f} nfe {out.nfe}")
