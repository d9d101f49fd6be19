"""Memory and speed of full fine-tuning vs LoRA vs LoRA + gradient checkpointing, through train.py's own path
(packed rows, response-only logits, InstructTrainer), on real Alpaca records.

    python benchmarks/memory.py            # DistilGPT2 and a ~1B Llama, every mode (~10 min on 2 CPU cores)
    python benchmarks/memory.py --quick    # DistilGPT2 only, 16 records: a quick check that every row runs

Models: DistilGPT2's real architecture, and a Llama-architecture config built here (16 layers, hidden 2048,
32 heads, MLP 5632; the GPT-2 tokenizer's 50,257-token vocabulary, since no Llama tokenizer is offline:
1.03B parameters). Both have random weights: the cost of a step does not depend on the values, and the
LoRA rows call lora.add_lora directly (train.py refuses --lora on random weights, which would stay random).

Each row runs in its own process, so its peak memory (RSS) is its own, and trains the same records from the
same initial weights at the precision train.py picks. Real tokens/s exclude the first (warm-up) step.
Full fine-tuning's need is estimated first: its peak extrapolated per layer from full fine-tuning of the
same config cut to 2 and 4 layers (measured, in rows of their own; each layer adds the same: 16 bytes a
parameter for fp32 weights, gradients and AdamW's two moments, plus its activations). It runs where that
estimate fits both the 24 GiB machine the issue targets and this machine's free memory, so on DistilGPT2
the estimate is checked against the measurement. Memory is in MiB. Results go to
benchmarks/results/memory-cpu.{json,md}.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import (  # noqa: E402  (the SFT rows' measuring and running tools)
    Counting, _peak_mb, _timing_callback, scratch_dir, run_workers, script_main, write_results)

# ---- settings (each has a flag: BATCH_SIZE -> --batch-size) ----
SMALL = os.path.join(ROOT, "..", "shared", "distilgpt2-config")  # DistilGPT2's config.json + tokenizer
TOKENIZER = os.path.join(ROOT, "..", "shared", "gpt2-tokenizer")  # the tokenizer of the 1B Llama config
DATASET = os.path.join(ROOT, "..", "shared", "data", "alpaca_5000.json")  # Alpaca records
SMALL_RECORDS = 96  # records DistilGPT2 trains on (one epoch)
LARGE_RECORDS = 40  # records the 1B model trains on (one epoch: 5 steps at batch size 8)
BATCH_SIZE = 8  # examples per step in every row
TEMPLATE = "alpaca"  # prompt template: seed|alpaca
MAX_LENGTH = 512  # tokens per example at most
LORA_R = 16  # LoRA rank (train.py's default)
MODELS = "all"  # comma-separated subset of: distilgpt2,llama-1b
BUDGET_GIB = 24  # full fine-tuning runs only if its estimate fits this much memory (the machine targeted) ...
FREE_MARGIN = 0.95  # ... and this share of the memory free on this machine
QUICK = False  # DistilGPT2 only, 16 records: check that every row runs
RECORDS = 0  # internal: records the worker trains on
WORKER = ""  # internal: run one row (MODEL/MODE:PRECISION) in this process and print its JSON

WORKER_SETTINGS = ("dataset", "batch_size", "template", "max_length", "lora_r")
ALL_MODELS = ("distilgpt2", "llama-1b")
MODES = ("lora", "lora_gc", "full@2", "full@4", "full")  # full@N: the model cut to N layers (the estimate)
MODE_LABELS = {"full": "full fine-tuning", "lora": "LoRA", "lora_gc": "LoRA + gradient checkpointing",
               "full@2": "full fine-tuning, cut to 2 layers", "full@4": "full fine-tuning, cut to 4 layers"}
# ~1B Llama (the shape of Llama 3.2 1B / TinyLlama, with full multi-head attention).
LLAMA_1B = dict(model_type="llama", num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
                num_key_value_heads=32, intermediate_size=5632, max_position_embeddings=2048,
                tie_word_embeddings=False)


def model_dir(name: str, layers: int | None = None) -> str:
    """A temp dir with the model's config.json (cut to `layers` blocks if given) and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(SMALL if name == "distilgpt2" else TOKENIZER)
    if name == "distilgpt2":
        config = AutoConfig.from_pretrained(SMALL)
    else:
        config = LlamaConfig(**{k: v for k, v in LLAMA_1B.items() if k != "model_type"}, vocab_size=len(tokenizer),
                             bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    if layers:
        config.num_hidden_layers = layers
    directory = scratch_dir(f"{name}-")
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_row(name: str, mode: str, precision: str, n_records: int) -> dict:
    """One epoch of train.py's training path; LoRA as train.py adds it (after the packing and logits checks)."""
    import torch
    from transformers import TrainingArguments

    from tuning.data import records, sft
    from tuning.models import lora
    from tuning.models import loading, response_logits
    import train
    from tuning.data.collate import SFTCollator
    from tuning.runs.checks import probe_examples
    from tuning.runs.trainer import InstructTrainer

    path = model_dir(name, int(mode.split("@")[1]) if "@" in mode else None)
    tokenizer = loading.load_tokenizer(path)
    torch.manual_seed(0)
    model = loading.load_model(path, "scratch", tokenizer)
    model.config.use_cache = False
    records = records.load_records(DATASET)[0][:n_records]
    data = sft.tokenize_records(records, tokenizer, TEMPLATE, MAX_LENGTH, desc=None)
    probe = probe_examples(data)
    packing = train.choose_packing(model, probe, "rows", False, tokenizer.pad_token_id, lambda *a: None)
    sparse = response_logits.enable_response_only_logits(model, SFTCollator(tokenizer.pad_token_id, packing)(probe))
    if mode.startswith("lora"):
        model = lora.add_lora(model, path, LORA_R, 2.0 * LORA_R, 0.05, seed=0)
    trainable, total = lora.parameter_counts(model)
    times, outdir = [], scratch_dir()
    counter = Counting(SFTCollator(tokenizer.pad_token_id, packing))
    targs = TrainingArguments(output_dir=outdir, per_device_train_batch_size=BATCH_SIZE, num_train_epochs=1,
                              logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
                              bf16=precision == "bf16", use_cpu=True, learning_rate=1e-4, seed=42, disable_tqdm=True,
                              remove_unused_columns=False, prediction_loss_only=True,
                              activation_checkpointing=mode == "lora_gc")
    trainer = InstructTrainer(model=model, args=targs, train_dataset=data, data_collator=counter,
                              processing_class=tokenizer, callbacks=[_timing_callback(times)])
    trainer.train()
    steps = len(times)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"row": f"{name}/{mode}", "model": name, "mode": mode, "precision": precision, "steps": steps,
            "packing": packing, "response_only_logits": sparse, "trainable": trainable, "total": total,
            "tokens_per_s": sum(counter.real[1:steps]) / (times[-1] - times[0]), "mean_loss": sum(losses) / len(losses),
            "peak_mb": _peak_mb(), "seconds": times[-1] - times[0]}


