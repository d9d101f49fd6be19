"""Alpaca records -> prompt/response text -> tokens whose labels mask the prompt.

    python datasetup.py --dataset ../shared/data/alpaca_5000.json --tokenizer ../shared/gpt2-tokenizer

Prints what was read, dropped and truncated, token-length percentiles and two formatted examples.
`--save DIR` writes the tokenized train/validation DatasetDict for `train.py --dataset DIR`.
"""

from __future__ import annotations

import os
import random
import time
import numpy as np

from tuning.data import tokencache
from tuning import rundir
from tuning.cli import UserError
from tuning.data.records import DataError, is_placeholder_input, load_records, read_raw  # noqa: F401  (part of this API)
from tuning.data.templates import TEMPLATES, Template, bos_prefix, encode_prompt, format_prompt, template_of  # noqa: F401

# ---- settings (each has a flag: BATCH_SIZE -> --batch-size) ----
DATASET = "tatsu-lab/alpaca"  # Hub dataset id, a .json/.jsonl file of records, or a --save directory
TOKENIZER = "distilgpt2"  # Hub id or local directory of the tokenizer
TEMPLATE = "seed"  # prompt template: seed|alpaca
MAX_LENGTH = 512  # tokens per example; the response is cut, never the prompt
VAL_SIZE = 0.02  # validation records: a count (>= 1) or a fraction in (0, 1)
SEED = 42  # seed of the train/validation split
TRAIN_ON_PROMPT = False  # also put loss on the prompt tokens (off: the response and its EOS only)
SKIP_INVALID = False  # drop malformed records and report them instead of stopping
SAVE = ""  # directory to save the tokenized DatasetDict to; empty = don't save

# Label of tokens that carry no loss (PyTorch cross-entropy's ignore_index); fixed, so not a flag.
IGNORE_INDEX = -100


