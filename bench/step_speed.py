"""One tiny-preset training step (MDLM loss, backward, AdamW; batch 16 x 128, float32) and one 32-step ancestral
sampling call (8 x 128), each the best of a few repeats. Run it on two checkouts to compare versions in one sitting:

    for tree in /path/to/old /path/to/new; do PYTHONPATH=$tree python bench/step_speed.py $tree; done

It uses only what both sides of the architecture refactor have (before it, samplers took (canvas, fixed)).

    python bench/step_speed.py --step-api [--repeats 5] [--batch 8] [--length 128] [--steps 32]

times, in one run and alternated, the ancestral samplers and ReMDM (remdm_cap) as they now run (`Sampler.sample`:
the step-level API's loop, `start` then `step` until done) against `legacy_ancestral` / `legacy_remdm`, copies of
the loops they replaced (the whole loop in local variables), per step on the tiny preset (8 x 128 canvas, 32 steps,
float32), and prints a table. The LLaDA sampler likewise against `legacy_llada` (its block loop before the
step-level API): the second half of the canvas generated in two blocks, without a cache and with Fast-dLLM's dual
cache; and the blockwise sampler against `legacy_blockwise` (its block loop before the step-level API) on a bd3lm
process (the same network), the second half in two blocks, with and without its KV cache.
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


@torch.no_grad()
def legacy_ancestral(sampler, network, process, canvas, generator):
    """The ancestral sampler's loop before the step-level API (no callback, no feedback), for --step-api."""
    from dlm.sampler.base import StepReporter, fill_remaining_masks, forward_live, rand_rows, sample_tokens

    z, to_generate = canvas.tokens.clone(), canvas.to_generate
    times = torch.linspace(1.0, getattr(process, "sampling_eps", 1e-3), sampler.steps + 1, dtype=torch.float64)
    alphas = process.alpha(times)
    B = z.shape[0]
    steps = StepReporter(B, None, z.shape[1])
    raw = None
    for i in range(sampler.steps):
        live = steps.live(z.device)
        t = torch.full((B,), float(times[i]), device=z.device)
        if raw is None or not sampler.cache:
            raw = forward_live(process, network, z, t, None, live, canvas)
            steps.called()
        p_unmask = float((alphas[i + 1] - alphas[i]) / (1.0 - alphas[i]))
        u_unmask = rand_rows(generator, z.shape, z.device, valid=canvas.key_valid)
        u_token = rand_rows(generator, z.shape, z.device, torch.float64, canvas.key_valid)
        unmask = process.is_noise(z) & to_generate & (u_unmask < p_unmask) & live[:, None]
        if bool(unmask.any()):
            z[unmask] = sample_tokens(process.denoise(raw[unmask]), u_token[unmask], sampler.temperature, sampler.top_p)
            raw = None
        steps.report(z, unmask, None)
    fill_remaining_masks(network, process, z, to_generate, float(times[-1]), steps, None,
                         raw if sampler.cache else None, canvas=canvas)
    return steps.output(z)


