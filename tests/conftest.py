"""Shared fixtures: tiny random-weight models saved the way `save_pretrained` saves them.

They stand in for real checkpoints wherever a test needs *a* model of a given architecture
rather than a trained one (loading, shapes, error paths).
"""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest

SPECIALS = ["<|endoftext|>", "<think>", "</think>"]


def pytest_addoption(parser):
    parser.addoption("--browser", action="store_true",
                     help="also run the browser tests (JupyterLab in headless Chromium)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--browser"):
        return
    skip = pytest.mark.skip(reason="a browser test: opt in with --browser")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


def _train_tokenizer(vocab_size: int = 300, specials: list[str] = SPECIALS):
    """A byte-level BPE shaped like the zoo's: BOS added, <think> tokens special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = inspect.getsource(inspect) + inspect.getsource(Path)
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])


def make_model_dir(folder: Path, kind: str = "llama", vocab_size: int = 300,
                   think_tokens: bool = True, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

    tokenizer = _train_tokenizer(vocab_size, SPECIALS if think_tokens else SPECIALS[:1])
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
                  # a wide init gives peaked next-token distributions, closer to a trained
                  # model's, so truncation knobs (top-p, min-p, ...) have something to cut
                  initializer_range=0.3)
    if kind == "llama":
        config = LlamaConfig(**common)
    else:
        config = MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
    if think_tokens:
        config.think_tokens = ["<think>", "</think>"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny-mixtral", kind="mixtral")


def compiled(llm):
    """The engine as users get it once its decode step (compiled on a CPU) is ready:
    single-row requests run it there (the eager forward has tests of its own)."""
    step = llm.engine.runner.step
    assert step is None or step.wait(timeout=600), step.error
    return llm


# The shared engines run in float32 on any device, so that numbers compare with a
# reference forward to float32 tolerances (on a GPU the default would be bfloat16).
@pytest.fixture(scope="session")
def llm(llama_dir):
    import toolkit as tk
    return compiled(tk.load(llama_dir, dtype="float32"))


@pytest.fixture(scope="session")
def moe_llm(moe_dir):
    import toolkit as tk
    return compiled(tk.load(moe_dir, dtype="float32"))


def forward_logprobs(llm, ids):
    """Reference: the HF model's own forward over `ids`, float32 log-probs on the host;
    row j scores token j + 1."""
    import torch

    with torch.no_grad():
        logits = llm.model(input_ids=torch.tensor([ids], device=llm.device)).logits[0]
    return logits.float().log_softmax(-1).cpu()


def settled(llm, timeout=10.0):
    """Whether the engine has dropped every request (cancellation is seen at the next step
    boundary, so allow it a moment)."""
    import time

    deadline = time.monotonic() + timeout
    while llm.engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    return llm.engine.in_flight == 0


def free_port() -> int:
    """A loopback port nothing listens on (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
