"""`toolkit.load`: local folders, hub ids through the HF cache, clear errors otherwise."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_model_dir

import toolkit as tk
from toolkit.errors import InvalidRequestError, NotFoundError


def test_local_dense_folder(llama_dir):
    llm = tk.load(llama_dir, compile=False)
    info = llm.info
    assert (info.source, info.architecture) == ("local", "LlamaForCausalLM")
    assert info.context_length == 128 and info.num_layers == 2 and info.hidden_size == 32
    assert info.vocab_size == len(llm.tokenizer)
    assert info.eos_token_ids == (llm.tokenizer.convert_tokens_to_ids("<|endoftext|>"),)
    assert info.think_token_ids == tuple(llm.tokenizer.convert_tokens_to_ids(t)
                                         for t in ("<think>", "</think>"))
    assert not info.is_moe and info.num_experts is None
    assert info.num_parameters == sum(p.numel() for p in llm.model.parameters())
    gpu = torch.cuda.is_available()           # the defaults: CUDA in bfloat16 where present
    assert llm.device.type == ("cuda" if gpu else "cpu")
    assert llm.dtype == next(llm.model.parameters()).dtype == \
        (torch.bfloat16 if gpu else torch.float32)
    assert not llm.model.training
    assert "LlamaForCausalLM" in repr(llm)


def test_local_moe_folder_reports_experts(moe_dir):
    info = tk.load(moe_dir, compile=False).info
    assert info.is_moe and (info.num_experts, info.experts_per_token) == (4, 2)
    assert info.num_moe_layers == 2


def test_model_without_think_tokens(tmp_path):
    folder = make_model_dir(tmp_path / "plain", think_tokens=False)
    assert tk.load(folder, compile=False).info.think_token_ids is None


def test_dtype_and_names(llama_dir):
    llm = tk.load(llama_dir, dtype="bfloat16", aliases=["accounts/fireworks/models/x"],
                  compile=False)
    assert next(llm.model.parameters()).dtype == torch.bfloat16
    assert llm.resolve_model(None) == str(llama_dir)
    assert llm.resolve_model("accounts/fireworks/models/x") == "accounts/fireworks/models/x"
    with pytest.raises(NotFoundError) as info:
        llm.resolve_model("gpt-4")
    assert info.value.status_code == 404 and info.value.param == "model"
    assert info.value.body["error"]["code"] == "NOT_FOUND"
    assert "gpt-4" in str(info.value)


def test_spec_rebuilds_the_engine(llama_dir):
    llm = tk.load(llama_dir, dtype="float32")
    spec = pickle.loads(pickle.dumps(llm.spec))
    again = tk.load(spec.pop("name_or_path"), **spec)
    assert again.info == llm.info


def test_draft_model_must_share_the_tokenizer(llama_dir, moe_dir, tmp_path):
    llm = tk.load(moe_dir, draft_model=llama_dir, compile=False)
    assert llm.draft.info.architecture == "LlamaForCausalLM"
    other = make_model_dir(tmp_path / "other-vocab", vocab_size=280)
    with pytest.raises(InvalidRequestError) as info:
        tk.load(llama_dir, draft_model=other)
    assert info.value.param == "draft_model"


@pytest.mark.parametrize("name,message", [
    ("./no/such/folder", "no model folder"),
    ("/definitely/not/here", "no model folder"),
    ("a/b/c", "no model folder"),
    (".", "no config.json"),
])
def test_missing_paths(name, message):
    with pytest.raises(NotFoundError, match=message):
        tk.load(name)


def test_bad_device_and_dtype(llama_dir):
    with pytest.raises(InvalidRequestError) as info:
        tk.load(llama_dir, dtype="int8")
    assert info.value.param == "dtype"
    with pytest.raises(InvalidRequestError) as info:
        tk.load(llama_dir, device="tpu-please")
    assert info.value.param == "device"
    if not torch.cuda.is_available():
        with pytest.raises(InvalidRequestError, match="no CUDA"):
            tk.load(llama_dir, device="cuda")


def test_uncached_hub_id_offline_names_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotFoundError, match="someorg/not-a-model") as info:
        tk.load("someorg/not-a-model")
    assert info.value.param == "model"


@pytest.mark.parametrize("typo", ["tiny-coder", "tiny_code_moe", "Tiny-Code-Draft"])
def test_a_mistyped_name_fails_at_once_with_the_closest_one(typo):
    started = time.perf_counter()
    with pytest.raises(NotFoundError) as info:
        tk.load(typo)
    assert time.perf_counter() - started < 10        # no rounds of network retries
    close = {"tiny-coder": "tiny-code", "tiny_code_moe": "tiny-code-moe",
             "Tiny-Code-Draft": "tiny-code-draft"}[typo]
    assert f"did you mean '{close}'?" in str(info.value) and info.value.param == "model"
    assert "tiny-code, tiny-code-moe, tiny-code-draft" in str(info.value)


def test_hub_id_loads_from_the_cache_offline(llama_dir, tmp_path):
    """The real hub path (`from_pretrained(hub_id)`), fed by a cache laid out as the hub
    client lays it out, since no hub is reachable from here."""
    snapshot = tmp_path / "hub" / "models--toolkit-test--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(llama_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    code = "import toolkit as tk; i = tk.load('toolkit-test/tiny').info; print(i.source, i.path)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["hub", "toolkit-test/tiny"]


def test_zoo_name_resolves_to_package_data():
    from toolkit.models import ZOO_DIR, locate
    if not (ZOO_DIR / "tiny-code" / "config.json").exists():
        with pytest.raises(NotFoundError, match="not installed"):
            locate("tiny-code")
    else:
        assert locate("tiny-code") == ("zoo", str(ZOO_DIR / "tiny-code"))


def test_cli_describes_a_model_and_runs_a_completion(llama_dir, capsys):
    from toolkit.cli import main
    main([str(llama_dir), "--info"])
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "context_length" in out
    main([str(llama_dir), "--max-tokens", "5"])
    out = capsys.readouterr().out
    assert "top alternatives" in out and "finish_reason=length" in out
    assert len([line for line in out.splitlines() if line[:3].strip().isdigit()]) == 5
    assert "\033[" not in out                   # no terminal escapes into a pipe or file
    main([str(llama_dir), "--max-tokens", "4", "--n", "2", "--stream", "--seed", "3"])
    assert capsys.readouterr().out.count("\n") >= 2


@pytest.mark.parametrize("argv,says", [
    (["--temperature", "5"], "temperature"),
    (["--top-logprobs", "9"], "top_logprobs"),
    (["tiny-coder"], "did you mean 'tiny-code'?"),
    (["--max-tokens", "many"], "invalid int value"),
])
def test_cli_user_errors_are_one_line_and_exit_2(argv, says):
    run = subprocess.run([sys.executable, "-m", "toolkit.cli", *argv], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("toolkit: error: ") and says in last
    if argv[0] == "--temperature":             # refused before any model was loaded
        assert "LLM(" not in run.stdout


def test_cli_help_shows_defaults_zoo_names_and_the_request_options():
    run = subprocess.run([sys.executable, "-m", "toolkit.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    for text in ("--n", "--top-logprobs", "--stream", "tiny-code-moe", "default: 32"):
        assert text in run.stdout


def test_the_cli_samples_as_the_card_recommends(capsys):
    """The zoo's generation configs recommend a frequency penalty (greedy decoding of
    these small models loops without one); the CLI starts from it, requests do not."""
    from toolkit.cli import main

    llm = tk.load("tiny-code", compile=False, progress=False)
    assert llm.info.sampling == {"frequency_penalty": 0.7}
    main(["tiny-code", "--max-tokens", "24"])
    out = capsys.readouterr().out
    assert "sampling as the model card recommends: frequency_penalty=0.7" in out
    penalised = llm.completions.create(prompt=tk.cli.PROMPT, max_tokens=24, temperature=0,
                                       frequency_penalty=0.7).choices[0].text
    assert penalised in out
    main(["tiny-code", "--max-tokens", "4", "--frequency-penalty", "0"])
    assert "model card recommends" not in capsys.readouterr().out
