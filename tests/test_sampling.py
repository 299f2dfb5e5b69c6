"""Sampling against independent references: transformers' own logits processors for the
distribution each knob defines, and a chi-square test for the draws themselves."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                          TypicalLogitsWarper)

from toolkit.engine.sampler import row_seed, uniform

PROMPT = "def add(a, b):\n    return a + b\n"


def raw_logits(llm, ids):
    with torch.no_grad():
        return llm.model(input_ids=torch.tensor([ids], device=llm.device)).logits[0, -1] \
            .float().cpu()


def reference_distribution(llm, prompt_ids, output_ids, knobs):
    """Log-probs of the next token after prompt+output, processed with HF's processors
    (and the OpenAI penalty formula, which HF lacks), in the hosted API's order."""
    x = raw_logits(llm, prompt_ids + output_ids)[None]
    ids = torch.tensor([prompt_ids + output_ids])
    for token, bias in knobs.get("logit_bias", {}).items():
        x[0, int(token)] += bias
    if "repetition_penalty" in knobs:
        x = RepetitionPenaltyLogitsProcessor(knobs["repetition_penalty"])(ids, x)
    if "frequency_penalty" in knobs or "presence_penalty" in knobs:
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long),
                                minlength=x.shape[-1]).float()
        x = x - counts * knobs.get("frequency_penalty", 0) \
            - (counts > 0) * knobs.get("presence_penalty", 0)
    if knobs.get("temperature", 1.0) != 1.0:
        x = TemperatureLogitsWarper(knobs["temperature"])(ids, x)
    if knobs.get("top_k"):
        x = TopKLogitsWarper(knobs["top_k"])(ids, x)
    if "top_p" in knobs:
        x = TopPLogitsWarper(knobs["top_p"])(ids, x)
    if "min_p" in knobs:
        x = MinPLogitsWarper(knobs["min_p"])(ids, x)
    if "typical_p" in knobs:
        x = TypicalLogitsWarper(knobs["typical_p"])(ids, x)
    return x[0].log_softmax(-1)


KNOBS = [
    {"temperature": 0.7},
    {"temperature": 1.3, "top_k": 7},
    {"top_p": 0.6},
    {"min_p": 0.3, "temperature": 1.2},
    {"typical_p": 0.5},
    {"repetition_penalty": 1.6},
    {"repetition_penalty": 0.7, "temperature": 0.8},
    {"frequency_penalty": 1.5, "presence_penalty": 0.5},
    {"frequency_penalty": -1.0, "top_k": 20},
    {"logit_bias": {"12": 5.0, "40": -100}},
    {"temperature": 1.5, "top_k": 30, "top_p": 0.9, "min_p": 0.05, "typical_p": 0.95,
     "repetition_penalty": 1.1, "presence_penalty": 0.3},
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(k))
def test_sampling_logprob_is_the_processed_distribution(llm, knobs):
    resp = llm.completions.create(prompt=PROMPT, max_tokens=8, logprobs=True, seed=11,
                                  raw_output=True, **knobs)
    prompt_ids = resp.choices[0].raw_output.prompt_token_ids
    out: list[int] = []
    for entry in resp.choices[0].logprobs.content:
        ref = reference_distribution(llm, prompt_ids, out, knobs)
        assert entry.sampling_logprob == pytest.approx(ref[entry.token_id].item(), abs=1e-4)
        assert ref[entry.token_id] > -math.inf      # never a token the knobs removed
        out.append(entry.token_id)


def test_greedy_is_argmax_of_processed_logits(llm):
    knobs = {"temperature": 0, "repetition_penalty": 1.8, "logit_bias": {"7": 2.0}}
    resp = llm.completions.create(prompt=PROMPT, max_tokens=8, logprobs=True, raw_output=True,
                                  **knobs)
    prompt_ids = resp.choices[0].raw_output.prompt_token_ids
    out: list[int] = []
    for entry in resp.choices[0].logprobs.content:
        ref = reference_distribution(llm, prompt_ids, out, {**knobs, "temperature": 1.0})
        assert entry.token_id == int(ref.argmax())
        assert entry.sampling_logprob == 0.0
        out.append(entry.token_id)


