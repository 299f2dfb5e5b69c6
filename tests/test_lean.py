"""The lean forward against the HF forward it replaces, for each architecture it claims."""
from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig,
                          Qwen2Config)

from toolkit.engine.compiled import CompiledStep, narrowest
from toolkit.engine.lean import LeanModel, supports

# The package is what a CPU-only machine gets. Where CUDA is, `toolkit.load` captures CUDA
# graphs instead (tests/test_gpu_path.py), and loading a CPU package there segfaulted once
# (torch 2.11+cu130, H200 image): runner.make_runner does not build one there.
package_step = pytest.mark.skipif(torch.cuda.is_available(),
                                  reason="the compiled package is for CPU-only machines")

COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              initializer_range=0.2)
CONFIGS = {
    "llama": LlamaConfig(**COMMON),
    "llama3-rope": LlamaConfig(**COMMON, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": MistralConfig(**COMMON, sliding_window=None, head_dim=16),
    "qwen2": Qwen2Config(**COMMON),
    "mixtral": MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_lean_matches_hf_for_prefill_and_ragged_decode(name):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]).eval()
    assert supports(model)
    lean = LeanModel(model)
    ids = torch.randint(0, 97, (1, 12))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits[0]
        cache = lean.new_cache(rows=3, capacity=4)               # grows as needed
        hidden, _, _ = lean.forward(ids, torch.arange(12)[None], cache, slice(0, 1))
        assert torch.allclose(lean.logits(hidden[0]), ref, atol=1e-4)
        # rows at different lengths decode side by side
        cache = lean.new_cache(rows=3, capacity=4)
        lean.forward(ids[:, :8], torch.arange(8)[None], cache, slice(0, 1))
        cache.copy_row(0, [1], 8)
        lean.forward(ids[:, :5], torch.arange(5)[None], cache, slice(2, 3))
        pos = torch.tensor([8, 8, 5])
        for t in range(4):
            tokens = torch.stack([ids[0, 8 + t], ids[0, 8 + t], ids[0, 5 + t]])
            hidden, _, _ = lean.forward(tokens[:, None], (pos + t)[:, None], cache,
                                        slice(None))
            logits = lean.logits(hidden[:, 0])
            assert torch.allclose(logits[0], ref[8 + t], atol=1e-4)
            assert torch.allclose(logits[1], ref[8 + t], atol=1e-4)
            assert torch.allclose(logits[2], ref[5 + t], atol=1e-4)


