"""Models split across devices (`toolkit.load(..., device_map=...)`, through accelerate): the
same tokens and logprobs as the model on one device."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import toolkit as tk

# half the layers on the CPU, half offloaded to disk (loaded by accelerate's hooks per use)
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
         "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
REQUESTS = [dict(prompt="def parse(text):\n    ", max_tokens=10, temperature=0, logprobs=True,
                 top_logprobs=3, echo=True, include_last_activation=True),
            dict(prompt=["import os\n", "class A:"], n=2, max_tokens=8, seed=5,
                 temperature=0.9, logprobs=True)]


def _same(split, whole, fields):
    got, want = split.completions.create(**fields), whole.completions.create(**fields)
    assert [c.text for c in got.choices] == [c.text for c in want.choices]
    a, b = got.tokens(), want.tokens()
    pd.testing.assert_frame_equal(a.drop(columns=["logprob", "sampling_logprob", "entropy"]),
                                  b.drop(columns=["logprob", "sampling_logprob", "entropy"]))
    for column in ("logprob", "sampling_logprob"):
        np.testing.assert_allclose(a[column], b[column], atol=2e-5)
    return got, want


@pytest.fixture(scope="module")
def whole(llama_dir):
    # on the CPU, where the split model executes (on a GPU machine too)
    return tk.load(llama_dir, device="cpu", dtype="float32", compile=False)


@pytest.fixture(scope="module")
def split(llama_dir):
    return tk.load(llama_dir, dtype="float32", device_map=SPLIT)


def test_a_split_model_says_where_it_lies(split):
    assert "split over cpu+disk (HF forward)" in repr(split)
    assert type(split.engine.runner).__name__ == "HFRunner"
    assert split.device == torch.device("cpu")


@pytest.mark.parametrize("fields", REQUESTS, ids=["greedy-echo", "sampled"])
def test_a_split_model_gives_the_single_device_numbers(split, whole, fields):
    got, want = _same(split, whole, fields)
    if fields.get("include_last_activation"):
        (index, a), (same_index, b) = (tk.frames.activation_matrix(r) for r in (got, want))
        assert index.equals(same_index)
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_split_moe_routes_as_on_one_device(moe_dir):
    fields = dict(prompt="def f(x):", max_tokens=6, temperature=0, logprobs=True,
                  include_routing_matrix=True)
    whole = tk.load(moe_dir, device="cpu", dtype="float32", compile=False)
    split = tk.load(moe_dir, dtype="float32", device_map=SPLIT)
    got, want = _same(split, whole, fields)
    pd.testing.assert_frame_equal(got.routing().drop(columns="weight"),
                                  want.routing().drop(columns="weight"))


def test_auto_on_one_device_keeps_the_lean_forward(llama_dir):
    auto = tk.load(llama_dir, dtype="float32", device_map="auto", compile=False)
    assert "split" not in repr(auto) and type(auto.engine.runner).__name__ == "LeanRunner"
    # "auto" fills the first GPU where there is one: compare on the device it chose
    _same(auto, tk.load(llama_dir, device=auto.device, dtype="float32", compile=False),
          REQUESTS[0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_over_two_gpus(llama_dir):
    layers = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
              "model.layers.1": 1, "model.norm": 1, "lm_head": 0}
    two = tk.load(llama_dir, dtype="float32", device_map=layers)
    assert "split over cuda:0+cuda:1" in repr(two)
    _same(two, tk.load(llama_dir, device="cuda:0", dtype="float32", compile=False),
          REQUESTS[1])