def test_mirostat_v2_against_a_reference_loop(llm):
    tau, lr = 3.0, 0.2
    resp = llm.completions.create(prompt=PROMPT, max_tokens=10, logprobs=True, seed=2,
                                  raw_output=True, mirostat_target=tau, mirostat_lr=lr,
                                  top_k=3)   # ignored: Mirostat replaces truncation
    prompt_ids = resp.choices[0].raw_output.prompt_token_ids
    mu, out = 2 * tau, []
    for entry in resp.choices[0].logprobs.content:
        logp = raw_logits(llm, prompt_ids + out).log_softmax(-1)
        surprise = -logp / math.log(2)
        keep = surprise <= mu
        keep[logp.argmax()] = True
        truncated = logp.masked_fill(~keep, -math.inf).log_softmax(-1)
        assert keep[entry.token_id]
        assert entry.sampling_logprob == pytest.approx(truncated[entry.token_id].item(),
                                                       abs=1e-4)
        mu -= lr * (-truncated[entry.token_id].item() / math.log(2) - tau)
        out.append(entry.token_id)


def _chi_square_threshold(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z=3.09: 99.9%)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _chi_square(counts: torch.Tensor, probs: torch.Tensor, total: int) -> tuple[float, int]:
    """Statistic and degrees of freedom, pooling cells expected below 5 into one."""
    expected = probs * total
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum().item()
    return stat, int(keep.sum()) - 1


@pytest.mark.parametrize("knobs", [{"temperature": 1.0}, {"temperature": 1.4, "top_k": 12},
                                   {"top_p": 0.5}, {"min_p": 0.2}])
def test_draws_follow_the_processed_distribution(llm, knobs):
    draws = []
    for seed in range(4):
        resp = llm.completions.create(prompt=PROMPT, n=128, max_tokens=1, seed=seed,
                                      return_token_ids=True, **knobs)
        draws += [c.token_ids[0] for c in resp.choices]
    prompt_ids = llm.tokenizer(PROMPT)["input_ids"]
    probs = reference_distribution(llm, prompt_ids, [], knobs).exp()
    counts = torch.bincount(torch.tensor(draws), minlength=len(probs)).float()
    assert (counts[probs == 0] == 0).all()            # nothing outside the kept set
    stat, dof = _chi_square(counts, probs, len(draws))
    assert stat < _chi_square_threshold(dof)
    # the test has power: the unprocessed distribution is rejected where knobs change it
    if knobs != {"temperature": 1.0}:
        raw = reference_distribution(llm, prompt_ids, [], {}).exp()
        assert _chi_square(counts, raw, len(draws))[0] > _chi_square_threshold(dof)


def test_seeds_reproduce_and_do_not_depend_on_the_batch(llm):
    kw = dict(max_tokens=10, temperature=1.2, return_token_ids=True)
    one = llm.completions.create(prompt=PROMPT, n=1, seed=7, **kw)
    again = llm.completions.create(prompt=PROMPT, n=1, seed=7, **kw)
    four = llm.completions.create(prompt=PROMPT, n=4, seed=7, **kw)
    both = llm.completions.create(prompt=[PROMPT, "import os\n"], n=4, seed=7, **kw)
    assert one.choices[0].token_ids == again.choices[0].token_ids == \
        four.choices[0].token_ids == both.choices[0].token_ids
    assert [c.token_ids for c in four.choices] == [c.token_ids for c in both.choices[:4]]
    assert len({tuple(c.token_ids) for c in four.choices}) > 1
    other = llm.completions.create(prompt=PROMPT, n=1, seed=8, **kw)
    assert other.choices[0].token_ids != one.choices[0].token_ids


def _splitmix64_uniform(seed: int, counter: int) -> float:
    """Reference in plain Python integers: SplitMix64 of seed + (counter + 1) * golden,
    top 24 bits as a fraction."""
    mask = (1 << 64) - 1
    x = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return (x >> 40) / 2**24


def test_counter_based_uniforms_match_splitmix64_on_the_device(llm):
    seeds = [0, 1, 2**62 + 12345, 2**63 - 1, row_seed(7, 0, 3)]
    counters = [0, 1, 5, 1000, 2**31]
    got = uniform(torch.tensor(seeds, device=llm.device),
                  torch.tensor(counters, device=llm.device)).tolist()
    assert got == [_splitmix64_uniform(s, c) for s, c in zip(seeds, counters)]
    many = uniform(torch.full((20000,), 42, device=llm.device),
                   torch.arange(20000, device=llm.device)).cpu()
    assert 0 <= many.min() and many.max() < 1 and abs(many.mean().item() - 0.5) < 0.01