@torch.no_grad()
def legacy_remdm(sampler, network, process, canvas, generator):
    """ReMDM's loop before the step-level API (no callback, no feedback), for --step-api."""
    from dlm.sampler.base import StepReporter, fill_remaining_masks, forward_live, rand_rows, sample_tokens

    z, to_generate = canvas.tokens.clone(), canvas.to_generate
    times, remask_steps = sampler.time_grid(process)
    alphas = process.alpha(times)
    B = z.shape[0]
    confidence = torch.ones(z.shape, device=z.device)
    steps = StepReporter(B, None, z.shape[1])
    for i in range(sampler.steps):
        live = steps.live(z.device)
        t = torch.full((B,), float(times[i]), device=z.device)
        raw = forward_live(process, network, z, t, None, live, canvas)
        steps.called()
        alpha_t, alpha_s = float(alphas[i]), float(alphas[i + 1])
        masked = process.is_noise(z)
        decoded = ~masked & to_generate
        if remask_steps[i]:
            sigma = sampler.sigma(alpha_t, alpha_s, decoded, confidence).to(z.device)
            sigma_masked = torch.zeros_like(sigma) if sampler.strategy == "conf" else sigma
        else:
            sigma = sigma_masked = torch.zeros((), device=z.device)
        p_unmask = ((alpha_s - (1.0 - sigma_masked) * alpha_t) / (1.0 - alpha_t)).clamp(0.0, 1.0)
        u_unmask = rand_rows(generator, z.shape, z.device, valid=canvas.key_valid)
        u_token = rand_rows(generator, z.shape, z.device, torch.float64, canvas.key_valid)
        u_remask = rand_rows(generator, z.shape, z.device, valid=canvas.key_valid)
        unmask = masked & to_generate & (u_unmask < p_unmask) & live[:, None]
        remask = decoded & (u_remask < sigma) & live[:, None]
        if unmask.any():
            rows = process.denoise(raw[unmask])
            tokens = sample_tokens(rows, u_token[unmask], sampler.temperature, sampler.top_p)
            z[unmask] = tokens
            if sampler.strategy == "conf":
                confidence[unmask] = rows.softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
        z[remask] = process.mask_id
        steps.report(z, unmask, None)
    fill_remaining_masks(network, process, z, to_generate, float(times[-1]), steps, None, canvas=canvas)
    return steps.output(z)


@torch.no_grad()
def legacy_llada(sampler, network, process, canvas, generator):
    """The LLaDA sampler's loop before the step-level API (no callback, no feedback, no stops), for --step-api: the
    batch moves block by block, a row whose block is full waiting for the others."""
    import dlm.sampler.fast_dllm as fast_dllm
    from dlm.network import KVCache
    from dlm.sampler.base import StepReporter, generators_of
    from dlm.sampler.llada_forward import Context, canvas_attention_mask, forward_block

    x, to_generate = canvas.tokens.clone(), canvas.to_generate
    B, T = x.shape
    gen_start = T - int(to_generate[0].sum())
    block_length = sampler.block_length or T - gen_start
    num_blocks = (T - gen_start) // block_length
    idx = torch.arange(T, device=x.device)
    key_valid = canvas.key_valid if canvas.key_valid is not None else torch.ones_like(to_generate)
    ctx = Context(network, process, idx if canvas.positions is None else canvas.positions,
                  canvas_attention_mask(key_valid, gen_start, block_length, sampler.block_causal),
                  key_valid & (idx < gen_start), to_generate, sampler.cfg_scale)
    steps = StepReporter(B, None, T)
    per_block = sampler.steps // num_blocks
    for b in range(num_blocks):
        start, end = gen_start + b * block_length, gen_start + (b + 1) * block_length
        cache, step, rows, sub = None, 0, None, None
        while True:
            active = process.is_noise(x[:, start:end]).any(1)
            if not active.any():
                break
            if cache is None and step == 0 and sampler.cache != "none":  # the refresh
                full = KVCache()
                raw = forward_block(ctx, x, (0, T), (start, end), None, full, None, cache_update=True)
                fed, cache = T, fast_dllm.keep_cached(sampler.cache, full, start, end)
                members = rows = torch.arange(B, device=x.device)
                sub = (ctx, cache)
            else:
                if rows is None or rows.shape[0] != int(active.sum()):
                    rows = active.nonzero().squeeze(1)
                    if cache is None:
                        sub = (ctx if rows.shape[0] == B else ctx.select(rows), None)
                    else:
                        pos = torch.searchsorted(members, rows)
                        sub = (ctx, cache) if rows.shape[0] == B else (ctx.select(rows), cache.select(pos))
                sub_ctx, sub_cache = sub
                if sub_cache is None:
                    raw = forward_block(sub_ctx, x[rows], (0, T), (start, end), None, None, None, cache_update=False)
                    fed = T
                else:
                    span = fast_dllm.query_span(sampler.cache, start, end, T)
                    mask = fast_dllm.step_attention_mask(sub_ctx.full_mask, sampler.cache, start, end)
                    raw = forward_block(sub_ctx, x[rows], span, (start, end), None, sub_cache, mask, cache_update=False)
                    fed = span[1] - span[0]
            steps.called(rows, fed)
            x_block = x[rows, start:end]
            candidates = process.is_noise(x_block)
            x0, score = sampler._predict(process.denoise(raw), generators_of(generator, rows))
            confidence = torch.where(candidates, score, float("-inf"))
            commit = sampler.policy.select(confidence, candidates.sum(1), step, per_block) & candidates
            x[rows, start:end] = torch.where(commit, x0, x_block)
            steps.report(x, None, None)
            step += 1
    return steps.output(x)