def full_estimate_mb(cut: list[dict], layers: int) -> float:
    """Full fine-tuning's peak at `layers` layers, extrapolated from the rows of the model cut to fewer
    layers: each layer adds its 16 bytes a parameter and its activations, the same for every layer."""
    (few, a), (more, b) = sorted((int(r["mode"].split("@")[1]), r["peak_mb"]) for r in cut)
    return b + (layers - more) * (b - a) / (more - few)


def not_run(name: str, lora_row: dict, estimate: float, why: str) -> dict:
    """The row of a full fine-tune that was not run (or did not finish): its size and estimate, nothing measured."""
    size = lora_row["total"] - lora_row["trainable"]
    return {"row": f"{name}/full", "model": name, "mode": "full", "skipped": True, "why": why, "trainable": size,
            "total": size, "estimate_mb": estimate, "peak_mb": None, "tokens_per_s": None, "mean_loss": None}


def free_mb() -> float:
    """MemAvailable from /proc/meminfo (Linux), in MiB; infinite elsewhere."""
    try:
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return float("inf")


def summarize(results: list[dict], estimates: dict) -> str:
    lines = ["| model | mode | trainable parameters | peak RSS (MiB) | real tokens/s | mean loss |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        share = f"{r['trainable']:,} of {r['total']:,} ({r['trainable'] / r['total']:.2%})"
        if r.get("skipped"):
            lines.append(f"| {r['model']} | {MODE_LABELS[r['mode']]} | {share} | not run: {r['why']} | - | - |")
            continue
        lines.append(f"| {r['model']} | {MODE_LABELS[r['mode']]} | {share} | {r['peak_mb']:,.0f} "
                     f"| {r['tokens_per_s']:.0f} | {r['mean_loss']:.4f} |")
    by = {(r["model"], r["mode"]): r for r in results}
    lines.append("")
    for name, estimate in estimates.items():
        full = by.get((name, "full"))
        if full and not full.get("skipped"):
            lines.append(f"- {name}: full fine-tuning's estimate (extrapolated from 2 and 4 layers) was "
                         f"{estimate:,.0f} MiB; measured {full['peak_mb']:,.0f} MiB")
    big, gc = by.get(("llama-1b", "full")), by.get(("llama-1b", "lora_gc"))
    if big and gc:
        measured = not big.get("skipped")
        reference = big["peak_mb"] if measured else big["estimate_mb"]
        share = gc["peak_mb"] / reference
        lines.append(f"- llama-1b: LoRA + gradient checkpointing peak vs full fine-tuning "
                     f"({'measured' if measured else 'estimated'}) (target <= 35%): {share:.0%} "
                     f"{'PASS' if share <= 0.35 else 'FAIL'}")
    small, adapted = by.get(("distilgpt2", "full")), by.get(("distilgpt2", "lora"))
    if small and adapted:
        ratio = adapted["tokens_per_s"] / small["tokens_per_s"]
        lines.append(f"- distilgpt2: LoRA real tokens/s vs full fine-tuning (target >= 1.0x): {ratio:.2f}x "
                     f"{'PASS' if ratio >= 1.0 else 'FAIL'}")
    return "\n".join(lines)


def main(args) -> None:
    from tuning.models import lora as lora_lib
    from tuning.models import devices

    precision, _ = devices.resolve_precision("auto", devices.get_device("cpu"))
    names = ("distilgpt2",) if args.quick else ALL_MODELS if args.models == "all" else tuple(args.models.split(","))
    settings = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in WORKER_SETTINGS]
    results, estimates = [], {}
    for name in names:
        n = 16 if args.quick else args.small_records if name == "distilgpt2" else args.large_records
        for mode in MODES:
            if mode == "full":  # estimated for every model, so the estimate is checked where full fine-tuning fits
                lora_row = next(r for r in results if r["row"] == f"{name}/lora")
                layers = lora_lib.load_config(model_dir(name)).num_hidden_layers
                cut = [r for r in results if r["model"] == name and "@" in r["mode"]]
                estimates[name], available = full_estimate_mb(cut, layers), free_mb()
                need = f"needs about {estimates[name]:,.0f} (estimate)"
                why = (f"{need}, over {args.budget_gib} GiB" if estimates[name] > args.budget_gib * 1024 else
                       f"{need}, over {args.free_margin:.0%} of the {available:,.0f} free here"
                       if estimates[name] > args.free_margin * available else "")
                if why:
                    print(f"skipping {name}/full: {why}")
                    results.append(not_run(name, lora_row, estimates[name], why))
                    continue
            try:
                results += run_workers(__file__, [f"{name}/{mode}"], [precision], ["--records", str(n), *settings],
                                       f"{n} records", lambda r: f"{r['tokens_per_s']:.0f} real tokens/s")
            except SystemExit as failure:  # killed for memory, most likely: reported in its row
                if mode != "full":
                    raise
                print(failure)
                results.append(not_run(name, lora_row, estimates[name], "started, but failed (out of memory?)"))
    table = summarize(results, estimates)
    header = (f"Records: the first of {os.path.basename(DATASET)} (DistilGPT2 {args.small_records}, llama-1b "
              f"{args.large_records}); batch size {BATCH_SIZE}; template {TEMPLATE}; precision {precision}; LoRA r "
              f"{LORA_R} on every linear layer of the blocks; random weights; CPU threads: {os.cpu_count()}; "
              "one epoch per row, tokens/s exclude the first step.\n")
    print("\n" + header + "\n" + table)
    if not args.quick and args.models == "all":
        write_results("memory-cpu", {"precision": precision, "batch_size": BATCH_SIZE, "estimates_mb": estimates,
                                     "results": results}, header, table)


if __name__ == "__main__":  # a worker's row is MODEL/MODE
    script_main(sys.modules[__name__], WORKER_SETTINGS,
                lambda row, precision, flags: run_row(*row.split("/"), precision, flags.records))
