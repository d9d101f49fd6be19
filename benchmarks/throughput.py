"""Training throughput of batching strategies, on DistilGPT2's real architecture and real Alpaca records.

    python benchmarks/throughput.py            # 96 records, every row at every precision (~20 min on 2 CPU cores)
    python benchmarks/throughput.py --quick    # 16 records: a quick check that every row runs

Every row trains one epoch from the same random initial weights on the same records, batch size and
learning rate; only the batching strategy and precision change. Each row runs in its own process so
its peak memory is its own. Results go to benchmarks/results/throughput-<device>.{json,md}.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# ---- settings (each has a flag: BATCH_SIZE -> --batch-size) ----
MODEL = os.path.join(ROOT, "..", "shared", "distilgpt2-config")  # config.json + tokenizer (random weights)
DATASET = os.path.join(ROOT, "..", "shared", "data", "alpaca_5000.json")  # Alpaca records
RECORDS = 96  # records trained on (the first N usable ones); >= 16
BATCH_SIZE = 8  # examples per step in every row
TEMPLATE = "alpaca"  # prompt template: seed|alpaca
MAX_LENGTH = 512  # the pad-to-max row pads to this; every row truncates to it
RAW_WIDTH = 128  # row width of the raw forward+backward bound
ROWS = "all"  # comma-separated subset of: pad_max,dynamic,length_grouped,packed,default,trl,trl_tuned,raw_bound
PRECISIONS = "auto"  # comma-separated subset of fp32,bf16; auto = every precision this machine offers
QUICK = False  # 16 records: check that every row runs
TRL_TUNED_LAYOUT = "padding_free"  # how trl_tuned drops padding: padding_free|packing (bfd); padding_free is faster
WORKER = ""  # internal: run one row (ROW:PRECISION) in this process and print its JSON

# Settings that a row's worker process receives from the command line.
WORKER_SETTINGS = ("model", "dataset", "batch_size", "template", "max_length", "raw_width", "trl_tuned_layout")
ALL_ROWS = ("pad_max", "dynamic", "length_grouped", "packed", "default", "trl", "trl_tuned", "raw_bound")
LABELS = {"pad_max": "pad every example to MAX_LENGTH", "dynamic": "dynamic padding",
          "length_grouped": "length-grouped dynamic padding", "packed": "packing, examples kept apart",
          "default": "project default (train.py)", "trl": "TRL SFTTrainer defaults",
          "trl_tuned": "TRL SFTTrainer tuned (no checkpointing, completion-only loss, {layout})",
          "raw_bound": "raw fwd+bwd+AdamW on full rows (bound)"}


class Counting:
    """Wraps a collator to record each batch's real tokens and computed positions."""

    def __init__(self, collator):
        self.collator, self.real, self.computed = collator, [], []

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch["input_ids"]
        if "num_real_tokens" in batch:
            real = int(batch["num_real_tokens"])
        elif "attention_mask" in batch:
            real = int(batch["attention_mask"].sum())
        else:
            real = ids.numel()
        self.real.append(real)
        self.computed.append(ids.numel())
        return batch


def _timing_callback(times):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    return Timer()


def _records(n):
    from tuning.data.records import load_records

    records, _ = load_records(DATASET)
    return records[:n]


def run_row(row: str, precision: str, n_records: int) -> dict:
    """Train one epoch with one strategy; the figures exclude the first (warm-up) step."""
    import torch

    from tuning.data import sft, templates
    from tuning.data.collate import SFTCollator
    from tuning.models import loading, response_logits

    torch.manual_seed(0)
    tokenizer = loading.load_tokenizer(MODEL)
    model = loading.load_model(MODEL, "scratch", tokenizer)
    model.config.use_cache = False
    records = _records(n_records)
    bf16 = precision == "bf16"
    if row == "raw_bound":
        return _raw_bound(model, tokenizer, records, bf16)
    times, outdir = [], scratch_dir()
    common = dict(output_dir=outdir, per_device_train_batch_size=BATCH_SIZE, num_train_epochs=1, logging_steps=1,
                  save_strategy="no", eval_strategy="no", report_to="none", bf16=bf16, use_cpu=True,
                  learning_rate=1e-4, seed=42, disable_tqdm=True)
    if row in ("trl", "trl_tuned"):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        # TRL tokenizes prompt + completion and appends EOS: the same ids and loss positions as datasetup.
        data = Dataset.from_list([{"prompt": templates.format_prompt(r, TEMPLATE), "completion": r["output"]}
                                  for r in records])
        config = SFTConfig(**common, **(_trl_tuned_settings() if row == "trl_tuned" else {}))
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[_timing_callback(times)])
        counter = trainer.data_collator = Counting(trainer.data_collator)
    else:
        from transformers import TrainingArguments

        from tuning.runs.trainer import InstructTrainer

        data = sft.tokenize_records(records, tokenizer, TEMPLATE, MAX_LENGTH, desc=None)
        mode = "rows" if row in ("packed", "default") else "none"
        counter = Counting(SFTCollator(tokenizer.pad_token_id, mode, MAX_LENGTH if row == "pad_max" else None))
        if row == "default":
            probe = [data[i] for i in range(min(4, len(data)))]  # checked on a batch, as train.py does
            response_logits.enable_response_only_logits(model, counter.collator(probe))
        targs = TrainingArguments(**common, remove_unused_columns=False, prediction_loss_only=True,
                                  train_sampling_strategy="group_by_length" if row == "length_grouped" else "random")
        trainer = InstructTrainer(model=model, args=targs, train_dataset=data, data_collator=counter,
                                  processing_class=tokenizer, callbacks=[_timing_callback(times)])
    trainer.train()
    steps = len(times)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    real_after_warmup = sum(counter.real[1:steps])
    return {"row": row, "precision": precision, "steps": steps,
            "tokens_per_s": real_after_warmup / (times[-1] - times[0]),
            "real_share": sum(counter.real[:steps]) / sum(counter.computed[:steps]),
            "mean_loss": sum(losses) / len(losses), "peak_mb": _peak_mb(), "seconds": times[-1] - times[0]}