@package_step
@pytest.mark.parametrize("name", CONFIGS)
def test_compiled_step_matches_hf_and_the_eager_forward(name):
    """The compiled one-row step: the HF logits, and the eager forward's residual streams
    and routing, token by token from a one-token prompt while the cache grows."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]).eval()
    model.half().float()                  # float16-exact weights: the step keeps them narrow
    lean = LeanModel(model)
    step = CompiledStep(lean)
    assert step.weights[2].dtype == torch.float16
    assert step.wait(timeout=600)
    ids = torch.randint(0, 97, (1, 12))
    layers = tuple(range(len(lean.layers)))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits[0]
        cache, eager = lean.new_cache(rows=1, capacity=2), lean.new_cache(rows=1, capacity=2)
        for c in (cache, eager):
            lean.forward(ids[:, :1], torch.zeros(1, 1, dtype=torch.long), c, slice(0, 1))
        for p in range(1, 12):
            hidden, logits, streams, route = step(cache, ids[0, p:p + 1], [p])
            assert torch.allclose(logits[0], ref[p], atol=1e-4)
            e_hidden, e_route, e_streams = lean.forward(
                ids[:, p:p + 1], torch.tensor([[p]]), eager, slice(0, 1), layers)
            assert torch.allclose(hidden, e_hidden[:, 0], atol=1e-5)
            assert torch.allclose(streams, e_streams[:, 0], atol=1e-5)
            assert (route is None) == (e_route is None)
            if route is not None:
                assert torch.equal(route[0], e_route[0][:, 0])
                assert torch.allclose(route[1], e_route[1][:, 0], atol=1e-6)


def test_narrowest_keeps_every_value_exactly():
    halves = torch.randn(8, 8).half().float()
    assert narrowest(halves).dtype == torch.float16
    big = (torch.randn(8, 8) * 1e10).bfloat16().float()   # beyond float16, bfloat16-exact
    assert narrowest(big).dtype == torch.bfloat16
    full = torch.randn(8, 8)
    assert narrowest(full) is full
    for w in (halves, big):
        assert torch.equal(narrowest(w).float(), w)


@package_step
def test_a_step_that_cannot_compile_falls_back_to_eager(llama_dir, monkeypatch, tmp_path):
    import sys

    import toolkit as tk
    from toolkit.engine import compiled

    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path))      # nothing compiled there
    monkeypatch.setattr(compiled, "_build_command", lambda spec, path: [
        sys.executable, "-c", "raise SystemExit('no C++ compiler')"])
    llm = tk.load(llama_dir, compile=True)
    step = llm.engine.runner.step
    assert not step.wait(timeout=60) and "no C++ compiler" in str(step.error)
    kwargs = dict(prompt="def f(x):", max_tokens=6, logprobs=True, seed=1)
    with pytest.warns(RuntimeWarning, match="compiled decode step is unavailable"):
        resp = llm.completions.create(**kwargs)
    again = llm.completions.create(**kwargs)         # quietly eager from now on
    eager = tk.load(llama_dir, compile=False).completions.create(**kwargs)
    for r in (resp, again):
        assert r.choices[0].text == eager.choices[0].text
        assert [c.logprob for c in r.choices[0].logprobs.content] == pytest.approx(
            [c.logprob for c in eager.choices[0].logprobs.content], abs=1e-5)


def test_unsupported_shapes_fall_back_to_hf():
    windowed = MistralConfig(**COMMON, sliding_window=8)
    assert not supports(AutoModelForCausalLM.from_config(windowed))
    from transformers import GPT2Config
    assert not supports(AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2, n_positions=64)))


def test_gpt2_runs_through_the_hf_runner(tmp_path, llama_dir):
    """Any other architecture is served by its own HF forward, with the same API."""
    from transformers import AutoTokenizer, GPT2Config

    import toolkit as tk
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                        n_positions=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    llm = tk.load(tmp_path / "gpt2", dtype="float32")
    assert type(llm.engine.runner).__name__ == "HFRunner"
    resp = llm.completions.create(prompt="def f():", max_tokens=5, logprobs=True, seed=0,
                                  include_last_activation=True, echo=True, raw_output=True)
    ids = resp.choices[0].raw_output.completion_token_ids
    with torch.no_grad():
        ref = llm.model(input_ids=torch.tensor([ids], device=llm.device)).logits[0]
        ref = ref.float().log_softmax(-1).cpu()
    for pos, entry in enumerate(resp.choices[0].logprobs.content[1:], start=1):
        assert entry.logprob == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)


@package_step
def test_a_compiled_step_is_kept_for_the_next_model_of_its_shape(llm, monkeypatch):
    """The `llm` fixture's step was built; another model of that shape loads the package
    from disk at once, without building anything."""
    from toolkit.engine import compiled

    monkeypatch.setattr(compiled, "_build_command", lambda spec, path: pytest.fail(
        "a package on disk was compiled again"))
    again = compiled.CompiledStep(llm.engine.runner.lean)
    assert again.path == llm.engine.runner.step.path and again.path.exists()
    assert again.wait(timeout=30)


def test_the_compile_thread_never_owns_the_model(llm, monkeypatch, tmp_path):
    """A model dropped while its step compiles (or loads) is freed at once, by whoever
    drops it. Were the background thread to hold it, the thread would free its tensors
    when it ends, which can be while the interpreter exits: an abort ("terminate called
    without an active exception"), seen in about one process in 35 that dropped its
    model right after `toolkit.load`."""
    import gc
    import threading
    import weakref

    from toolkit.engine import compiled

    building = threading.Event()
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path))       # nothing compiled there
    monkeypatch.setattr(compiled, "_build_in_child", lambda spec, path: building.wait(60))
    step = compiled.CompiledStep(llm.engine.runner.lean)
    alive = weakref.ref(step)
    try:
        del step
        gc.collect()
        assert alive() is None
    finally:
        building.set()


@package_step
def test_the_step_compiles_in_a_child_process(llama_dir, monkeypatch, tmp_path):
    """Compiling never runs in the process that decodes (where it would hold the
    interpreter lock against the requests decoding meanwhile): with this process's
    compiler broken, the step still compiles, and matches the eager forward."""
    import toolkit as tk

    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: 1 / 0)
    llm = tk.load(llama_dir, compile=True, dtype="float32")    # float32 on any device
    assert llm.engine.runner.step.wait(timeout=600), llm.engine.runner.step.error
    assert list(tmp_path.glob("compiled-steps/*.pt2")) == [llm.engine.runner.step.path]
    kwargs = dict(prompt="def f(x):", max_tokens=8, logprobs=True, temperature=0)
    eager = tk.load(llama_dir, compile=False, dtype="float32").completions.create(**kwargs)
    resp = llm.completions.create(**kwargs)
    assert resp.choices[0].text == eager.choices[0].text
    assert [c.logprob for c in resp.choices[0].logprobs.content] == pytest.approx(
        [c.logprob for c in eager.choices[0].logprobs.content], abs=1e-5)


@package_step
def test_the_compiled_step_decodes_rows_of_different_lengths(llm):
    """Several rows at once, each at its own position, as the eager batch does them."""
    lean, step = llm.engine.runner.lean, llm.engine.runner.step
    ids = torch.randint(0, 97, (3, 10), device=lean.device)
    lengths = [3, 7, 5]
    with torch.inference_mode():
        caches = [lean.new_cache(rows=3, capacity=4) for _ in range(2)]
        for cache in caches:
            for r, n in enumerate(lengths):
                lean.forward(ids[r:r + 1, :n], torch.arange(n, device=lean.device)[None],
                             cache, slice(r, r + 1))
        tokens = ids[torch.arange(3, device=lean.device), lengths]
        hidden, logits, streams, _ = step(caches[0], tokens, lengths)
        e_hidden, _, _ = lean.forward(tokens[:, None],
                                      torch.tensor(lengths, device=lean.device)[:, None],
                                      caches[1], slice(None))
    assert torch.allclose(hidden, e_hidden[:, 0], atol=1e-5)
    assert torch.allclose(logits, lean.logits(e_hidden[:, 0]), atol=1e-4)
    for r, n in enumerate(lengths):           # each row's new keys went to its position
        assert torch.allclose(caches[0].k[:, r, :, n], caches[1].k[:, r, :, n], atol=1e-5)
