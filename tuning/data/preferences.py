"""Preference pairs (a prompt, a chosen and a rejected answer) from a Hub dataset id or a local .json,
.jsonl or .jsonl.gz file, with errors that name the file, the record (and line) and the field; and their
tokens, the prompt and each answer apart, every answer ending in EOS.

Three formats, detected per record:
    {"instruction", "input" (optional), "chosen", "rejected"}   Alpaca style: the prompt is formatted with
                                                                the SFT model's template (data/templates.py)
    {"prompt", "chosen", "rejected"}                            the prompt is used verbatim
    {"chosen", "rejected"}                                      whole Anthropic HH-RLHF dialogues: the prompt
                                                                is the shared text up to and including the
                                                                last "\\n\\nAssistant:", each answer what follows

Data floor: it imports records and templates.
"""

from __future__ import annotations

import os

from tuning.data.records import split_records
from tuning.data.records import DataError, MalformedRow, a_kind, is_placeholder_input, left_out_report, read_raw, say_left_out
from tuning.data.templates import Template, bos_prefix, encode_prompt, format_prompt

# The turn marker of Anthropic HH-RLHF dialogues; a dialogue's prompt ends with its last one.
HH_ASSISTANT = "\n\nAssistant:"
# The fields of a normalized pair; "prompt" is None for Alpaca style, "instruction" and "input" otherwise.
PAIR_FIELDS = ("instruction", "input", "prompt", "chosen", "rejected")
# How many problems a "no usable pairs" error quotes.
SHOWN = 3
# Pairs tokenized per chunk; sets of 4 chunks or more show a progress bar.
CHUNK = 5000


class MalformedPair(ValueError):
    """Why a record is not a preference pair; load_pairs adds the file, record and line."""


def _string_problem(record: dict, field: str, optional: bool = False) -> str | None:
    """Why record[field] is not a usable string, or None (a missing optional field is fine)."""
    value = record.get(field)
    if value is None:
        return None if optional else f"field '{field}' is missing"
    if not isinstance(value, str):
        return f"field '{field}' is {a_kind(value)}, not a string"
    return None


