"""Train the embedded model zoo: one tokenizer, three small causal LMs, and their cards.

    python -m toolkit.models.train                      # all three, into toolkit/models/zoo
    python -m toolkit.models.train --device cuda --scale 8 --models tiny-code
    python -m toolkit.models.train --resume --scale 2 --lr-scale 0.5   # continue training

The corpus is the running interpreter's standard library (sources and `pydoc_data.topics`)
plus the sources of permissively licensed packages installed beside the toolkit. No folder
named `test`/`tests` (nor any `test_*.py`) is ever read: the stdlib's test suite is the
untouched evaluation set of `evaluate.py`. A fixed 3% of modules is the validation split
that training stops early on. Some docstrings are moved into `<think>...</think>` blocks
before their function, so the models learn what a think block is and how it ends.
Seeded throughout; the same command on the same machine gives the same weights.
"""
from __future__ import annotations

import argparse
import ast
import copy
import importlib.metadata as metadata
import json
import math
import platform
import sys
import sysconfig
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from . import ZOO_DIR, ZOO_NAMES
from . import evaluate as ev

SPECIALS = ["<|endoftext|>", "<think>", "</think>"]
PACKAGES = ("torch", "transformers", "numpy", "pandas", "matplotlib", "pydantic", "networkx",
            "jinja2", "requests")
PERMISSIVE = ("apache", "bsd", "mit", "psf", "python software foundation", "matplotlib")
PACKAGE_CAP_BYTES = 3_000_000       # per package, so the stdlib stays the bulk of the corpus
VAL_PERCENT = 3
CONTEXT = 1024
COMMON = dict(vocab_size=4096, max_position_embeddings=CONTEXT, tie_word_embeddings=True,
              rope_theta=10000.0, bos_token_id=0, eos_token_id=0)
# name -> (architecture, config, training tokens at --scale 1, peak learning rate)
SPECS = {
    "tiny-code-draft": ("llama", dict(hidden_size=128, intermediate_size=344,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2), 6_000_000, 3e-3),
    "tiny-code": ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                                num_attention_heads=8, num_key_value_heads=4),
                  5_000_000, 2e-3),
    "tiny-code-moe": ("mixtral", dict(hidden_size=192, intermediate_size=384,
                                      num_hidden_layers=4, num_attention_heads=6,
                                      num_key_value_heads=2, num_local_experts=8,
                                      num_experts_per_tok=2, router_aux_loss_coef=0.0),
                      6_000_000, 2e-3),
}
# Sampling the cards recommend (written to generation_config.json; the CLI starts from it):
# greedy decoding of held-out code by models this small falls into loops without a penalty.
# A frequency penalty (OpenAI semantics: the output's own counts) breaks them; HF's
# repetition_penalty does not suit code: it also hits every token of the prompt, such as the
# newline-and-indent token that starts a function's body, and pushed the models from the
# body to a blank line and a new `def` (measured: 2 bodies of 9 completions, against 9).
# 0.7 is a little above the least penalty at which no model's 9 held-out completions loop.
SAMPLING = {"frequency_penalty": 0.7}
# The draft learns tiny-code's next-token distribution (distillation: KL to the teacher's
# soft targets) rather than the text: speculation needs it to agree with tiny-code, not to
# be a good model of its own. Trained on the text alone, a small draft makes guesses of its
# own: it matched tiny-code's greedy token on only 49% of held-out positions.
TEACHERS = {"tiny-code-draft": "tiny-code"}


# ------------------------------------------------------------------------------- corpus

