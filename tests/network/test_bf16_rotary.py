"""bf16 as the families compute it: LLaDA rotates q and k in float32 on bf16 weights (`rope_full_precision`), the Qwen
layouts (Dream) in bf16 with bf16 cos/sin. Checked against an independent bf16 forward of LLaDA written here from its
published architecture (OLMo "llama" block: RMSNorm normalised in float32 then cast back and scaled in bf16, bias-free
q/k/v, float32 rotate-half RoPE cast back to bf16, non-causal SDPA, SwiGLU `ff_out(silu(ff_proj(x)) * up_proj(x))`)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import dlm.network.attention as attention
from dlm.network.families import load_pretrained_network
from dlm.network.rotary import apply_rotary
from tests.network.checkpoints import llada_checkpoint, qwen_model, qwen_style_checkpoint


def llada_reference(state: dict, cfg: dict, x: torch.Tensor, float32_rope: bool = True) -> torch.Tensor:
    """LLaDA's logits (B, T, V) in the weights' dtype for ids x (B, T)."""
    d, H, kv, eps = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["rms_norm_eps"]
    hd, (B, T) = d // H, x.shape
    w = lambda name: state[f"model.transformer.{name}.weight"]  # noqa: E731

    def norm(h, weight):
        h32 = h.float()
        return weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)

    angles = torch.arange(T, dtype=torch.float32)[:, None] / cfg["rope_theta"] ** (
        torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.cat((angles, angles), -1)  # (T, hd): the angle of pair i at i and i + hd/2

    def rope(t):
        u = t.float() if float32_rope else t
        first, second = u.chunk(2, -1)
        rotated = u * angles.cos().to(u.dtype) + torch.cat((-second, first), -1) * angles.sin().to(u.dtype)
        return rotated.to(t.dtype)

    h = F.embedding(x, w("wte"))
    for i in range(cfg["n_layers"]):
        b = f"blocks.{i}"
        a = norm(h, w(f"{b}.attn_norm"))
        q = F.linear(a, w(f"{b}.q_proj")).view(B, T, H, hd).transpose(1, 2)
        k = F.linear(a, w(f"{b}.k_proj")).view(B, T, kv, hd).transpose(1, 2).repeat_interleave(H // kv, 1)
        v = F.linear(a, w(f"{b}.v_proj")).view(B, T, kv, hd).transpose(1, 2).repeat_interleave(H // kv, 1)
        o = F.scaled_dot_product_attention(rope(q), rope(k), v).transpose(1, 2).reshape(B, T, d)
        h = h + F.linear(o, w(f"{b}.attn_out"))
        m = norm(h, w(f"{b}.ff_norm"))
        h = h + F.linear(F.silu(F.linear(m, w(f"{b}.ff_proj"))) * F.linear(m, w(f"{b}.up_proj")), w(f"{b}.ff_out"))
    return F.linear(norm(h, w("ln_f")), w("ff_out"))


def ulp(scale: float) -> float:
    """The spacing of bf16 numbers around `scale` (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(scale)) - 7)


@torch.no_grad()
def test_llada_bf16_logits_match_float32_rotary_reference(tmp_path, monkeypatch):
    """Both sides use SDPA (dlm's attention on GPUs; on CPUs dlm's chunked bf16 attention rounds the scores to bf16,
    a separate difference, docs/open_models.md), so what remains is the rotation. Before (bf16 rotation): max |diff|
    0.199 at logit scale 6.9, argmax 92/96 (this AVX2 CPU); after: 0.0, 96/96. The bound allows one bf16 ulp at the
    logit scale for kernels that differ elsewhere (AMX / AVX512-BF16)."""
    from safetensors.torch import load_file

    llada_checkpoint(tmp_path, shards=1, dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    state = load_file(str(tmp_path / "model.safetensors"))
    net, _ = load_pretrained_network(tmp_path)
    assert net.cfg.rope_float32 and {p.dtype for p in net.parameters()} == {torch.bfloat16}
    monkeypatch.setattr(attention, "CHUNKED_DTYPES", ())  # SDPA on this CPU too, as LLaDA's code calls it
    x = torch.randint(0, 5000, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = llada_reference(state, cfg, x).float()
    bound = ulp(ref.abs().max().item())

    def measure(flag: bool):
        for block in net.blocks:
            block.attn.rope_float32 = flag
        ours = net(x).float()
        return (ours - ref).abs().max().item(), (ours.argmax(-1) == ref.argmax(-1)).sum().item()

    (before, agree_before), (after, agree_after) = measure(False), measure(True)
    assert after <= bound < before, (before, after, bound)
    assert agree_after >= agree_before and agree_after >= x.numel() - 1
    # The reference itself with a bf16 rotation is what dlm computed before: the difference is the rotation.
    assert (llada_reference(state, cfg, x, float32_rope=False).float() - ref).abs().max().item() > bound


def test_the_float32_rotation_changes_nothing_in_float32():
    g = torch.Generator().manual_seed(0)
    x, angles = torch.randn(2, 4, 16, 8, generator=g), torch.randn(16, 4, generator=g)
    assert torch.equal(apply_rotary(x, angles.cos(), angles.sin(), True), apply_rotary(x, angles.cos(), angles.sin()))
    assert apply_rotary(x.double(), angles.cos(), angles.sin(), True).dtype == torch.float64  # never narrowed
    bf = apply_rotary(x.bfloat16(), angles.cos(), angles.sin(), True)
    assert bf.dtype == torch.bfloat16
    assert torch.equal(bf, apply_rotary(x.bfloat16().float(), angles.cos(), angles.sin()).bfloat16())  # rounded once


@pytest.mark.parametrize("flag,expected", [({}, True), ({"rope_full_precision": False}, False)])
def test_llada_reads_rope_full_precision(tmp_path, flag, expected):
    llada_checkpoint(tmp_path, shards=1)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **flag}))
    assert load_pretrained_network(tmp_path)[0].cfg.rope_float32 is expected


def test_qwen_layouts_keep_the_bf16_rotation(tmp_path):
    """transformers' Qwen2 (Dream's modeling file copies it) rounds cos/sin to the weights' dtype and rotates there."""
    qwen_style_checkpoint(tmp_path, qwen_model(2), "Dream", ["DreamModel"], mask_token_id=151666)
    assert load_pretrained_network(tmp_path)[0].cfg.rope_float32 is False