def split_records(records: list, val_size: int | float = VAL_SIZE, seed: int = SEED) -> tuple[list, list]:
    """Deterministic (train, validation) split: the same records, size and seed give the same split."""
    n_val = round(len(records) * val_size) if isinstance(val_size, float) else int(val_size)
    n_val = max(1, n_val)
    if n_val >= len(records):
        raise DataError(f"--val-size {val_size} leaves no training records out of {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [records[i] for i in sorted(val_idx)]
    return train, val


# ---------------------------------------------------------------- tokenization
def build_example(prompt_ids, response_ids, eos_id, max_length, train_on_prompt=TRAIN_ON_PROMPT) -> dict | None:
    """input_ids = prompt + response + EOS, cut to max_length in the response; labels mask the prompt.

    Returns None when the prompt alone leaves no room for a response token.
    """
    room = max_length - len(prompt_ids)
    if room <= 0:
        return None
    fits = len(response_ids) + 1 <= room
    answer = list(response_ids) + [eos_id] if fits else list(response_ids[:room])
    input_ids = list(prompt_ids) + answer
    prompt_labels = list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return {"input_ids": input_ids, "labels": prompt_labels + answer, "prompt_length": len(prompt_ids),
            "truncated": not fits}


def tokenize_example(record: dict, tokenizer, template=TEMPLATE, max_length=MAX_LENGTH,
                     train_on_prompt=TRAIN_ON_PROMPT) -> dict | None:
    """Tokenize one record: prompt and response separately, so no merge crosses the boundary."""
    prompt_ids = encode_prompt(tokenizer, format_prompt(record, template))
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    return build_example(prompt_ids, response_ids, tokenizer.eos_token_id, max_length, train_on_prompt)


def _tokenize_batch(batch, tokenizer, template, max_length, train_on_prompt):
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    bos = bos_prefix(tokenizer)
    prompts = [bos + p for p in tokenizer([format_prompt(r, template) for r in rows],
                                          add_special_tokens=False)["input_ids"]]
    responses = tokenizer([r["output"] for r in rows], add_special_tokens=False)["input_ids"]
    out = {"input_ids": [], "labels": [], "length": [], "prompt_length": [], "truncated": []}
    for p, r in zip(prompts, responses):
        example = build_example(p, r, tokenizer.eos_token_id, max_length, train_on_prompt)
        example = example or {"input_ids": [], "labels": [], "prompt_length": len(p), "truncated": False}
        example["length"] = len(example["input_ids"])
        for key in out:
            out[key].append(example[key])
    return out


def tokenize_records(records: list, tokenizer, template=TEMPLATE, max_length=MAX_LENGTH,
                     train_on_prompt=TRAIN_ON_PROMPT, desc="Tokenizing"):
    """A datasets.Dataset of input_ids/labels/length, with too-long prompts removed (see .info)."""
    import datasets

    raw = datasets.Dataset.from_list(records)
    tokenized = raw.map(_tokenize_batch, batched=True, batch_size=1000, remove_columns=raw.column_names,
                        fn_kwargs=dict(tokenizer=tokenizer, template=template, max_length=max_length,
                                       train_on_prompt=train_on_prompt), desc=desc)
    return tokenized.filter(lambda lengths: [n > 0 for n in lengths], input_columns="length", batched=True,
                            desc="Dropping prompts longer than --max-length")


def prepare_datasets(source=DATASET, tokenizer=None, template=TEMPLATE, max_length=MAX_LENGTH, val_size=VAL_SIZE,
                     seed=SEED, train_on_prompt=TRAIN_ON_PROMPT, skip_invalid=SKIP_INVALID, loaded=None):
    """(DatasetDict with train/validation, report). Reuses a cached tokenization when nothing changed.

    `source` may also be a directory written by `--save`, which is loaded as it is. `loaded` takes
    the (records, report) of an earlier load_records(source), so the file isn't read twice. The
    report's "held_out" holds the validation records themselves, for train.py to keep with the run.
    """
    import datasets

    if tokencache.is_saved_dir(source):
        return tokencache.load_saved(source, tokenizer, template, max_length, train_on_prompt)
    records, report = loaded or load_records(source, skip_invalid)
    train, val = split_records(records, val_size, seed)
    cache = tokencache.cache_dir(records, tokenizer, template, max_length, train_on_prompt, val_size, seed)
    report.update(records=len(records), cache=cache, records_per_split={"train": len(train), "validation": len(val)},
                  held_out=val)
    if os.path.isfile(os.path.join(cache, "dataset_dict.json")):
        report["from_cache"] = True
        return datasets.load_from_disk(cache), report
    args = (tokenizer, template, max_length, train_on_prompt)
    dsd = datasets.DatasetDict(train=tokenize_records(train, *args, desc="Tokenizing train"),
                               validation=tokenize_records(val, *args, desc="Tokenizing validation"))
    report["from_cache"] = False
    tokencache.save(dsd, cache, tokenizer, template, max_length, train_on_prompt)
    return dsd, report


def held_out_records(run_dir: str, dataset: str = "") -> tuple[list[dict], dict]:
    """(validation records, run config) of a train.py run (or of a checkpoint-N in it; of an align.py run, its
    SFT model's).

    These are the exact records the run held out, saved by it as held_out.jsonl, whatever the data
    source was. With `dataset`, the split is instead rebuilt from that data with the run's seed and size.
    """
    path = rundir.run_file(run_dir, rundir.RUN_CONFIG_FILE)
    config = rundir.read_json(path)
    if config is None:
        raise DataError(f"{path} not found: train.py writes it; run `python train.py` first "
                        "(or pass --finetuned DIR)")
    if config.get("sft_model"):  # an align.py run: evaluated on its SFT model's held-out records (or split)
        return held_out_records(config["sft_model"], dataset)
    if dataset:
        records, _ = load_records(dataset, config.get("skip_invalid", False))
        return split_records(records, config["val_size"], config["seed"])[1], config
    held_out = rundir.run_file(run_dir, rundir.HELD_OUT_FILE)
    if not os.path.isfile(held_out):
        raise DataError(f"{held_out} not found: this run kept no held-out records; pass --dataset FILE to "
                        "rebuild its split from the data")
    records = rundir.read_records(held_out)
    if config.get("held_out_sha256") not in (None, rundir.records_sha256(records)):
        raise DataError(f"{held_out} was changed after training (its hash differs from {path})")
    return records, config


# ---------------------------------------------------------------- summary
def length_stats(dataset) -> dict:
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
        print(f"\n--- example {i} ({template} template), loss on the part after '|>>' ---")
        cut = example["prompt_length"]
        ids = example["input_ids"]
        print(tokenizer.decode(ids[:cut]) + "|>>" + tokenizer.decode(ids[cut:]))
    print(f"\nTokenized data {'reused from cache' if report.get('from_cache') else 'cached'}:"
          f" {report.get('saved_dir') or report.get('cache')}")


def val_size_problems(val_size) -> list[str]:
    """--val-size is a count >= 1 or a fraction in (0, 1)."""
    if isinstance(val_size, float) and not 0 < val_size < 1:
        return [f"--val-size as a fraction must be in (0, 1) (got {val_size})"]
    if isinstance(val_size, int) and val_size < 1:
        return [f"--val-size as a count must be >= 1 (got {val_size})"]
    return []


def validate_args(args) -> None:
    from tuning.cli import check_all

    problems = []
    if args.max_length < 2:
        problems.append(f"--max-length must be at least 2 (got {args.max_length})")
    check_all(problems + val_size_problems(args.val_size))


def main(args) -> None:
    start = time.perf_counter()
    from tuning.models.loading import load_tokenizer

    # Records first: a bad file is reported before any tokenizer download.
    loaded = None if tokencache.is_saved_dir(args.dataset) else load_records(args.dataset, args.skip_invalid)
    tokenizer = load_tokenizer(args.tokenizer, flag="--tokenizer")
    dsd, report = prepare_datasets(args.dataset, tokenizer, args.template, args.max_length, args.val_size,
                                   args.seed, args.train_on_prompt, args.skip_invalid, loaded)
    print_summary(dsd, report, args.template, args.max_length, tokenizer, args.dataset)
    if args.save:
        tokencache.save(dsd, args.save, tokenizer, args.template, args.max_length, args.train_on_prompt, report.get("held_out"))
        model_hint = "" if args.tokenizer == TOKENIZER else f" with a --model whose tokenizer is {args.tokenizer}"
        print(f"Saved tokenized DatasetDict to {args.save}. Use: python train.py --dataset {args.save}{model_hint};"
              " it reads the template, --max-length and --train-on-prompt from there.")
    print(f"Done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    import sys

    from tuning import cli

    parsed = cli.parse_or_exit(cli.build_parser(sys.modules[__name__]), validate_args)
    try:
        main(parsed)
    except UserError as error:
        cli.fail(str(error))
