"""The reward-model rows of the throughput benchmark: reward.py's defaults against TRL RewardTrainer's,
on DistilGPT2's real architecture and real HH-RLHF preference pairs.

    python benchmarks/reward_throughput.py            # 96 pairs, every row at every precision (~10 min on 2 CPU cores)
    python benchmarks/reward_throughput.py --quick    # 16 pairs: a quick check that every row runs

Every row trains one epoch from the same random initial weights on the same pairs (those whose prompt +
longer answer + EOS fit MAX_LENGTH, so no row drops any), batch size and learning rate. Each row runs in
its own process so its peak memory is its own. Results go to benchmarks/results/reward-throughput-cpu.{json,md}.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import (  # noqa: E402  (the SFT rows' measuring and running tools)
    Counting, _peak_mb, _timing_callback, scratch_dir, plan, run_workers, script_main, write_results)

# ---- settings (each has a flag: BATCH_SIZE -> --batch-size) ----
MODEL = os.path.join(ROOT, "..", "shared", "distilgpt2-config")  # config.json + tokenizer (random weights)
DATASET = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-base-test.jsonl.gz")  # HH-RLHF pairs
PAIRS = 96  # pairs trained on (the first N usable ones); >= 16
BATCH_SIZE = 8  # pairs per step in every row (reward.py's and TRL's default)
MAX_LENGTH = 512  # reward.py's default; pairs longer than this are left out of every row
ROWS = "all"  # comma-separated subset of: default,padded,trl,trl_tuned
PRECISIONS = "auto"  # comma-separated subset of fp32,bf16; auto = every precision this machine offers
QUICK = False  # 16 pairs: check that every row runs
WORKER = ""  # internal: run one row (ROW:PRECISION) in this process and print its JSON

ALL_ROWS = ("default", "padded", "trl", "trl_tuned")
LABELS = {"default": "project default (reward.py: packed rows, score at the answer's last token)",
          "padded": "reward.py with --packing none (one padded row a sequence)",
          "trl": "TRL RewardTrainer defaults", "trl_tuned": "TRL RewardTrainer, no gradient checkpointing"}


def _pairs(tokenizer, n):
    """The first n usable pairs that fit MAX_LENGTH: (pair dicts, their tokens)."""
    from tuning.data import preferences

    pairs, _ = preferences.load_pairs(DATASET, skip_invalid=True)
    tokenized, report = preferences.tokenize_pairs(pairs, tokenizer, "seed", MAX_LENGTH)
    fits = [p for i, p in enumerate(pairs) if i not in set(report["too_long_dropped"])]
    return fits[:n], tokenized[:n]


def _reward_model():
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tuning.models import scoring

    torch.manual_seed(0)  # the same random weights in every row; dropout off in every row (TRL's default too)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(MODEL, num_labels=1))
    scoring.disable_dropout(model)
    return scoring.enable_score_index(model)


def run_row(row: str, precision: str, n: int) -> dict:
    """Train one epoch with one row's settings; the figures exclude the first (warm-up) step."""
    from tuning.models import loading

    tokenizer = loading.load_tokenizer(MODEL)
    pairs, tokens = _pairs(tokenizer, n)
    model = _reward_model()
    model.config.pad_token_id = tokenizer.pad_token_id
    times, outdir = [], scratch_dir()
    common = dict(output_dir=outdir, per_device_train_batch_size=BATCH_SIZE, num_train_epochs=1, logging_steps=1,
                  save_strategy="no", eval_strategy="no", report_to="none", bf16=precision == "bf16", use_cpu=True,
                  learning_rate=1e-5, seed=42, disable_tqdm=True)
    if row.startswith("trl"):
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        from tuning.data import preferences

        data = Dataset.from_list([{"prompt": preferences.prompt_text(p, "seed", tokenizer), "chosen": p["chosen"],
                                   "rejected": p["rejected"]} for p in pairs])
        extra = {"gradient_checkpointing": False} if row == "trl_tuned" else {}
        trainer = RewardTrainer(model=model, args=RewardConfig(**common, max_length=MAX_LENGTH, **extra),
                                train_dataset=data, processing_class=tokenizer, callbacks=[_timing_callback(times)])
        counter = trainer.data_collator = Counting(trainer.data_collator)
    else:
        from transformers import TrainingArguments

        from tuning.data import collate
        from tuning.preference.reward_trainer import RewardTrainer

        counter = Counting(collate.ScoreCollator(tokenizer.pad_token_id, "rows" if row == "default" else "none"))
        trainer = RewardTrainer(model=model, args=TrainingArguments(**common, remove_unused_columns=False),
                                train_dataset=tokens, data_collator=counter, processing_class=tokenizer,
                                callbacks=[_timing_callback(times)])
    trainer.train()
    steps = len(times)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    seconds = times[-1] - times[0]
    return {"row": row, "precision": precision, "steps": steps, "pairs_per_s": BATCH_SIZE * (steps - 1) / seconds,
            "real_tokens_per_s": sum(counter.real[1:steps]) / seconds,
            "real_share": sum(counter.real[:steps]) / sum(counter.computed[:steps]),
            "mean_loss": sum(losses) / len(losses), "peak_mb": _peak_mb(), "seconds": seconds}