def _is_test_path(parts: tuple[str, ...]) -> bool:
    return any(p in ("test", "tests", "testing", "idle_test") or p.startswith("test_")
               or p.endswith(("_test", "_tests", "_test.py")) for p in parts)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def stdlib_sources() -> list[tuple[str, str]]:
    """(module path, text) of every stdlib source file outside test folders."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or _is_test_path(rel.parts):
            continue
        if (text := _read(path)) is not None:
            out.append((f"stdlib/{rel}", text))
    from pydoc_data.topics import topics
    out.extend((f"pydoc_data.topics/{k}", v) for k, v in sorted(topics.items()))
    return out


def package_sources() -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """Sources of the permissively licensed packages present, capped per package."""
    out, used = [], []
    for name in PACKAGES:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        meta = dist.metadata
        licence = meta.get("License-Expression") or meta.get("License") or " ".join(
            c for c in (meta.get_all("Classifier") or []) if c.startswith("License"))
        if not any(word in licence.lower() for word in PERMISSIVE):
            continue
        size = 0
        for file in sorted(dist.files or [], key=str):
            if file.suffix != ".py" or _is_test_path(file.parts) or size > PACKAGE_CAP_BYTES:
                continue
            if (text := _read(Path(dist.locate_file(file)))) is not None:
                out.append((f"{name}/{file}", text))
                size += len(text)
        used.append({"name": name, "version": dist.version,
                     "licence": licence.splitlines()[0][:80], "bytes": size})
    return out, used


def is_validation(module: str) -> bool:
    return zlib.crc32(module.encode()) % 100 < VAL_PERCENT


def with_think_blocks(text: str) -> str:
    """Move each function's docstring into a `<think>` line above the function."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return text
    lines = text.splitlines(keepends=True)
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
             and len(n.body) > 1 and ast.get_docstring(n)]
    for fn in sorted(funcs, key=lambda n: n.lineno, reverse=True):
        doc = fn.body[0]
        first = min([fn.lineno] + [d.lineno for d in fn.decorator_list]) - 1
        if doc.lineno - 1 <= fn.lineno - 1 or fn.body[1].lineno <= doc.end_lineno:
            continue   # docstring shares a line with code: leave the function alone
        indent = lines[first][:len(lines[first]) - len(lines[first].lstrip())]
        thought = " ".join(ast.get_docstring(fn).split())
        del lines[doc.lineno - 1:doc.end_lineno]
        lines.insert(first, f"{indent}<think>{thought}</think>\n")
    return "".join(lines)


def build_corpus() -> dict[str, Any]:
    stdlib, (packages, used) = stdlib_sources(), package_sources()
    train, val = [], []
    for module, text in stdlib + packages:
        if is_validation(module):
            val.append((module, text))
        else:
            think = zlib.crc32(module.encode()) % 10 == 0
            train.append((module, with_think_blocks(text) if think else text))
    return {"train": train, "val": val, "packages": used,
            "stdlib_files": len(stdlib), "package_files": len(packages)}


# ---------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # BOS first, as in training, where every document follows an <|endoftext|>.
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", model_max_length=CONTEXT,
                                   additional_special_tokens=SPECIALS[1:])


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All documents, each led by <|endoftext|>, as one int16-packed tensor."""
    ids = tokenizer(texts)["input_ids"]
    return torch.tensor([t for doc in ids for t in doc], dtype=torch.int16)


# ----------------------------------------------------------------------------- training

BALANCE_WEIGHT = 0.05


def layer_balance_loss(router_logits: tuple[torch.Tensor, ...], k: int) -> torch.Tensor:
    """Switch-style load balancing, per layer: E * sum_e(tokens share_e * mean prob_e).
    transformers' Mixtral loss pools all layers' tokens, which lets an expert die in one
    layer while its namesakes elsewhere carry the load; balancing each layer prevents it."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)                            # [tokens, experts]
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(k, -1).indices, 1.0)
        losses.append(probs.shape[-1] * (chosen.mean(0) / k * probs.mean(0)).sum())
    return torch.stack(losses).mean()


# Thinking tokens per block for `reasoning_effort` low, medium and high (the context is 1024).
REASONING_BUDGETS = {"low": 32, "medium": 128, "high": 512}