def split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of two whole HH-RLHF dialogues.

    The prompt is the text up to and including the last "\\n\\nAssistant:", and it must be the same in both;
    otherwise MalformedPair says what differs."""
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if HH_ASSISTANT not in text:
            raise MalformedPair(f"field '{field}' has no {HH_ASSISTANT!r} turn: expected a whole HH-RLHF "
                                "dialogue (or give the pair a 'prompt' or an 'instruction' field)")
    end_c, end_r = (text.rfind(HH_ASSISTANT) + len(HH_ASSISTANT) for text in (chosen, rejected))
    if chosen[:end_c] != rejected[:end_r]:
        turns_c, turns_r = chosen.count(HH_ASSISTANT), rejected.count(HH_ASSISTANT)
        if turns_c != turns_r:
            why = f"'chosen' has {turns_c} Assistant turn{'s' * (turns_c != 1)}, 'rejected' {turns_r}"
        else:
            why = f"they differ from character {len(os.path.commonprefix([chosen, rejected]))} on"
        raise MalformedPair(f"fields 'chosen' and 'rejected' do not share the dialogue up to their last "
                            f"{HH_ASSISTANT!r} ({why})")
    return chosen[:end_c], chosen[end_c:], rejected[end_r:]


def pair_format(record: dict) -> str:
    """'alpaca', 'prompt' or 'dialogue': which of the three formats a record is in."""
    if record.get("prompt") is not None:
        return "prompt"
    return "alpaca" if record.get("instruction") is not None else "dialogue"


def parse_pair(record: object) -> dict:
    """The normalized pair of one record: a dict with PAIR_FIELDS. A malformed record raises MalformedPair
    saying what is wrong with which field."""
    if isinstance(record, MalformedRow):  # a JSONL line that did not parse, with its error
        raise MalformedPair(str(record))
    if not isinstance(record, dict):
        raise MalformedPair(f"is {a_kind(record)}, not an object")
    form = pair_format(record)
    if form == "prompt" and record.get("instruction") is not None:
        raise MalformedPair("has both a 'prompt' and an 'instruction' field; give one of them")
    fields = {"alpaca": ["instruction", "chosen", "rejected"], "prompt": ["prompt", "chosen", "rejected"],
              "dialogue": ["chosen", "rejected"]}[form]
    problem = next(filter(None, (_string_problem(record, field) for field in fields)), None)
    problem = problem or (_string_problem(record, "input", optional=True) if form == "alpaca" else None)
    if problem:
        raise MalformedPair(problem)
    if form == "dialogue":
        prompt, chosen, rejected = split_dialogue(record["chosen"], record["rejected"])
        return {"instruction": None, "input": None, "prompt": prompt, "chosen": chosen, "rejected": rejected}
    if form == "prompt":
        return {"instruction": None, "input": None, "prompt": record["prompt"], "chosen": record["chosen"],
                "rejected": record["rejected"]}
    return {"instruction": record["instruction"], "input": record.get("input") or "", "prompt": None,
            "chosen": record["chosen"], "rejected": record["rejected"]}


def pair_prompt(pair: dict, template: str | Template) -> str:
    """The prompt text of a pair: the template's (the SFT model's) for Alpaca style, else the prompt verbatim."""
    return format_prompt(pair, template) if pair["prompt"] is None else pair["prompt"]


def load_pairs(source: str, skip_invalid: bool = False) -> tuple[list[dict], dict]:
    """Normalized pairs (see parse_pair) and a report of what was read, skipped and dropped.

    Malformed records raise DataError naming file, record (and line) and field, or are skipped with
    `skip_invalid`. Pairs with an empty instruction, prompt or answer are dropped, and so are pairs whose
    answers are equal (up to surrounding whitespace): they prefer nothing. Placeholder inputs such as
    "<noinput>" become "".
    """
    rows = read_raw(source)
    pairs, skipped, empty, empty_details, equal, equal_details = [], [], [], [], [], []
    formats, placeholders = {"alpaca": 0, "prompt": 0, "dialogue": 0}, 0
    for index, (where, record) in enumerate(rows):
        try:
            pair = parse_pair(record)
        except MalformedPair as err:
            if not skip_invalid:
                raise DataError(f"{where}: {err} (use --skip-invalid to drop such records)") from None
            skipped.append(f"{where}: {err}")
            continue
        if pair["input"] and is_placeholder_input(pair["input"]):
            placeholders += 1
            pair["input"] = ""
        blank = [field for field in ("instruction", "prompt", "chosen", "rejected")
                 if pair[field] is not None and not pair[field].strip()]
        if blank:
            empty.append(index)
            empty_details.append(f"{where}: empty {' and '.join(repr(f) for f in blank)}")
        elif pair["chosen"].strip() == pair["rejected"].strip():
            equal.append(index)
            equal_details.append(f"{where}: 'chosen' and 'rejected' are the same answer")
        else:
            formats[pair_format(record)] += 1
            pairs.append(pair)
    if not pairs:
        problems = [p.removeprefix(f"{source}: ") for p in skipped + empty_details + equal_details]
        shown = "; ".join(problems[:SHOWN]) + ("; ..." if len(problems) > SHOWN else "")
        raise DataError(f"{source}: no usable pairs ({len(rows)} read, {len(skipped)} invalid, {len(empty)} empty, "
                        f"{len(equal)} with equal answers{': ' + shown if shown else ''})")
    report = {"read": len(rows), "skipped": skipped, "empty_dropped": empty, "empty_details": empty_details,
              "equal_dropped": equal, "equal_details": equal_details, "formats": formats,
              "placeholder_inputs": placeholders}
    return pairs, report


# ---------------------------------------------------------------- tokenization
def build_pair(prompt_ids, chosen_ids, rejected_ids, eos_id, max_length) -> dict | None:
    """The token ids of a pair, each answer + EOS; None when prompt + the longer answer + EOS exceeds
    max_length (the answer that carries the score is never cut)."""
    chosen, rejected = list(chosen_ids) + [eos_id], list(rejected_ids) + [eos_id]
    if len(prompt_ids) + max(len(chosen), len(rejected)) > max_length:
        return None
    return {"prompt_ids": list(prompt_ids), "chosen_ids": chosen, "rejected_ids": rejected}


def tokenize_pair(pair: dict, tokenizer, template: str | Template, max_length: int) -> dict | None:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} of one pair, or None when it does not fit max_length.

    The prompt is encoded as in training and inference (encode_prompt: BOS where the tokenizer adds one),
    each answer apart from it without special tokens, so no merge crosses the boundary."""
    answers = tokenizer([pair["chosen"], pair["rejected"]], add_special_tokens=False)["input_ids"]
    prompt_ids = encode_prompt(tokenizer, pair_prompt(pair, template))
    return build_pair(prompt_ids, answers[0], answers[1], tokenizer.eos_token_id, max_length)


def tokenize_pairs(pairs: list[dict], tokenizer, template: str | Template, max_length: int) -> tuple[list, dict]:
    """(tokenized pairs, report): tokenize_pair over a list, batched. Pairs that do not fit are dropped and
    reported: "too_long_dropped" lists their positions in `pairs`, "fit_share" the share that fits."""
    from tqdm.auto import tqdm

    texts = ([pair_prompt(pair, template) for pair in pairs] + [pair["chosen"] for pair in pairs]
             + [pair["rejected"] for pair in pairs])
    ids = []
    with tqdm(total=len(pairs), desc="Tokenizing pairs", unit="pair", disable=len(pairs) < 4 * CHUNK) as bar:
        for start in range(0, len(texts), 3 * CHUNK):  # in chunks, for the progress bar on large sets
            ids += tokenizer(texts[start:start + 3 * CHUNK], add_special_tokens=False)["input_ids"]
            bar.update(min(CHUNK, len(pairs) - bar.n))
    n, bos = len(pairs), bos_prefix(tokenizer)  # bos + a prompt's ids = encode_prompt's, in one batch
    tokenized, too_long = [], []
    for position in range(n):
        built = build_pair(bos + ids[position], ids[n + position], ids[2 * n + position], tokenizer.eos_token_id,
                           max_length)
        if built is None:
            too_long.append(position)
        else:
            tokenized.append(built)
    report = {"pairs": len(pairs), "tokenized": len(tokenized), "too_long_dropped": too_long,
              "max_length": max_length, "fit_share": len(tokenized) / len(pairs) if pairs else 0.0}
    return tokenized, report