def summarize(results: list[dict], precisions: list[str], auto: str) -> str:
    lines = ["| reward model | precision | pairs/s | real tokens/s | real share of computed positions "
             "| peak RSS (MB) | mean loss |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {LABELS[r['row']]} | {r['precision']} | {r['pairs_per_s']:.2f} | {r['real_tokens_per_s']:.0f} "
                     f"| {r['real_share']:.0%} | {r['peak_mb']:.0f} | {r['mean_loss']:.4f} |")
    by = {(r["row"], r["precision"]): r for r in results}
    lines.append("")
    ours, trl = by.get(("default", auto)), by.get(("trl", "bf16")) or by.get(("trl", auto))
    if ours and trl:  # the target: each side's defaults (reward.py: --precision auto; TRL: bf16)
        speed, memory = ours["pairs_per_s"] / trl["pairs_per_s"], ours["peak_mb"] / trl["peak_mb"]
        lines.append(f"- defaults: reward.py ({auto}) vs TRL RewardTrainer ({trl['precision']}) (target: >= 1x as fast, "
                     f"<= 100% memory): {speed:.2f}x pairs/s, {memory:.0%} peak memory "
                     f"{'PASS' if speed >= 1 and memory <= 1 else 'FAIL'}")
    for p in precisions:  # the same precision on both sides, for the record
        for other_row in ("trl", "trl_tuned", "padded"):
            a, b = by.get(("default", p)), by.get((other_row, p))
            if a and b:
                lines.append(f"- default vs {LABELS[other_row]}, both {p}: {a['pairs_per_s'] / b['pairs_per_s']:.2f}x "
                             f"pairs/s, {a['peak_mb'] / b['peak_mb']:.0%} peak memory")
    return "\n".join(lines)


def main(args) -> None:
    n = 16 if args.quick else args.pairs
    rows, precisions, auto = plan(args.rows, ALL_ROWS, args.precisions)
    results = run_workers(__file__, rows, precisions, [
        "--pairs", str(n), f"--model={args.model}", f"--dataset={args.dataset}", f"--batch-size={args.batch_size}",
        f"--max-length={args.max_length}"], f"{n} pairs", lambda r: f"{r['pairs_per_s']:.2f} pairs/s")
    header = (f"Pairs: first {n} usable of {os.path.basename(args.dataset)} that fit {args.max_length} tokens; model: "
              f"DistilGPT2 architecture (random weights, one-output score head); batch size {args.batch_size} pairs; "
              f"CPU threads: {os.cpu_count()}; one epoch per row, figures exclude the first step. `--precision auto` "
              f"picks {auto} on this machine; TRL's default is bf16.\n")
    table = summarize(results, precisions, auto)
    print("\n" + header + "\n" + table)
    if not args.quick and args.rows == "all" and args.precisions == "auto":
        write_results("reward-throughput-cpu", {"pairs": n, "batch_size": args.batch_size, "auto_precision": auto,
                                                "results": results}, header, table)


if __name__ == "__main__":
    script_main(sys.modules[__name__], ("model", "dataset", "batch_size", "max_length"),
                lambda row, precision, flags: run_row(row, precision, flags.pairs))