def _trl_tuned_settings() -> dict:
    """SFTConfig for TRL at its fastest here (bf16 comes from the row's precision, like every row).

    Both layouts flatten the batch into one row without an attention mask; position ids restart at 0
    for each example, and GPT-2 (use_cache off) builds the block-diagonal causal mask from them, so
    examples stay apart (checked against one example per row: same loss to 1e-6 in fp32).
    padding_free keeps BATCH_SIZE examples per step; packing puts BATCH_SIZE rows of up to MAX_LENGTH
    tokens (several examples each) in a step, and its longer flattened rows cost more attention.
    """
    # activation_checkpointing is transformers 5's name for gradient_checkpointing (the old one warns)
    settings = {"activation_checkpointing": False, "completion_only_loss": True}
    if TRL_TUNED_LAYOUT == "packing":
        return {**settings, "packing": True, "packing_strategy": "bfd", "max_length": MAX_LENGTH}
    # padding_free without packing does not truncate (TRL insists on max_length=None); the records fit MAX_LENGTH
    return {**settings, "padding_free": True, "max_length": None}


def _raw_bound(model, tokenizer, records, bf16) -> dict:
    """Plain forward + backward + AdamW on full BATCH_SIZE x RAW_WIDTH rows: as fast as this shape gets."""
    import torch

    from tuning.data import sft

    stream = [t for ex in sft.tokenize_records(records, tokenizer, TEMPLATE, MAX_LENGTH, desc=None)["input_ids"]
              for t in ex]
    per_step = BATCH_SIZE * RAW_WIDTH
    while len(stream) < 3 * per_step:  # --quick: enough for a warm-up step and two timed ones
        stream = stream * 2
    batches = [torch.tensor(stream[i:i + per_step]).view(BATCH_SIZE, RAW_WIDTH)
               for i in range(0, len(stream) - per_step + 1, per_step)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()
    times, losses = [], []
    for ids in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter())
    return {"row": "raw_bound", "precision": "bf16" if bf16 else "fp32", "steps": len(batches),
            "tokens_per_s": per_step * (len(batches) - 1) / (times[-1] - times[0]), "real_share": 1.0,
            "mean_loss": None, "peak_mb": _peak_mb(), "seconds": times[-1] - times[0]}


