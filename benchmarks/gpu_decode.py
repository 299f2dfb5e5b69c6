"""Decode speed on a GPU against `transformers` `generate()`, same model and run.

    python benchmarks/gpu_decode.py [--tokens 128] [--repeats 3] [--small] [--eager] [--fused]
                                    [--walked]

The model is DESIGN §8's: a Llama-3.2-1B body (16 layers, 2048 wide, 32/8 heads, 8192 MLP)
with random weights in bfloat16 and the zoo's 4k tokenizer, built from a config on the GPU
and saved to a temporary folder that `toolkit.load` reads (no download). `--small` builds a
tiny one instead, to try the script on a CPU.

Measured, each as tokens/s over `--tokens` new tokens (median of `--repeats` runs after a
warm-up):
- batch 1, greedy: the engine with logprobs, top-5 and last activations (capture on) and
  without them (capture off); `generate()` greedy;
- n=64 sampling: the engine with logprobs and top-5 against `generate()` with
  `num_return_sequences=64`; and the same on `tiny-code`;
- the batch-1 roofline: the weights' bytes over the measured device copy bandwidth;
- with `--eager`, the engine's own rates again with `compile=False` (no CUDA graphs);
- with `--fused`, again with `TOOLKIT_FUSED_GRAPHS=1` (the graphed step compiled by
  inductor first), on both models, with the fused graph's own step time (its ratios read
  the plain run's `generate()`);
- with `--walked`, the engine's own rates again on the same engines with the overlap off
  (each run of steps walked by the host before the next is queued), on both models.
The engine is otherwise loaded as `toolkit.load` gives it: decode steps as CUDA graphs on a
GPU.
Writes JSON to benchmarks/results/gpu_decode.json (`--out`) after each measurement, so a run
cut short by a time limit keeps what it measured; a measurement that fails is recorded
as its error and the next one goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

import toolkit as tk
from toolkit.models import ZOO_DIR

PROMPT = 'def parse_header(line):\n    """Split a header line into its name and value."""\n'


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read plus write)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), 5)
    return 2 * src.numel() / seconds


def build_model(folder: Path, small: bool, device: torch.device) -> int:
    """Save the model and tokenizer to `folder`; the weights' bytes."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ZOO_DIR / "tiny-code")
    shape = (dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2) if small else
             dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8))
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048,
                         rope_theta=500000.0, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def rates(llm: tk.LLM, tokens: int, repeats: int, generate_too: bool = True) -> dict:
    """Engine (and generate()) tokens/s for one loaded model."""
    ids = torch.tensor([llm.tokenizer(PROMPT)["input_ids"]], device=llm.device)
    eos = llm.info.eos_token_ids[0]

    def engine(n: int = 1, **kw) -> None:
        resp = llm.completions.create(prompt=PROMPT, max_tokens=tokens, ignore_eos=True,
                                      n=n, seed=0, **kw)
        assert resp.usage.completion_tokens == tokens * n

    def generate(n: int = 1) -> None:
        with torch.inference_mode():
            out = llm.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens,
                                     do_sample=n > 1, num_return_sequences=n,
                                     pad_token_id=eos)
        assert out.shape[1] - ids.shape[1] == tokens

    out = {}
    t = median_time(lambda: engine(temperature=0, logprobs=True, top_logprobs=5,
                                   include_last_activation=True), repeats)
    out["batch1_capture_on"] = tokens / t
    out["batch1_capture_off"] = tokens / median_time(lambda: engine(temperature=0), repeats)
    if generate_too:
        out["batch1_generate"] = tokens / median_time(generate, repeats)
    t = median_time(lambda: engine(n=64, temperature=1.0, logprobs=True, top_logprobs=5),
                    repeats)
    out["n64_engine"] = 64 * tokens / t
    if generate_too:
        out["n64_generate"] = 64 * tokens / median_time(lambda: generate(64), repeats)
    return {k: round(v, 1) for k, v in out.items()}


def graph_step(llm: tk.LLM) -> dict:
    try:
        return _graph_step(llm)
    except Exception as err:            # a profiler that fails must not lose the rates
        return {"error": f"{err!s:.200}"}


def _graph_step(llm: tk.LLM) -> dict:
    """The CUDA graph's own time per step at batch 1 (replays back to back, no host work
    between them) and the kernels one step launches: what the engine's per-token time is
    made of, beside the host's work."""
    from torch.profiler import ProfilerActivity, profile

    runner = llm.engine.runner
    if not getattr(runner.step, "capture", False):        # no CUDA graphs here
        return {}
    with torch.inference_mode():
        cache = runner.start(1, 64)
        runner.decode(cache, torch.zeros(1, dtype=torch.long, device=llm.device), [10], None)
        graph = cache.slot.graph
        seconds = median_time(lambda: [graph.replay() for _ in range(100)], 3) / 100
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner.step._step(cache.slot)
            sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    return {"replay_ms": round(seconds * 1e3, 3), "kernels_per_step": len(kernels),
            "kernel_busy_ms": round(busy / 1e3, 3)}