def make_model(name: str, seed: int, resume: Path | None = None) -> Any:
    """A fresh model of the zoo's architecture, or (`resume`) the weights in that folder,
    whose training then continues: a CPU session can add its tokens to the last one's."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

    torch.manual_seed(seed)
    if resume is not None:
        return AutoModelForCausalLM.from_pretrained(resume, dtype=torch.float32)
    arch, extra, _, _ = SPECS[name]
    config = (LlamaConfig if arch == "llama" else MixtralConfig)(**COMMON, **extra)
    config.think_tokens = SPECIALS[1:]
    config.reasoning_budgets = REASONING_BUDGETS
    return AutoModelForCausalLM.from_config(config)


def _batches(stream: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
        yield torch.stack([stream[s:s + seq + 1] for s in starts.tolist()]).long()


@torch.no_grad()
def val_loss(model: Any, stream: torch.Tensor, seq: int, device: str, max_windows: int = 48
             ) -> float:
    model.eval()
    n = min(max_windows, (len(stream) - 1) // seq)
    xs = stream[:n * seq + 1]
    losses = [model(input_ids=xs[i * seq:(i + 1) * seq + 1][None].long().to(device),
                    labels=xs[i * seq:(i + 1) * seq + 1][None].long().to(device)).loss.item()
              for i in range(n)]
    model.train()
    return sum(losses) / len(losses)


def distill_loss(logits: torch.Tensor, teacher: Any, x: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher || student) over the vocabulary."""
    with torch.no_grad():
        target = teacher(input_ids=x).logits.float().log_softmax(-1).flatten(0, 1)
    student = logits.float().log_softmax(-1).flatten(0, 1)
    return torch.nn.functional.kl_div(student, target, log_target=True, reduction="batchmean")


