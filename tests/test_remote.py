"""`toolkit.remote` against a toolkit server on a loopback port: the same response objects,
frames equal to the local ones, streams, sweeps and widgets; errors before and after the
request is sent."""
from __future__ import annotations

import pandas as pd
import pytest

import toolkit as tk
from toolkit.errors import AuthenticationError, InvalidRequestError, NotFoundError
from toolkit.responses import DETAILS_HEADER, LocalChunk, LocalCompletion

from conftest import settled

KEY = "remote-key"
PROMPT = "def parse(text):\n    "


@pytest.fixture(scope="module")
def served(llm):
    with tk.serve(llm, port=0, api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def far(served):
    remote = tk.remote(served.url, api_key=KEY)
    yield remote
    remote.close()


FRAMES = ["tokens", "top_logprobs", "token_logprobs", "speculation", "acceptance"]


def _assert_same_frames(got, want, names=FRAMES):
    for name in names:
        pd.testing.assert_frame_equal(getattr(tk.frames, name)(got),
                                      getattr(tk.frames, name)(want), obj=name)
    pd.testing.assert_frame_equal(tk.frames.choices(got), tk.frames.choices(want))


REQUEST = dict(prompt=[PROMPT, "import os\n"], n=2, max_tokens=10, temperature=0.8, seed=11,
               logprobs=True, top_logprobs=3, echo=True, logprobs_for_tokens=[5, 6])


def test_responses_and_frames_equal_the_local_ones(llm, far):
    got, want = far.completions.create(**REQUEST), llm.completions.create(**REQUEST)
    assert isinstance(got, LocalCompletion)
    assert got.model_dump(exclude={"id", "created"}) == \
        want.model_dump(exclude={"id", "created"})
    _assert_same_frames(got, want)
    assert got.tokens()["entropy"].notna().any()          # the details came along


def test_speculation_frames_equal_the_local_ones(llm, far):
    fields = dict(prompt=PROMPT, max_tokens=12, temperature=0, logprobs=True,
                  prediction="return text.strip()\n")
    got, want = far.completions.create(**fields), llm.completions.create(**fields)
    assert len(tk.frames.speculation(want)) > 0
    _assert_same_frames(got, want, ["tokens", "speculation", "acceptance"])


def test_routing_frames_equal_the_local_ones(moe_llm):
    fields = dict(prompt=PROMPT, max_tokens=6, seed=1, logprobs=True,
                  include_routing_matrix=True)
    with tk.serve(moe_llm, port=0) as server:
        got = tk.remote(server.url).completions.create(**fields)
    want = moe_llm.completions.create(**fields)
    pd.testing.assert_frame_equal(tk.frames.routing(got), tk.frames.routing(want))


def test_a_stream_gives_the_local_chunks(llm, far):
    fields = dict(REQUEST, stream=True)
    got, want = list(far.completions.create(**fields)), list(llm.completions.create(**fields))
    assert all(isinstance(c, LocalChunk) for c in got)
    assert [c.model_dump(exclude={"id", "created"}) for c in got] == \
        [c.model_dump(exclude={"id", "created"}) for c in want]
    _assert_same_frames(got, want)


def test_closing_a_stream_cancels_it_on_the_server(llm, far):
    stream = far.completions.create(prompt=PROMPT, max_tokens=100, ignore_eos=True,
                                    stream=True, temperature=1.0)
    first = next(stream)
    stream.close()
    assert settled(llm)
    entry = next(e for e in reversed(llm.request_log.entries) if e["id"] == first.id)
    assert entry["status"] in ("cancelled", "completed")    # it may have finished first
    assert far.completions.create(prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_a_hosted_response_without_details_still_frames(llm, served):
    """What a hosted endpoint sends: the wire only. Tokens and logprobs are the same,
    what only details know (entropy) is missing."""
    bare = tk.remote(served.url, api_key=KEY)
    del bare.client.headers[DETAILS_HEADER]
    fields = dict(prompt=PROMPT, max_tokens=8, seed=2, logprobs=True, top_logprobs=5)
    got, want = bare.completions.create(**fields), llm.completions.create(**fields)
    assert got.details == {}
    same = ["token", "token_id", "logprob", "sampling_logprob", "text_offset"]
    pd.testing.assert_frame_equal(got.tokens()[same], want.tokens()[same])
    assert got.tokens()["entropy"].isna().all()


def test_sweeps_and_widgets_run_on_a_remote(llm, far):
    grid = dict(temperature=[0.5, 1.0], top_p=[0.9, 1.0])
    pd.testing.assert_frame_equal(tk.sweep(far, PROMPT, n=2, max_tokens=6, progress=False,
                                           **grid),
                                  tk.sweep(llm, PROMPT, n=2, max_tokens=6, progress=False,
                                           **grid))
    explorer = tk.widgets.explore(far, PROMPT, max_tokens=6)
    assert explorer.response is not None and len(explorer.response.choices) == explorer.n.value


def test_errors(llm, served, far):
    with pytest.raises(InvalidRequestError) as err:          # checked before sending
        far.completions.create(prompt="x", temperature=3)
    assert err.value.param == "temperature"
    for field, value in (("include_last_activation", True), ("activation_layers", [0])):
        with pytest.raises(InvalidRequestError, match="local model") as err:
            far.completions.create(prompt="x", logprobs=True, **{field: value})
        assert err.value.param == field
    with pytest.raises(NotFoundError):                        # the server's 404
        far.completions.create(prompt="x", model="no-such-model")
    with pytest.raises(NotFoundError):
        far.completions.create(prompt="x", model="no-such-model", stream=True)
    with pytest.raises(AuthenticationError):
        tk.remote(served.url, api_key="wrong")
    with pytest.raises(ConnectionError, match="cannot reach"):
        tk.remote("http://127.0.0.1:9/v1")                   # nothing listens there
    assert llm.name in repr(far) and served.url in repr(far)
