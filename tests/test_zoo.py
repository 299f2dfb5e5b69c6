"""The embedded models: present, offline, small, and as good as their cards say.

Each figure is recomputed here on slices of the held-out stdlib test suite and held to the
thresholds the zoo promises (DESIGN §6, issue 16): tiny-code's and the MoE's perplexity at
most a fifth of a unigram model's fitted on the same text, whichever slice is taken; the
draft agreeing with tiny-code on at least 60% of the next tokens while clearly weaker; no
dead expert; the cards' completions going on with a function's body, without loops.
"""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import toolkit as tk
from toolkit.models import ZOO_DIR, ZOO_NAMES
from toolkit.models import evaluate as ev

pytestmark = pytest.mark.skipif(not (ZOO_DIR / "tiny-code" / "config.json").exists(),
                                reason="zoo weights not present")


@pytest.fixture(scope="module")
def zoo():
    return {name: tk.load(name, compile=False) for name in ZOO_NAMES}


@pytest.fixture(scope="module")
def heldout(zoo):
    # the cards' held-out text (every 10th stdlib test file), its first 60k tokens
    files = ev.heldout_files()
    if not files:
        pytest.skip("this Python ships no test suite to hold out")
    return ev.encode_documents(zoo["tiny-code"].tokenizer,
                               [f.read_text(encoding="utf-8") for f in files],
                               max_tokens=60_000)


def test_default_model_is_tiny_code():
    assert tk.load(compile=False).name == "tiny-code"


def test_shapes_and_shared_tokenizer(zoo):
    dense, moe, draft = zoo["tiny-code"].info, zoo["tiny-code-moe"].info, \
        zoo["tiny-code-draft"].info
    assert dense.architecture == "LlamaForCausalLM" and dense.context_length == 1024
    assert 5e6 <= dense.num_parameters <= 12e6
    assert moe.architecture == "MixtralForCausalLM"
    assert (moe.num_experts, moe.experts_per_token) == (8, 2)
    assert draft.num_parameters <= dense.num_parameters / 5
    vocab = zoo["tiny-code"].tokenizer.get_vocab()
    for llm in zoo.values():
        assert llm.tokenizer.get_vocab() == vocab
        assert llm.info.think_token_ids == (vocab["<think>"], vocab["</think>"])
        assert llm.info.eos_token_ids == (vocab["<|endoftext|>"],)
        assert llm.tokenizer("x")["input_ids"][0] == llm.info.bos_token_id


def test_zoo_fits_in_32_mb():
    size = sum(f.stat().st_size for f in ZOO_DIR.rglob("*") if f.is_file())
    assert size < 32 * 2**20


@pytest.mark.parametrize("name", ["tiny-code", "tiny-code-moe"])
@pytest.mark.parametrize("offset", range(10))
def test_perplexity_is_under_a_fifth_of_unigram_on_any_slice(name, offset, zoo, heldout):
    # every 10th file from the offset-th (the cards' slice is offset 0): all ten slices
    # together cover the whole test suite; 20k tokens of each
    texts = [f.read_text(encoding="utf-8", errors="replace")   # one file is not UTF-8
             for f in ev.heldout_files(offset=offset)]
    if not texts:     # a Python that ships a few test files only (Debian's) lacks slices
        pytest.skip(f"no held-out files at offset {offset}")
    docs = ev.encode_documents(zoo[name].tokenizer, texts, max_tokens=20_000)
    assert ev.perplexity(zoo[name].model, docs) <= 0.2 * ev.unigram_perplexity(docs)


def test_draft_agrees_with_tiny_code(zoo, heldout):
    agreement = ev.greedy_agreement(zoo["tiny-code-draft"].model, zoo["tiny-code"].model,
                                    heldout)
    assert agreement >= 0.6


def test_draft_is_clearly_weaker(zoo, heldout):
    dense = ev.perplexity(zoo["tiny-code"].model, heldout)
    assert ev.perplexity(zoo["tiny-code-draft"].model, heldout) >= 1.1 * dense