def train_model(model: Any, train: torch.Tensor, val: torch.Tensor, *, tokens: int, lr: float,
                device: str, seed: int, batch: int = 8, seq: int = 512,
                eval_every: int = 100, patience: int = 4,
                teacher: Any = None) -> dict[str, Any]:
    """AdamW with warmup and cosine decay; keep the weights of the best validation loss and
    stop once it has not improved for `patience` evaluations. With a `teacher`, the loss
    is the KL to its next-token distribution instead of the text's cross-entropy."""
    model.to(device).train()
    moe = bool(getattr(model.config, "num_local_experts", None))
    steps = max(1, tokens // (batch * seq))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = min(100, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(s, steps) / steps))))
    gen = torch.Generator().manual_seed(seed)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.startswith("cuda") else None
    best, best_state, bad, history, start = math.inf, None, 0, [], time.time()
    batches = _batches(train, batch, seq, gen)
    step = 0
    for step in range(1, steps + 1):
        x = next(batches).to(device)
        with autocast or torch.autocast("cpu", enabled=False):
            out = model(input_ids=x, labels=None if teacher else x, output_router_logits=moe)
            loss = distill_loss(out.logits, teacher, x) if teacher else out.loss
            if moe:
                loss = loss + BALANCE_WEIGHT * layer_balance_loss(
                    out.router_logits, model.config.num_experts_per_tok)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % eval_every == 0 or step == steps:
            vl = val_loss(model, val, seq, device)
            history.append({"step": step, "train_loss": round(loss.item(), 4),
                            "val_loss": round(vl, 4), "seconds": round(time.time() - start)})
            print(f"  step {step}/{steps} train {loss.item():.3f} val {vl:.3f} "
                  f"({time.time() - start:.0f}s)", flush=True)
            if vl < best:
                best, best_state, bad = vl, copy.deepcopy(model.state_dict()), 0
            else:
                bad += 1
                if bad >= patience:
                    break
    model.load_state_dict(best_state)
    return {"steps": step, "tokens": step * batch * seq, "seconds": round(time.time() - start),
            "best_val_loss": round(best, 4), "best_val_perplexity": round(math.exp(best), 2),
            "batch": batch, "seq_len": seq, "peak_lr": lr, "history": history}


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"1x {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU ({cpu}, {threads} thread{'' if threads == 1 else 's'})"


# -------------------------------------------------------------------------------- cards

def heldout_prompts(count: int = 6) -> list[str]:
    """Header and docstring of the first documented module-level helper of held-out files
    (a method would lose the class that makes sense of its `self`)."""
    prompts = []
    for path in ev.heldout_files(every=5):
        text = _read(path) or ""
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for fn in tree.body:
            if isinstance(fn, ast.FunctionDef) and not fn.name.startswith("test") \
                    and ast.get_docstring(fn) and len(fn.body) > 1:
                # no final newline: the tokenizer merges a newline with the next line's
                # indentation, so a prompt ending in a bare "\n" would split that token
                prompts.append("\n".join(text.splitlines()[fn.lineno - 1:fn.body[0].end_lineno]))
                break
        if len(prompts) == count:
            break
    return prompts


def measure(name: str, models: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    docs = ev.encode_documents(tokenizer, [_read(p) or "" for p in ev.heldout_files()],
                               max_tokens=200_000)
    model = models[name]
    figures = {"heldout_tokens": sum(len(d) for d in docs),
               "heldout_perplexity": round(ev.perplexity(model, docs), 2),
               "unigram_perplexity": round(ev.unigram_perplexity(docs), 2)}
    figures["perplexity_ratio"] = round(figures["heldout_perplexity"]
                                        / figures["unigram_perplexity"], 4)
    if name == "tiny-code-draft" and "tiny-code" in models:
        figures["greedy_agreement_with_tiny_code"] = round(
            ev.greedy_agreement(model, models["tiny-code"], docs), 4)
    if getattr(model.config, "num_local_experts", None):
        figures["expert_usage"] = ev.expert_usage(model, docs).tolist()
    figures["samples"] = [{"prompt": p, "completion": ev.greedy_completion(
        model, tokenizer, p, **SAMPLING)} for p in heldout_prompts()]
    return figures


def write_card(folder: Path, name: str, model: Any, card: dict[str, Any]) -> None:
    (folder / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    f, t, d = card["figures"], card["training"], card["data"]
    lines = [f"# {name}", "",
             f"{card['architecture']}, {card['parameters'] / 1e6:.2f}M parameters, context "
             f"{CONTEXT}, vocabulary {model.config.vocab_size} (byte-level BPE with "
             f"`<|endoftext|>`, `<think>`, `</think>`). Trained by `"
             f"{t.get('command', 'python -m toolkit.models.train')}` (seed {card['seed']}); "
             "weights in float16.", "",
             "`reasoning_effort` budgets (thinking tokens per `<think>` block): " + ", ".join(
                 f"{k} {model.config.reasoning_budgets[k]}" for k in REASONING_BUDGETS)
             + ".", "",
             "Recommended sampling (in `generation_config.json`; the `toolkit` command's "
             "default; requests keep the API's defaults): " + ", ".join(
                 f"`{k}={v}`" for k, v in card.get("sampling", {}).items())
             + ": greedy decoding of held-out code loops without it (a `repetition_penalty` "
             "would also penalise the prompt's indentation tokens).", "",
             "## Data", "",
             f"- Python {d['python']} standard library: {d['stdlib_files']} source files and "
             f"`pydoc_data.topics`, no test folders.",
             "- Package sources (capped at 3 MB each): " + ", ".join(
                 f"{p['name']} {p['version']} ({p['licence']})" for p in d["packages"]) + ".",
             f"- {d['train_tokens']:,} training tokens; validation split: {d['val_modules']} "
             f"modules ({d['val_tokens']:,} tokens), chosen by a hash of the module path: "
             + ", ".join(f"`{m}`" for m in d["val_module_names"]) + ".",
             "- Held out entirely: the stdlib test suite `Lib/test`, used for the figures "
             "below (every 10th `test_*.py`, first 200k tokens).", "",
             "## Training", "",
             f"{t['steps']} steps, {t['tokens']:,} tokens, {t['seconds'] / 60:.1f} min on "
             f"{t['hardware']}; batch {t['batch']}x{t['seq_len']}, peak lr {t['peak_lr']}, "
             f"best validation perplexity {t['best_val_perplexity']}."
             + "".join(f" Continued from weights trained for {r['steps']} steps, "
                       f"{r['tokens']:,} tokens, {r['seconds'] / 60:.1f} min on {r['hardware']}"
                       f" (peak lr {r['peak_lr']})." for r in reversed(t.get("resumed_from", [])))
             + (f" Distilled from {t['distilled_from']}: trained on the KL to its next-token "
                "distribution, not on the text, so that it agrees with it (what speculation "
                "needs)." if "distilled_from" in t else ""), "",
             "## Held-out figures", "",
             f"- perplexity per token: **{f['heldout_perplexity']}** (unigram model of the "
             f"same tokenizer fitted on that text: {f['unigram_perplexity']}; ratio "
             f"{f['perplexity_ratio']})"]
    if "greedy_agreement_with_tiny_code" in f:
        lines.append(f"- greedy next-token agreement with tiny-code: "
                     f"**{f['greedy_agreement_with_tiny_code']:.1%}**")
    if "expert_usage" in f:
        lines += ["- tokens routed to each expert (rows: layers, columns: experts):", "",
                  "```", *(" ".join(f"{c:7d}" for c in row) for row in f["expert_usage"]),
                  "```"]
    lines += ["", "## Greedy completions of held-out code", "",
              "Headers and docstrings of helpers in the held-out test suite, completed "
              "greedily with the recommended sampling:", ""]
    for s in f["samples"]:
        lines += ["```python", s["prompt"] + s["completion"], "```", ""]
    (folder / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ZOO_DIR)
    parser.add_argument("--models", nargs="+", default=list(SPECS), choices=ZOO_NAMES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every model's training tokens (e.g. 8 on a GPU)")
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="multiply every model's peak learning rate (e.g. 0.5 to resume)")
    parser.add_argument("--resume", action="store_true",
                        help="continue training the models in --out from their weights "
                        "(same tokenizer; the card adds up the runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cards-only", action="store_true",
                        help="re-measure the models in --out and rewrite their cards")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.time()
    corpus = build_corpus()
    print(f"corpus: {len(corpus['train'])} train / {len(corpus['val'])} val documents "
          f"({time.time() - t0:.0f}s)", flush=True)
    shared = next((args.out / n for n in ZOO_NAMES if (args.out / n / "tokenizer.json")
                   .exists() and (n not in args.models or args.cards_only or args.resume)),
                  None)
    tokenizer = AutoTokenizer.from_pretrained(shared) if shared else train_tokenizer(
        [t for _, t in corpus["train"]], COMMON["vocab_size"])
    train = token_stream(tokenizer, [t for _, t in corpus["train"]])
    val = token_stream(tokenizer, [t for _, t in corpus["val"]])
    print(f"tokens: {len(train):,} train / {len(val):,} val ({time.time() - t0:.0f}s)",
          flush=True)
    data = {"python": platform.python_version(), "stdlib_files": corpus["stdlib_files"],
            "packages": corpus["packages"], "train_tokens": len(train),
            "val_tokens": len(val), "val_modules": len(corpus["val"]),
            "val_module_names": sorted(module for module, _ in corpus["val"])}
    models, trained = {}, {}
    for name in ZOO_NAMES:   # tiny-code first: the draft's card compares against it
        if name in args.models and not args.cards_only:
            arch, _, tokens, lr = SPECS[name]
            print(f"{name}: training", flush=True)
            model = make_model(name, args.seed, args.out / name if args.resume else None)
            teacher = models[TEACHERS[name]].float().eval() if name in TEACHERS else None
            trained[name] = train_model(model, train, val, tokens=int(tokens * args.scale),
                                        lr=lr * args.lr_scale, device=args.device,
                                        seed=args.seed, teacher=teacher)
            if teacher is not None:
                trained[name]["distilled_from"] = TEACHERS[name]
            trained[name]["hardware"] = hardware(args.device)
            trained[name]["command"] = "python -m toolkit.models.train " + " ".join(
                argv if argv is not None else sys.argv[1:])
            if args.resume:
                before = json.loads((args.out / name / "card.json").read_text())["training"]
                before.pop("history", None)
                trained[name]["resumed_from"] = [*before.pop("resumed_from", []), before]
            models[name] = model.eval()
        elif (args.out / name / "config.json").exists():
            models[name] = AutoModelForCausalLM.from_pretrained(args.out / name).to(args.device)
            if args.cards_only and name in args.models:
                card = json.loads((args.out / name / "card.json").read_text())
                trained[name] = card["training"]
    for model in models.values():   # measure exactly what ships: float16-rounded weights
        model.to(torch.float16).float()
    for name in args.models:
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        model = models[name]
        model.generation_config = GenerationConfig(   # (unknown knobs kept as attributes)
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            **SAMPLING)
        card = {"name": name, "architecture": type(model).__name__, "seed": args.seed,
                "sampling": SAMPLING,
                "parameters": sum(p.numel() for p in model.parameters()),
                "data": data, "training": trained[name],
                "figures": measure(name, models, tokenizer)}
        model.to(torch.float16).save_pretrained(folder)
        model.float()
        tokenizer.save_pretrained(folder)
        write_card(folder, name, model, card)
        print(f"{name}: {json.dumps({k: v for k, v in card['figures'].items() if k != 'samples'})}",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