# ---------------------------------------------------------------- training sets
def prepare_pairs(source: str, skip_invalid: bool, val_size, seed: int, tokenizer, template, max_length: int,
                  say=print) -> tuple[dict, list[dict], dict]:
    """({"train", "validation"} tokenized pairs as Arrow Datasets, the held-out pairs as read, report): load,
    split, tokenize, and say what was left out. The report is what run_config.json keeps."""
    pairs, report = load_pairs(source, skip_invalid)
    train, held_out = split_records(pairs, val_size, seed)
    data, too_long = {}, 0
    for name, part in (("train", train), ("validation", held_out)):
        data[name], tokens = tokenize_pairs(part, tokenizer, template, max_length)
        too_long += len(tokens["too_long_dropped"])
    say_left_out(source, report, too_long, f"longer than --max-length {max_length}", "pairs", say)
    say(f"Data: {len(data['train'])} train / {len(data['validation'])} held-out pairs")
    return _as_datasets(data, source, "pairs"), held_out, left_out_report(report, too_long)


def load_prompts(source: str, skip_invalid: bool = False) -> tuple[list[dict], dict]:
    """Prompts for online RL, each {"instruction", "input", "prompt"} as in a normalized pair: the prompts of
    preference pairs (any of the three formats), or of instruction records such as train.py reads."""
    from tuning.data.records import load_records

    first = next((record for _, record in read_raw(source) if isinstance(record, dict)), {})
    if "chosen" in first or "rejected" in first:
        pairs, report = load_pairs(source, skip_invalid)
        return [{key: pair[key] for key in ("instruction", "input", "prompt")} for pair in pairs], report
    records, report = load_records(source, skip_invalid)
    return [{"instruction": r["instruction"], "input": r["input"], "prompt": None} for r in records], report


def prepare_prompts(source: str, skip_invalid: bool, val_size, seed: int, tokenizer, template, judge_template,
                    max_length: int, say=print) -> tuple[dict, list[dict], dict]:
    """({"train", "validation"} Datasets of {"prompt", "judge_prompt"}: each prompt formatted with the policy's
    and with the judging reward model's template), the held-out prompts as read, report. Prompts longer than
    max_length tokens are left out and counted."""
    prompts, report = load_prompts(source, skip_invalid)
    train, held_out = split_records(prompts, val_size, seed)
    data, too_long = {}, 0
    for name, part in (("train", train), ("validation", held_out)):
        texts = [pair_prompt(p, template) for p in part]
        lengths = [len(bos_prefix(tokenizer)) + len(ids) for ids in
                   tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
        data[name] = [{"prompt": text, "judge_prompt": pair_prompt(p, judge_template)}
                      for p, text, n in zip(part, texts, lengths) if n <= max_length]
        too_long += len(part) - len(data[name])
    say_left_out(source, report, too_long, f"longer than --max-length {max_length}", "records", say)
    say(f"Data: {len(data['train'])} train / {len(data['validation'])} held-out prompts")
    return _as_datasets(data, source, "prompts"), held_out, left_out_report(report, too_long)


def _as_datasets(data: dict, source: str, what: str) -> dict:
    """Arrow Datasets (compact, unlike lists of ints); a UserError when a split came out empty."""
    if not data["train"] or not data["validation"]:
        from tuning.cli import UserError

        raise UserError(f"{source}: too few {what} left to train and evaluate on (raise --max-length or "
                        "--val-size?)")
    from datasets import Dataset

    return {name: Dataset.from_list(part) for name, part in data.items()}


# ---------------------------------------------------------------- answers to score (reward.py --score)
def read_scoring_file(path: str) -> list[dict]:
    """Records to score from a .json/.jsonl(.gz) file: {"prompt" or "instruction" (+ "input"), "answer"}, or a
    preference pair in any of the formats above. Each comes back as a normalized pair (prompt,
    instruction, input) with "answers": [answer] or [chosen, rejected]."""
    items = []
    for where, record in read_raw(path):
        try:
            if isinstance(record, dict) and "answer" in record:
                if not isinstance(record["answer"], str):
                    raise MalformedPair("field 'answer' is not a string")
                if record.get("prompt") is None and record.get("instruction") is None:
                    raise MalformedPair("an 'answer' needs a 'prompt' or an 'instruction' field")
                pair = parse_pair({**record, "chosen": record["answer"], "rejected": record["answer"]})
                items.append({**pair, "answers": [record["answer"]]})
            else:
                pair = parse_pair(record)
                items.append({**pair, "answers": [pair["chosen"], pair["rejected"]]})
        except MalformedPair as err:
            raise DataError(f"{where}: {err}") from None
    if not items:
        raise DataError(f"{path}: no records to score")
    return items