def legacy_blockwise(sampler, network, process, canvas, generator):
    """The blockwise sampler's loop before the step-level API (no callback, no stop rules), for --step-api: each
    block's cache fill, then its inner sampler's `sample` on the block."""
    from dlm.network import KVCache
    from dlm.process.block_mask import prefix_mask
    from dlm.sampler.base import StepReporter, generators_of
    from dlm.sampler.blockwise import BlockContext

    window, bs = sampler.check_model(process, network.cfg.context), sampler.block_length
    z, fixed = canvas.tokens.clone(), canvas.fixed
    B, N = z.shape
    keep = min(window // 2 // bs * bs, window - bs)
    starts = [s for s in range(0, N, bs) if not fixed[:, s:s + bs].all()]
    inners = dict(zip(starts, sampler.inner_samplers(len(starts))))
    cache = KVCache() if sampler.kv_cache else None
    ws = cached_to = 0
    steps = StepReporter(B, None, N)
    rows = torch.arange(B)
    for s in range(0, N, bs):
        e = min(s + bs, N)
        if e - ws > window:
            ws = s - keep
            if cache is not None:
                cache, cached_to = KVCache(), ws
        if s not in inners:
            continue
        if cache is not None and cached_to < s:
            process.forward_logits(network, z[:, cached_to:s], None, None, attn_mask=prefix_mask(
                cached_to - ws, s - cached_to, bs, z.device), positions=torch.arange(cached_to - ws, s - ws),
                kv_cache=cache, cache_update=True, logits_at=slice(0, 0))
            steps.called(rows, s - cached_to)
            cached_to = s
        prefix = None if cache is not None else z[:, ws:s]
        ctx = BlockContext(process, bs, s - ws, cache, prefix)
        out = inners[s].sample(network, ctx, Canvas(z[:, s:e], ~fixed[:, s:e]), generators_of(generator, rows))
        z[:, s:e] = out.tokens
        steps.nfe += out.nfe
        steps.nfe_per_row += out.nfe_per_row
    return steps.output(z)


def time_alternated(repeats: int, old_fn, new_fn, per: int) -> tuple[float, float]:
    """Median seconds per step of old_fn and new_fn, run alternately `repeats` times each (per: steps per call)."""
    old, new = [], []
    for _ in range(repeats):
        for fn, out in ((old_fn, old), (new_fn, new)):
            start = time.perf_counter()
            with torch.no_grad():
                fn()
            out.append((time.perf_counter() - start) / per)
    return sorted(old)[len(old) // 2], sorted(new)[len(new) // 2]


def step_api(repeats: int, B: int, L: int, n_steps: int) -> None:
    import platform

    torch.set_num_threads(2)
    keep_freed_memory()  # as `dlm sample` does (dlm/allocator.py): without it page faults of freed logits dominate
    cfg = build_config(["model=tiny"])
    cfg.model.vocab_size = 8192
    torch.manual_seed(0)
    net, proc = Transformer(cfg.model).eval(), make_process(cfg.process, 8191)
    tokens = torch.full((B, L), 8191)
    tokens[:, 0] = 0
    canvas = Canvas.from_fixed(tokens, tokens != 8191)
    print(f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}; tiny preset, {B} x {L}, "
          f"{n_steps} steps, float32, per-row generators; seconds per step, median of the alternated repeats")
    print("| sampler | legacy loop (s/step) | step API (s/step) | step API / legacy | same tokens |")
    print("|---|---|---|---|---|")
    from dlm.sampler.registry import make_sampler

    for name, legacy in (("ancestral", legacy_ancestral), ("ancestral_cache", legacy_ancestral),
                         ("remdm_cap", legacy_remdm)):
        sampler = make_sampler(name, steps=n_steps)
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(B)]  # noqa: E731
        with torch.no_grad():
            same = torch.equal(legacy(sampler, net, proc, canvas, gens()).tokens,
                               sampler.sample(net, proc, canvas, gens()).tokens)  # also the warm-up
        old, new = [], []
        for _ in range(repeats):
            for fn, out in ((lambda: legacy(sampler, net, proc, canvas, gens()), old),
                            (lambda: sampler.sample(net, proc, canvas, gens()), new)):
                start = time.perf_counter()
                with torch.no_grad():
                    fn()
                out.append((time.perf_counter() - start) / (n_steps + 1))  # the steps and the final argmax
        o, n = sorted(old)[len(old) // 2], sorted(new)[len(new) // 2]
        print(f"| {name} | {o:.4f} | {n:.4f} | {n / o:.3f} | {same} |")
    from dlm.sampler.llada import LLaDASampler

    prompted = tokens.clone()  # the first half given (BOS, then token ids), the second half generated in 2 blocks
    prompted[:, 1:L // 2] = torch.arange(1, L // 2) % 8000 + 1
    canvas = Canvas.from_fixed(prompted, (torch.arange(L) < L // 2).expand(B, L))
    for cache in ("none", "dual"):
        sampler = LLaDASampler(steps=n_steps, block_length=L // 4, temperature=1.0, cache=cache)
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(B)]  # noqa: E731
        with torch.no_grad():
            old_out = legacy_llada(sampler, net, proc, canvas, gens())  # also the warm-up
            new_out = sampler.sample(net, proc, canvas, gens())
        same = torch.equal(old_out.tokens, new_out.tokens) and old_out.nfe == new_out.nfe
        o, n = time_alternated(repeats, lambda: legacy_llada(sampler, net, proc, canvas, gens()),
                               lambda: sampler.sample(net, proc, canvas, gens()), new_out.nfe)
        print(f"| llada (cache={cache}) | {o:.4f} | {n:.4f} | {n / o:.3f} | {same} |")
    bd3 = build_config(["model=tiny", "process=bd3lm", f"process.block_size={L // 4}"])
    bd3_proc = make_process(bd3.process, 8191)
    for kv_cache in (True, False):  # the second half in 2 blocks, the inner cached ancestral sampler
        sampler = make_sampler("blockwise", steps=n_steps, temperature=1.0, block_length=L // 4, kv_cache=kv_cache)
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(B)]  # noqa: E731
        with torch.no_grad():
            old_out = legacy_blockwise(sampler, net, bd3_proc, canvas, gens())  # also the warm-up
            new_out = sampler.sample(net, bd3_proc, canvas, gens())
        same = torch.equal(old_out.tokens, new_out.tokens) and old_out.nfe == new_out.nfe
        o, n = time_alternated(repeats, lambda: legacy_blockwise(sampler, net, bd3_proc, canvas, gens()),
                               lambda: sampler.sample(net, bd3_proc, canvas, gens()), new_out.nfe)
        print(f"| blockwise (bd3lm, kv_cache={kv_cache}) | {o:.4f} | {n:.4f} | {n / o:.3f} | {same} |")


def main() -> None:
    if "--step-api" in sys.argv:
        arg = lambda name, default: int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default  # noqa
        return step_api(arg("--repeats", 5), arg("--batch", 8), arg("--length", 128), arg("--steps", 32))
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