def test_moe_has_no_dead_experts(zoo, heldout):
    usage = ev.expert_usage(zoo["tiny-code-moe"].model, heldout)
    assert usage.shape == (4, 8)
    assert (usage > 0).all()


def test_tiny_code_writes_python(zoo):
    resp = zoo["tiny-code"].completions.create(
        prompt="def read_lines(path):\n    with open(path) as f:\n        ",
        max_tokens=40, temperature=0)
    text = resp.choices[0].text
    assert "\ufffd" not in text
    assert any(word in text for word in ("return", "with ", "open(", "for ", " = "))


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_cards_carry_their_figures(name, zoo):
    card = json.loads((ZOO_DIR / name / "card.json").read_text())
    readme = (ZOO_DIR / name / "README.md").read_text()
    assert card["parameters"] == zoo[name].info.num_parameters
    figures = card["figures"]
    assert str(figures["heldout_perplexity"]) in readme
    assert card["training"]["hardware"] in readme and card["training"]["tokens"] > 0
    assert figures["samples"] and figures["heldout_tokens"] > 0
    if name != "tiny-code-draft":
        assert figures["perplexity_ratio"] <= 0.2
    if name == "tiny-code-draft":
        assert figures["greedy_agreement_with_tiny_code"] >= 0.6
    if name == "tiny-code-moe":
        assert min(min(row) for row in figures["expert_usage"]) > 0


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_cards_completions_write_a_body_without_loops(name, zoo):
    samples = json.loads((ZOO_DIR / name / "card.json").read_text())["figures"]["samples"]
    assert len(samples) == 6
    for sample in samples:
        assert ev.has_body(sample["prompt"], sample["completion"]), sample["completion"]
        ids = zoo[name].tokenizer(sample["completion"], add_special_tokens=False)["input_ids"]
        assert ev.longest_run(ids) <= 3, sample["completion"]


def test_card_completion_loop_matches_the_engine():
    # the cards' plain loop (OpenAI penalties over the output) against the engine
    llm = tk.load("tiny-code", device="cpu", compile=False)
    prompt = 'def gcd(a, b):\n    """Greatest common divisor using Euclid\'s algorithm."""'
    for knobs in ({"frequency_penalty": 0.5}, {"frequency_penalty": 0.3, "presence_penalty": 1}):
        resp = llm.completions.create(prompt=prompt, max_tokens=48, temperature=0, **knobs)
        assert ev.greedy_completion(llm.model, llm.tokenizer, prompt, **knobs) \
            == resp.choices[0].text
    assert ev.greedy_completion(llm.model, llm.tokenizer, prompt) != resp.choices[0].text


def test_longest_run_and_has_body():
    assert ev.longest_run([1, 2, 3]) == 1
    assert ev.longest_run([7, 1, 2, 1, 2, 1, 2, 9]) == 3
    assert ev.longest_run([5] * 4) == 4
    header = 'def f(x):\n    """Double."""'
    assert ev.has_body(header, "\n    return 2 * x")
    assert not ev.has_body(header, "\n\n    def g(y):")   # a method of a class, not a body
    assert not ev.has_body(header, "\n\nimport sys")
    assert not ev.has_body(header, "\n\n")


def _build_isolation() -> list[str]:
    """Build with the installed setuptools where it is recent enough (a machine without
    a package index, such as the GPU machines, cannot fetch one for an isolated build)."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return []
    return ["--no-build-isolation"] if major >= 77 else []


def test_wheel_carries_the_zoo(tmp_path):
    root = Path(__file__).parents[1]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                            *_build_isolation(), "-w", str(tmp_path), str(root)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("toolkit-*.whl"))).namelist()
    for model in ZOO_NAMES:
        for file in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
            assert f"toolkit/models/zoo/{model}/{file}" in names
