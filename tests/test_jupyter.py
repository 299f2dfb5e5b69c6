"""Plots render headlessly; sweeps gather one frame; widgets react to programmatic changes."""
from __future__ import annotations

import warnings

import pandas as pd
import pytest
from matplotlib.figure import Figure

import toolkit as tk
from toolkit import plots

PROMPT = "def add(a, b):\n"


@pytest.fixture(scope="module")
def resp(llm):
    return llm.completions.create(prompt=PROMPT, max_tokens=6, n=2, seed=0, logprobs=True,
                                  top_logprobs=3, echo=True)


@pytest.mark.parametrize("draw", [plots.logprob_strip, plots.top_k_heatmap,
                                  plots.entropy_curve])
def test_token_plots_render(resp, draw, tmp_path):
    fig = draw(resp)
    assert isinstance(fig, Figure)
    fig.savefig(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_expert_usage_plot(moe_llm, tmp_path):
    resp = moe_llm.completions.create(prompt=PROMPT, max_tokens=4, include_routing_matrix=True,
                                      ignore_eos=True, seed=0)   # 4 tokens, every run
    fig = plots.expert_usage(resp, num_experts=moe_llm.info.num_experts)
    fig.savefig(tmp_path / "experts.png")
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (moe_llm.info.num_moe_layers, moe_llm.info.num_experts)
    assert image.sum() == 4 * moe_llm.info.num_moe_layers * moe_llm.info.experts_per_token


def test_sweep_frame_and_grid(llm, tmp_path):
    frame = tk.sweep(llm, PROMPT, n=3, max_tokens=4, temperature=[0.0, 1.5],
                     top_p=[0.5, 1.0], progress=False)
    assert list(frame.columns[:2]) == ["temperature", "top_p"]
    assert len(frame) == 2 * 2 * 3
    greedy = frame[frame.temperature == 0.0]
    assert greedy.groupby("top_p").text.nunique().eq(1).all()   # greedy: one text per cell
    fig = plots.sweep_grid(frame, "temperature", "top_p")
    fig.savefig(tmp_path / "grid.png")
    assert fig.axes[0].images[0].get_array().shape == (2, 2)


def test_sweep_interrupt_keeps_finished_rows(llm, monkeypatch):
    create_batch, calls = llm.completions.create_batch, {"n": 0}

    def flaky(requests, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return create_batch(requests, **kwargs)

    monkeypatch.setattr(llm.completions, "create_batch", flaky)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = tk.sweep(llm, PROMPT, n=2, max_tokens=2, temperature=[0.1, 0.5, 1.0, 1.5],
                         progress=False, batch=2)
    assert len(frame) == 2 * 2 and "interrupted" in str(caught[0].message)
    assert frame.temperature.tolist() == [0.1, 0.1, 0.5, 0.5]


def test_create_batch_equals_one_create_per_request(llm):
    requests = [{"prompt": [PROMPT, "x = "], "n": 2, "max_tokens": 5, "seed": s,
                 "logprobs": True, "return_token_ids": True, **knobs}
                for s, knobs in [(0, {"temperature": 0.5}), (1, {"top_k": 3}),
                                 (2, {"temperature": 0, "repetition_penalty": 1.5}),
                                 (3, {"mirostat_target": 2.0}), (4, {"max_tokens": 3})]]
    batched = llm.completions.create_batch(requests)
    for req, resp in zip(requests, batched):
        alone = llm.completions.create(**req)
        assert [c.token_ids for c in resp.choices] == [c.token_ids for c in alone.choices]
        assert [c.index for c in resp.choices] == [0, 1, 2, 3]
        assert resp.usage == alone.usage
        for a, b in zip(resp.choices, alone.choices):
            assert [e.sampling_logprob for e in a.logprobs.content] == pytest.approx(
                [e.sampling_logprob for e in b.logprobs.content], abs=1e-5)
        assert frames_equal(resp, alone)


def frames_equal(a, b) -> bool:
    cols = ["choice", "prompt_index", "position", "token_id", "rank"]
    return tk.frames.tokens(a)[cols].equals(tk.frames.tokens(b)[cols])


def test_explorer_resamples_on_change(llm):
    ex = tk.widgets.explore(llm, PROMPT, n=2, max_tokens=8)
    first = ex.completions.value
    assert first.count("<span") >= 2 * 8 and "title=" in first
    assert ex.distribution.value[:4] == b"\x89PNG"
    ex.knobs["temperature"].value = 0.0
    greedy = ex.completions.value
    assert greedy != first
    lines = [line.split("</div>")[0] for line in greedy.split("<div><b>")[1:]]
    assert lines[0].split(" ", 1)[1] == lines[1].split(" ", 1)[1]   # greedy choices agree
    before = ex.distribution.value
    ex.position.value = 3
    assert ex.distribution.value != before
    ex.seed.value = 99
    ex.knobs["temperature"].value = 1.0
    assert ex.completions.value not in (first, greedy)
    assert "<table" in ex.table.value
    ex.knobs["mirostat_target"].value = 3.0            # Mirostat switches on
    assert ex.request()["mirostat_target"] == 3.0 and ex.error.value == ""


def test_key_presses_resample_once_when_they_stop(llm):
    """In a kernel, widget changes arrive on its event loop; ten quick changes (arrow-key
    presses) make one request, after they settle."""
    import asyncio

    async def presses():
        ex = tk.widgets.explore(llm, PROMPT, n=1, max_tokens=4)
        before = len(llm.request_log)
        for k in range(10):
            ex.knobs["temperature"].value = 0.5 + 0.05 * k
            await asyncio.sleep(0.02)
        assert len(llm.request_log) == before              # nothing yet: still settling
        await asyncio.sleep(tk.widgets.SETTLE_S + 0.3)
        assert len(llm.request_log) == before + 1
        assert ex.response.model_dump()["choices"] and ex.request()["temperature"] == 0.95

    asyncio.run(presses())


def test_figures_show_at_their_own_size(llm):
    ex = tk.widgets.explore(llm, PROMPT, max_tokens=4)
    data = ex.distribution.value
    assert ex.distribution.layout.width == f"{int.from_bytes(data[16:20], 'big') // 2}px"
    sweeper = tk.widgets.sweep_explorer(llm, PROMPT, n=2, max_tokens=4)
    assert sweeper.plot.layout.display == "none"           # no broken image before a run
    sweeper.update()
    assert sweeper.plot.layout.display == "" and sweeper.plot.value[:4] == b"\x89PNG"
    labels = [w for w in ex.knobs.values()]
    assert all(w.style.description_width == "130px" and w.tooltip for w in labels)


def test_explorer_shows_request_errors(llm):
    ex = tk.widgets.explore(llm, PROMPT, max_tokens=4)
    shown = ex.completions.value
    ex.prompt.value = "x " * 500                       # longer than the context window
    assert "context window" in ex.error.value and "prompt" in ex.error.value
    assert ex.completions.value == shown               # the last good result stays
    ex.prompt.value = PROMPT
    assert ex.error.value == ""
    ex.max_tokens.value = 2
    assert ex.completions.value != shown


def test_sweep_explorer_runs_and_plots(llm):
    sx = tk.widgets.sweep_explorer(llm, PROMPT, n=2, max_tokens=3)
    sx.x_values.value, sx.y_values.value = "0.1 1.0", "0.5 1.0"
    sx.run.click()
    assert isinstance(sx.frame, pd.DataFrame) and len(sx.frame) == 2 * 2 * 2
    assert sx.plot.value[:4] == b"\x89PNG"
    sx.x_values.value = ""
    sx.run.click()
    assert "at least one value" in sx.error.value


def test_plot_labels_read_whole(llm):
    resp = llm.completions.create(prompt="def add(a, b):\n    return a + b\n", max_tokens=0,
                                  echo=True, logprobs=True)
    fig = tk.plots.entropy_curve(resp)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[1:4] == [tk.display.visible(t) for t in resp.tokens().token[1:4]]
    many = llm.completions.create(prompt="x", n=2, max_tokens=5, seed=0, logprobs=True)
    ticks = tk.plots.entropy_curve(many).axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)          # whole positions only
    grid = tk.sweep(llm, "x", n=3, max_tokens=4, temperature=[0.5, 1.0], top_p=[0.9, 1.0],
                    progress=False)
    assert tk.plots.sweep_grid(grid, "temperature", "top_p").axes[0].get_title() == \
        "distinct completions (of 3)"