def measure(result: dict, name: str, source: str, args: argparse.Namespace,
            fused: bool = False) -> None:
    """Rates and the graph's step time of one model, loaded as a user would load it
    (`generate()` only once per model: the fused engine reads the plain run's). A failure
    is recorded, and the next measurement goes on."""
    os.environ["TOOLKIT_FUSED_GRAPHS"] = "1" if fused else "0"
    try:
        llm = tk.load(source, device=args.device, dtype="bfloat16", progress=False)
        result[name] = rates(llm, args.tokens, args.repeats, generate_too=not fused)
        result[name + "_graph_step"] = graph_step(llm)
        result[name]["step"] = getattr(getattr(llm.engine.runner, "step", None), "state", None)
        result[name]["overlap"] = llm.engine.decoder.overlap
        if args.walked and not fused:
            llm.engine.decoder.overlap = False
            result[name + "_walked"] = rates(llm, args.tokens, args.repeats,
                                             generate_too=False)
    except Exception as err:
        traceback.print_exc()
        result.setdefault(name, {})["error"] = f"{err!s:.300}"
    finally:
        os.environ.pop("TOOLKIT_FUSED_GRAPHS")
        save(result, args.out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--eager", action="store_true",
                        help="also time the engine with compile=False (no CUDA graphs)")
    parser.add_argument("--fused", action="store_true",
                        help="also time the engine with TOOLKIT_FUSED_GRAPHS=1")
    parser.add_argument("--walked", action="store_true",
                        help="also time the engine with the overlap off")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "gpu_decode.json")
    args = parser.parse_args()
    device = args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "new_tokens": args.tokens}
    with tempfile.TemporaryDirectory() as folder:
        weights = build_model(Path(folder), args.small, device)
        bandwidth = copy_bandwidth(device)
        result.update(weights_bytes=weights, copy_bandwidth_gb_s=round(bandwidth / 1e9, 1),
                      roofline_tok_s=round(bandwidth / weights, 1))
        # the figures the targets read first, the slow compiles last; each saved as it comes
        measure(result, "llama_1b_shape", folder, args)
        measure(result, "tiny_code", "tiny-code", args)
        if args.eager:
            eager = tk.load(folder, device=device, dtype="bfloat16", compile=False,
                            progress=False)
            result["llama_1b_shape_eager"] = rates(eager, args.tokens, args.repeats)
            del eager
            save(result, args.out)
        if args.fused:
            measure(result, "llama_1b_shape_fused", folder, args, fused=True)
    if args.fused:
        measure(result, "tiny_code_fused", "tiny-code", args, fused=True)
    print(json.dumps(result, indent=1))
    print(table_rows(result))
    print(targets(result))


MODELS = ("llama_1b_shape", "tiny_code")


def table_rows(result: dict) -> str:
    """This run as rows of benchmarks/README.md's table (its "code" column left to fill):
    the engine as loaded, then each variant measured beside it; ratios read the plain
    run's `generate()`."""
    import datetime

    plain, plain_tiny = result.get("llama_1b_shape", {}), result.get("tiny_code", {})
    if "batch1_generate" not in plain:
        return "(the plain run failed: no rows)"
    ratio = lambda a, b: f"**{a / b:.2f}x**" if a and b else "—"
    rows = []
    for suffix, what in (("", "as loaded"), ("_fused", "fused"), ("_walked", "overlap off"),
                         ("_eager", "compile=False")):
        big = result.get("llama_1b_shape" + suffix, {})
        tiny = result.get("tiny_code" + suffix, {})
        if "batch1_capture_on" not in big:
            continue
        first = not rows
        b1, roofline = big["batch1_capture_on"], result["roofline_tok_s"]
        n64, n64_generate = big["n64_engine"], plain["n64_generate"]
        tiny_n64 = tiny.get("n64_engine")
        cells = [
            str(datetime.date.today()), f"? ({what})",
            f"{result['device']}, torch {result['torch']}" if first else "same run",
            f"{roofline:,.0f} tok/s ({result['copy_bandwidth_gb_s']:,.0f} GB/s)"
            if first else "",
            f"{b1:,.1f} tok/s (**{b1 / roofline:.1%}**)",
            f"{big['batch1_capture_off']:,.1f}", f"{plain['batch1_generate']:,.1f}",
            f"{n64:,.0f} tok/s", f"{n64_generate:,.0f} ({ratio(n64, n64_generate)})",
            f"{tiny['batch1_capture_on']:,.0f}" if tiny_n64 else "—",
            f"{tiny_n64:,.0f} / {plain_tiny['n64_generate']:,.0f} "
            f"({ratio(tiny_n64, plain_tiny.get('n64_generate'))})" if tiny_n64 else "—"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def targets(result: dict) -> str:
    """DESIGN §8's targets against this run's figures (fused ones in brackets)."""
    def figure(key: str, unit: str = "") -> str:
        plain, fused = (result.get(prefix + key) for prefix in ("", "fused_"))
        return (f"{plain}{unit}" if plain is not None else "—") + (
            f" (fused {fused}{unit})" if fused is not None else "")
    return (f"on {result['device']}: batch 1 at {figure('batch1_fraction_of_roofline')} of "
            f"the roofline (target 0.6); n=64 at {figure('n64_ratio', 'x')} generate() "
            f"(target 5x); tiny-code n=64 at {figure('tiny_n64_ratio', 'x')} generate() "
            f"(target over 1x)")


def save(result: dict, out: Path) -> None:
    """Write what is measured so far, with the ratios the targets read, and say what came:
    a run cut short by a time limit keeps its figures."""
    for prefix, suffix in (("", ""), ("fused_", "_fused")):
        big, tiny = (result.get(model + suffix, {}) for model in MODELS)
        plain_big, plain_tiny = (result.get(model, {}) for model in MODELS)
        if "batch1_capture_on" in big:
            result[prefix + "batch1_fraction_of_roofline"] = round(
                big["batch1_capture_on"] / result["roofline_tok_s"], 3)
            if "n64_generate" in plain_big:
                result[prefix + "n64_ratio"] = round(big["n64_engine"]
                                                     / plain_big["n64_generate"], 2)
        if "n64_engine" in tiny and "n64_generate" in plain_tiny:
            result[prefix + "tiny_n64_ratio"] = round(tiny["n64_engine"]
                                                      / plain_tiny["n64_generate"], 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("saved:", ", ".join(k for k, v in result.items() if isinstance(v, dict)), flush=True)


if __name__ == "__main__":
    main()
