"""Preference pairs (a prompt, a chosen and a rejected answer) from a Hub dataset id or a local .json,
.jsonl or .jsonl.gz file, with errors that name the file, the record (and line) and the field; and their
tokens, the prompt and each answer apart, every answer ending in EOS.

Three formats, detected per record:
    {"instruction", "input" (optional), "chosen", "rejected"}   Alpaca style: the prompt is formatted with
                                                                the SFT model's template (templates.py)
    {"prompt", "chosen", "rejected"}                            the prompt is used verbatim
    {"chosen", "rejected"}                                      whole Anthropic HH-RLHF dialogues: the prompt
                                                                is the shared text up to and including the
                                                                last "\\n\\nAssistant:", each answer what follows

Ground floor for the reward model: it imports records, templates and datasetup's split, and none of the
training scripts.
"""

from __future__ import annotations

import os

from datasetup import split_records  # noqa: F401  (the pairs' train/validation split: part of this API)
from records import DataError, MalformedRow, is_placeholder_input, read_raw
from templates import Template, bos_prefix, encode_prompt, format_prompt

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
        return f"field '{field}' is a {type(value).__name__}, not a string"
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
        raise MalformedPair(f"is a {type(record).__name__}, not an object")
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