def scratch_dir(prefix: str = "bench-") -> str:
    """A temporary directory removed when this process exits: the rows save whole models and checkpoints
    (1.6 GB for an online row), which would otherwise pile up in /tmp run after run."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarize(results: list[dict], precisions: list[str], auto: str) -> str:
    lines = ["| strategy | precision | real tokens/s | real share of computed positions | peak RSS (MB) "
             "| mean loss (same examples) |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        loss = f"{r['mean_loss']:.4f}" if r["mean_loss"] is not None else "n/a (other layout)"
        label = LABELS[r["row"]].format(layout=TRL_TUNED_LAYOUT.replace("_", "-"))
        lines.append(f"| {label} | {r['precision']} | {r['tokens_per_s']:.0f} | {r['real_share']:.0%} "
                     f"| {r['peak_mb']:.0f} | {loss} |")
    by = {(r["row"], r["precision"]): r for r in results}
    lines.append("")
    for p in precisions:
        d = by.get(("default", p))
        if not d:
            continue
        checks = [("TRL SFTTrainer defaults", "trl", p, 3.5, "tokens_per_s"),
                  ("TRL SFTTrainer tuned", "trl_tuned", p, 1.5, "tokens_per_s"),
                  ("pad to MAX_LENGTH, fp32", "pad_max", "fp32", 7.0, "tokens_per_s"),
                  ("raw bound, same precision", "raw_bound", p, 0.8, "tokens_per_s")]
        for label, row, prec, target, key in checks:
            other = by.get((row, prec))
            if other:
                ratio = d[key] / other[key]
                lines.append(f"- default ({p}) vs {label} (target >= {target}x): {ratio:.2f}x "
                             f"{'PASS' if ratio >= target else 'FAIL'}")
        pad = by.get(("pad_max", p))
        if pad:
            share = d["peak_mb"] / pad["peak_mb"]
            lines.append(f"- default ({p}) peak memory vs pad to MAX_LENGTH ({p}) (target <= 60%): {share:.0%} "
                         f"{'PASS' if share <= 0.6 else 'FAIL'}")
    lines.append(f"\n`--precision auto` picks {auto} on this machine.")
    return "\n".join(lines)


def plan(requested_rows: str, all_rows: tuple, requested_precisions: str) -> tuple[tuple, list[str], str]:
    """(rows, precisions, what --precision auto picks): "all" and "auto" resolved; TRL rows dropped without trl."""
    from tuning.models import devices

    rows = all_rows if requested_rows == "all" else tuple(requested_rows.split(","))
    try:
        import trl  # noqa: F401
    except ImportError:
        rows = tuple(r for r in rows if not r.startswith("trl"))
        print("trl is not installed (pip install -r requirements-dev.txt): skipping its rows")
    auto, _ = devices.resolve_precision("auto", devices.get_device("cpu"))
    precisions = (["fp32", "bf16"] if auto == "bf16" else ["fp32"]) if requested_precisions == "auto" \
        else requested_precisions.split(",")
    return rows, precisions, auto


def run_workers(script: str, rows, precisions, worker_args: list[str], what: str, show) -> list[dict]:
    """Each row at each precision in its own process (`script --worker ROW:PRECISION *worker_args`), so its
    peak memory is its own; `show(result)` is the line printed after each."""
    results = []
    for precision in precisions:
        for row in rows:
            print(f"running {row} at {precision} on {what} ...", flush=True)
            out = subprocess.run([sys.executable, script, "--worker", f"{row}:{precision}", *worker_args],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{row} at {precision} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {show(results[-1])}, peak {results[-1]['peak_mb']:.0f} MB", flush=True)
    return results


def write_results(name: str, meta: dict, header: str, table: str) -> None:
    """benchmarks/results/NAME.json (meta + every figure) and NAME.md (the header and table)."""
    base = os.path.join(ROOT, "benchmarks", "results", name)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".json", "w") as handle:
        json.dump(meta, handle, indent=2)
    with open(base + ".md", "w") as handle:
        handle.write(header + "\n" + table + "\n")
    print(f"\nwritten: {base}.json and .md")


def main(args) -> None:
    n = 16 if args.quick else args.records
    rows, precisions, auto = plan(args.rows, ALL_ROWS, args.precisions)
    settings = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in WORKER_SETTINGS]
    results = run_workers(__file__, rows, precisions, ["--records", str(n), *settings], f"{n} records",
                          lambda r: f"{r['tokens_per_s']:.0f} real tokens/s")
    table = summarize(results, precisions, auto)
    header = (f"Records: first {n} of {os.path.basename(DATASET)}; model: DistilGPT2 architecture (random weights); "
              f"batch size {BATCH_SIZE}; template {TEMPLATE}; CPU threads: {os.cpu_count()}; one epoch per row, "
              "figures exclude the first step.\n")
    print("\n" + header + "\n" + table)
    if not args.quick and args.rows == "all" and args.precisions == "auto":
        write_results("throughput-cpu", {"records": n, "batch_size": BATCH_SIZE, "auto_precision": auto,
                                         "results": results}, header, table)


def script_main(module, settings: tuple[str, ...], run_worker) -> None:
    """A benchmark's command line: its flags parsed, and `settings` copied to its constants so that they rule
    every row; with --worker ROW:PRECISION, `run_worker(row, precision, flags)` runs here and its result is
    printed as JSON (run_workers reads it), otherwise module.main(flags) runs every row."""
    from tuning import cli

    parsed = cli.parse_or_exit(cli.build_parser(module), lambda a: None)
    vars(module).update({name.upper(): getattr(parsed, name) for name in settings})
    if parsed.worker:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        row, precision = parsed.worker.split(":")
        print(json.dumps(run_worker(row, precision, parsed)))
    else:
        module.main(parsed)


if __name__ == "__main__":
    script_main(sys.modules[__name__], WORKER_SETTINGS, lambda row, precision, flags: run_row(row, precision,
                                                                                              flags.records))
