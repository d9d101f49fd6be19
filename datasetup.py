"""Alpaca records (or conversations) -> prompt/response text -> tokens whose labels mask the prompt.

    python datasetup.py --dataset ../shared/data/alpaca_5000.json --tokenizer ../shared/gpt2-tokenizer

Prints what was read, dropped and truncated, token-length percentiles and two formatted examples.
`--save DIR` writes the tokenized train/validation DatasetDict for `train.py --dataset DIR`. The tokenization
itself is tuning/data/sft.py, which train.py calls too.
"""

from __future__ import annotations

import sys
import time

# ---- settings (each has a flag: BATCH_SIZE -> --batch-size) ----
DATASET = "tatsu-lab/alpaca"  # Hub dataset id, a .json/.jsonl file of records, or a --save directory
TOKENIZER = "distilgpt2"  # Hub id or local directory of the tokenizer
FORMAT = "auto"  # auto|alpaca|messages|sharegpt|hh: the records' format (auto: read from the first record)
TEMPLATE = "seed"  # prompt template: seed|alpaca; conversations: the chat template made from it
TRAIN_ON = "all_assistant"  # conversations: all_assistant|last_assistant, the assistant turns that carry the loss
MAX_LENGTH = 512  # tokens per example; the response is cut, never the prompt
VAL_SIZE = 0.02  # validation records: a count (>= 1) or a fraction in (0, 1)
SEED = 42  # seed of the train/validation split
TRAIN_ON_PROMPT = False  # also put loss on the prompt tokens (off: the response and its EOS only)
SKIP_INVALID = False  # drop malformed records and report them instead of stopping
SAVE = ""  # directory to save the tokenized DatasetDict to; empty = don't save


def length_stats(dataset) -> dict:
    import numpy as np

    from tuning.data.sft import IGNORE_INDEX

    lengths = np.asarray(dataset["length"])
    prompts = np.asarray(dataset["prompt_length"])
    loss_tokens = sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in dataset["labels"])
    pct = lambda a: {"p50": int(np.percentile(a, 50)), "p95": int(np.percentile(a, 95)), "max": int(a.max())}
    return {"examples": len(lengths), "prompt": pct(prompts), "sequence": pct(lengths),
            "truncated": int(np.sum(dataset["truncated"])), "loss_token_share": loss_tokens / max(1, lengths.sum())}


def print_summary(dsd, report, template, max_length, tokenizer, source) -> None:
    print(f"\nRecords read: {report.get('read', '-')} from {source}")
    if report.get("skipped"):
        print(f"Skipped {len(report['skipped'])} invalid records:")
        for line in report["skipped"][:5]:
            print(f"  {line}")
    empty = report.get("empty_dropped", [])
    if empty:
        print(f"Dropped {len(empty)} records with an empty instruction or output (indices {empty[:5]})")
        for line in report.get("empty_details", [])[:3]:
            print(f"  {line}")
    print(f"Placeholder inputs ('No input', '<noinput>', ...) treated as empty: {report.get('placeholder_inputs', 0)}")
    for split, dataset in dsd.items():
        s = length_stats(dataset)
        n_in = report.get("records_per_split", {}).get(split)
        print(f"\n[{split}] {s['examples']} examples; truncated to {max_length}: {s['truncated']}"
              + (f"; dropped (prompt alone > {max_length}): {n_in - s['examples']}" if n_in is not None else ""))
        print(f"  prompt tokens   p50 {s['prompt']['p50']:>5}  p95 {s['prompt']['p95']:>5}  max {s['prompt']['max']:>5}")
        print(f"  sequence tokens p50 {s['sequence']['p50']:>5}  p95 {s['sequence']['p95']:>5}"
              f"  max {s['sequence']['max']:>5}")
        print(f"  share of tokens carrying loss: {s['loss_token_share']:.1%}")
    for i in range(min(2, len(dsd["train"]))):
        example = dsd["train"][i]
        if "spans" in example:  # a conversation: its trained tokens marked where they are
            from tuning.data.label_audit import marked_example

            print(f"\n--- example {i} (chat template), loss on the parts in [[ ]] ---")
            print(marked_example(example, tokenizer))
            continue
        print(f"\n--- example {i} ({template} template), loss on the part after '|>>' ---")
        cut = example["prompt_length"]
        ids = example["input_ids"]
        print(tokenizer.decode(ids[:cut]) + "|>>" + tokenizer.decode(ids[cut:]))
    print(f"\nTokenized data {'reused from cache' if report.get('from_cache') else 'cached'}:"
          f" {report.get('saved_dir') or report.get('cache')}")


def validate_args(args) -> None:
    from tuning.cli import check_all
    from tuning.data.records import val_size_problems

    problems = []
    if args.max_length < 2:
        problems.append(f"--max-length must be at least 2 (got {args.max_length})")
    check_all(problems + val_size_problems(args.val_size))


def main(args, explicit: set) -> None:
    from tuning.cli import UserError
    from tuning.data import label_audit, tokencache
    from tuning.data.chat_template import chat_template_for
    from tuning.data.collate import SFTCollator
    from tuning.data.conversations import is_conversation, load_training_records
    from tuning.data.sft import prepare_datasets
    from tuning.models.loading import load_tokenizer

    start = time.perf_counter()
    # Records first: a bad file is reported before any tokenizer download.
    loaded = None if tokencache.is_saved_dir(args.dataset) else load_training_records(args.dataset, args.format,
                                                                                       args.skip_invalid)
    conversational = bool(loaded and is_conversation(loaded[0][0]))
    if conversational and args.save:
        raise UserError("--save: conversations are tokenized by train.py itself (it audits their labels and saves "
                        "their chat template), not saved here; drop --save to see the summary")
    tokenizer = load_tokenizer(args.tokenizer, flag="--tokenizer")
    chat = chat_template_for(tokenizer, args.template, conversational)
    if conversational:  # the checks train.py runs before its first step
        label_audit.require_generation_markers(chat, args.tokenizer)
    dsd, report = prepare_datasets(args.dataset, tokenizer, args.template, args.max_length, args.val_size,
                                   args.seed, args.train_on_prompt, args.skip_invalid, loaded, chat, args.train_on)
    if conversational:
        label_audit.require_sound_labels(dsd, tokenizer, SFTCollator(tokenizer.pad_token_id, "none"))
    print_summary(dsd, report, args.template, args.max_length, tokenizer, args.dataset)
    if args.save:
        tokencache.save(dsd, args.save, tokenizer, args.template, args.max_length, args.train_on_prompt,
                        report.get("held_out"))
        model_hint = "" if args.tokenizer == TOKENIZER else f" with a --model whose tokenizer is {args.tokenizer}"
        print(f"Saved tokenized DatasetDict to {args.save}. Use: python train.py --dataset {args.save}{model_hint};"
              " it reads the template, --max-length and --train-on-prompt from there.")
    print(f"Done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    from tuning import cli

    cli.run(sys.modules[__name__], main, validate_args)
