"""Records: reading them from a Hub dataset id or a local .json/.jsonl(.gz) file, with errors that name the file,
the record (and line) and the field; what was left out; the deterministic train/validation split; a run's
held-out records; and the prompts inference.py answers. The SFT examples (sft.py) and the preference pairs
(preferences.py, through read_raw) both read their records here.

Data floor: imports cli and rundir."""

from __future__ import annotations

import gzip
import json
import os
import random
import re

from tuning import rundir
from tuning.cli import UserError

# "No input", "Noinput", "<no input>", "< noinput >", "<Noinput>." ... mean the record has no input.
_PLACEHOLDER_INPUT = re.compile(r"^<?\s*no\s*input\s*>?\s*\.?$", re.IGNORECASE)


class DataError(UserError):
    """A problem with the user's data, reported without a traceback."""


def a_kind(value: object) -> str:
    """The JSON kind of a value, with its article, for messages: "an int", "a list", "a NoneType"."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def is_placeholder_input(text: str) -> bool:
    return bool(_PLACEHOLDER_INPUT.match(text.strip()))


def _is_local(source: str) -> bool:
    return (os.path.exists(source) or source.endswith((".json", ".jsonl", ".jsonl.gz"))
            or source.startswith((".", "/", "~")))


def read_raw(source: str) -> list[tuple[str, object]]:
    """[(location, record)] from a local .json/.jsonl/.jsonl.gz file or a Hub dataset id."""
    if not _is_local(source):
        return _read_hub(source)
    path = os.path.expanduser(source)
    if not os.path.exists(path):
        raise DataError(f"{source}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{source}: is a directory; expected a .json or .jsonl file of records")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, EOFError) as err:  # a damaged or cut-short .gz
        raise DataError(f"{source}: could not be read ({type(err).__name__}: {err})") from None
    if path.endswith((".jsonl", ".jsonl.gz")):
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{source}: record {len(rows)} (line {line_no})"
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                rows.append((where, MalformedRow(f"malformed JSON: {err.msg} at column {err.colno}")))
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{source}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of records, found {a_kind(data)}")
    return [(f"{source}: record {i}", record) for i, record in enumerate(data)]


def _read_hub(name: str) -> list[tuple[str, object]]:
    """The train split of a Hub dataset; "ID:DATA_DIR" reads one of its folders (Anthropic/hh-rlhf:harmless-base)."""
    import datasets

    dataset_id, _, data_dir = name.partition(":")
    try:
        data = datasets.load_dataset(dataset_id, data_dir=data_dir or None, split="train")
    except Exception as err:  # network, auth, unknown id: all end the same way for the user
        raise DataError(
            f"could not load dataset {name!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Offline? Pass a local .json, .jsonl or .jsonl.gz file with --dataset (a dataset downloaded before "
            "loads offline with HF_HUB_OFFLINE=1)."
        ) from None
    return [(f"{name}: record {i}", record) for i, record in enumerate(data)]


class MalformedRow(str):
    """A JSONL line that did not parse; carries its error message."""


def _problem(record: object) -> str | None:
    """Why a record is invalid, or None."""
    if isinstance(record, MalformedRow):
        return str(record)
    if not isinstance(record, dict):
        return f"is {a_kind(record)}, not an object"
    for field in ("instruction", "output"):
        if field not in record or record[field] is None:
            return f"field '{field}' is missing"
        if not isinstance(record[field], str):
            return f"field '{field}' is {a_kind(record[field])}, not a string"
    if record.get("input") is not None and not isinstance(record["input"], str):
        return f"field 'input' is {a_kind(record['input'])}, not a string"
    return None


def load_records(source: str, skip_invalid: bool = False, rows: list | None = None,
                 other_fields: bool = False) -> tuple[list[dict], dict]:
    """Clean {instruction, input, output} records and a report of what was skipped or changed.

    Invalid records raise DataError (or are skipped with `skip_invalid`); records with an empty
    instruction or output are dropped; placeholder inputs such as "<noinput>" become "". `rows` takes an
    earlier read_raw(source). With `other_fields`, each record keeps its other fields too (what a reward function
    may read).
    """
    rows = read_raw(source) if rows is None else rows
    records, skipped, empty, empty_details, placeholders = [], [], [], [], 0
    for index, (where, record) in enumerate(rows):
        problem = _problem(record)
        if problem:
            if not skip_invalid:
                raise DataError(f"{where}: {problem} (use --skip-invalid to drop such records)")
            skipped.append(f"{where}: {problem}")
            continue
        text_input = record.get("input") or ""
        if is_placeholder_input(text_input) and text_input.strip():
            placeholders += 1
            text_input = ""
        blank = [field for field in ("instruction", "output") if not record[field].strip()]
        if blank:
            empty.append(index)
            empty_details.append(f"{where}: empty {' and '.join(repr(f) for f in blank)}")
            continue
        records.append({**(record if other_fields else {}), "instruction": record["instruction"], "input": text_input,
                        "output": record["output"]})
    if not records:
        problems = [p.removeprefix(f"{source}: ") for p in skipped + empty_details]
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        raise DataError(f"{source}: no usable records ({len(rows)} read, {len(skipped)} invalid, {len(empty)} empty"
                        f"{': ' + shown if shown else ''})")
    report = {"read": len(rows), "skipped": skipped, "empty_dropped": empty, "empty_details": empty_details,
              "placeholder_inputs": placeholders}
    return records, report


# Skipped records named in a training script's output (all of them go to its run_config.json).
SHOWN_SKIPPED = 5


def say_left_out(source: str, report: dict, too_long: int, why: str, what: str, say, empty: str = "") -> None:
    """One line of what was read from `source` and what was left out (malformed with --skip-invalid, `empty`, equal
    answers, too long), then the first SHOWN_SKIPPED malformed records; a training script says it at start."""
    empty_what = empty or ("an empty answer" if what == "pairs" else "an empty field")
    dropped = [f"{len(report['skipped'])} malformed (--skip-invalid)" if report["skipped"] else "",
               f"{len(report['empty_dropped'])} with {empty_what}" if report["empty_dropped"] else "",
               f"{len(report.get('equal_dropped', []))} with equal answers" if report.get("equal_dropped") else "",
               f"{too_long} {why}" if too_long else ""]
    dropped = [text for text in dropped if text]
    say(f"{what.capitalize()}: {report['read']} read from {source}; left out: {', '.join(dropped) or 'none'}")
    for problem in report["skipped"][:SHOWN_SKIPPED]:
        say(f"  skipped {problem}")


def left_out_report(report: dict, too_long: int) -> dict:
    """What run_config.json keeps of the data: counts read and left out, and every malformed record skipped."""
    return {"read": report["read"], "malformed": len(report["skipped"]), "empty": len(report["empty_dropped"]),
            "equal": len(report.get("equal_dropped", [])), "too_long": too_long, "skipped": report["skipped"]}


# ---------------------------------------------------------------- splits
def split_records(records: list, val_size: int | float = 0.02, seed: int = 42) -> tuple[list, list]:
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


def val_size_problems(val_size) -> list[str]:
    """--val-size is a count >= 1 or a fraction in (0, 1)."""
    if isinstance(val_size, float) and not 0 < val_size < 1:
        return [f"--val-size as a fraction must be in (0, 1) (got {val_size})"]
    if isinstance(val_size, int) and val_size < 1:
        return [f"--val-size as a count must be >= 1 (got {val_size})"]
    return []


def held_out_records(run_dir: str, dataset: str = "", load=None) -> tuple[list[dict], dict]:
    """(validation records, run config) of a train.py run (or of a checkpoint-N in it; of an align.py run, its
    SFT model's).

    These are the exact records the run held out, saved by it as held_out.jsonl, whatever the data
    source was. With `dataset`, the split is instead rebuilt from that data with the run's seed and size, read
    by `load(dataset, format, skip_invalid)` (conversations.load_training_records reads every format; by default
    Alpaca records only).
    """
    path = rundir.run_file(run_dir, rundir.RUN_CONFIG_FILE)
    config = rundir.read_json(path)
    if config is None:
        raise DataError(f"{path} not found: train.py writes it; run `python train.py` first "
                        "(or pass --finetuned DIR)")
    if config.get("sft_model"):  # an align.py run: evaluated on its SFT model's held-out records (or split)
        return held_out_records(config["sft_model"], dataset, load)
    if dataset:
        load = load or (lambda source, _, skip: load_records(source, skip))
        records, _ = load(dataset, config.get("format", "alpaca"), config.get("skip_invalid", False))
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


# ---------------------------------------------------------------- prompts to answer
def read_prompts(path: str) -> list[dict]:
    """Records {instruction, input[, output]} to answer, from .json/.jsonl records or a text file of instructions
    (inference.py --prompts-file)."""
    if not os.path.isfile(path):
        raise UserError(f"--prompts-file {path}: file not found")
    if not path.endswith((".json", ".jsonl")):
        with open(path, encoding="utf-8") as handle:
            prompts = [{"instruction": line.strip(), "input": ""} for line in handle if line.strip()]
        if not prompts:
            raise UserError(f"--prompts-file {path}: no prompts in it")
        return prompts
    records = []
    for where, record in read_raw(path):
        if isinstance(record, (dict, list)) and ("messages" in record or "conversations" in record
                                                 or isinstance(record, list)):
            raise UserError(f"--prompts-file {path}: holds conversations; use --messages-file {path}")
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise DataError(f"{where}: needs an 'instruction' string")
        if not isinstance(record.get("input") or "", str):
            raise DataError(f"{where}: field 'input' is not a string")
        records.append({k: record[k] for k in ("instruction", "input", "output") if record.get(k) is not None})
    if not records:
        raise UserError(f"--prompts-file {path}: no prompts in it")
    return records
