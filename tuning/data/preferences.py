"""Preference pairs (a prompt, a chosen and a rejected answer) from a Hub dataset id or a local .json,
.jsonl or .jsonl.gz file, with errors that name the file, the record (and line), the field and the turn; and
their tokens, the prompt and each answer apart, every answer closed as SFT closed it.

Formats, detected per record:
    {"instruction", "input" (optional), "chosen", "rejected"}   Alpaca style: the prompt is formatted with
                                                                the SFT model's template (data/templates.py)
    {"prompt": str, "chosen": str, "rejected": str}             the prompt is used verbatim
    {"prompt": [turns], "chosen": [turn], "rejected": [turn]}   TRL's conversational pairs: {role, content}
    {"chosen": [turns], "rejected": [turns]}                    turns; whole conversations share all but the last
    {"chosen": str, "rejected": str}                            whole Anthropic HH-RLHF dialogues, read as turns
                                                                ("\n\nHuman:", "\n\nAssistant:") the same way

A conversation's prompt is its turns up to the user turn the answers reply to, rendered with the SFT model's
chat template (chat_template.py), as SFT rendered it; the answers are the next assistant turn, each closed by
the template's end-of-turn. So a multi-turn pair is scored, and tuned, in the context it was written in.

Data floor: it imports records, templates, conversations and chat_template.
"""

from __future__ import annotations

import json

from tuning.data.chat_template import encode_answers, encode_prompts, prompt_of, render_prompts
from tuning.data.chat_template import is_ours, saved_or_ours
from tuning.data.conversations import ROLES, MalformedConversation, check_turns, dialogue_turns, read_turns, tidy
from tuning.data.records import DataError, MalformedRow, a_kind, is_placeholder_input, left_out_report, read_raw
from tuning.data.records import say_left_out, split_records
from tuning.data.templates import Template

# The fields of a normalized pair: "instruction" and "input" (Alpaca style), "prompt" (a text used verbatim) or
# "messages" (a conversation's turns up to the user turn the answers reply to); the others are None.
PAIR_FIELDS = ("instruction", "input", "prompt", "messages", "chosen", "rejected")
# What an online RL prompt is asked by (load_prompts), as in a pair.
PROMPT_FIELDS = ("instruction", "input", "prompt", "messages")
# A prompt-only record's reference answer (for a verifiable reward): the first of these fields that it has.
REFERENCE_FIELDS = ("reference", "solution", "answer")
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


def _shared_turns(chosen: list[dict], rejected: list[dict], what: str) -> list[dict]:
    """The turns two whole conversations share before their last (assistant) turn; MalformedPair when either
    does not end with an assistant turn, or they differ before it."""
    for field, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1]["role"] != "assistant":
            raise MalformedPair(f"field '{field}' does not end with an {what} turn: expected a whole dialogue "
                                "(or give the pair a 'prompt' or an 'instruction' field)")
    if chosen[:-1] != rejected[:-1]:
        count_c, count_r = (sum(turn["role"] == "assistant" for turn in turns) for turns in (chosen, rejected))
        if count_c != count_r:
            why = f"'chosen' has {count_c} {what} turn{'s' * (count_c != 1)}, 'rejected' {count_r}"
        else:
            turn = next(n for n, (a, b) in enumerate(zip(chosen, rejected), start=1) if a != b)
            why = f"they differ at turn {turn}"
        raise MalformedPair(f"fields 'chosen' and 'rejected' do not share the dialogue up to their last {what} turn "
                            f"({why})")
    return chosen[:-1]


def _checked(read, *args) -> list[dict]:
    """conversations' turn reading and checks, their MalformedConversation said as a MalformedPair."""
    try:
        return read(*args)
    except MalformedConversation as err:
        raise MalformedPair(str(err)) from None


def _prompt_turns(turns: list[dict], where: str) -> list[dict]:
    """A pair's prompt turns, checked: an optional system turn, then user and assistant by turns, ending with the
    user's (the turn the answers reply to). `where` names them in an error."""
    try:
        check_turns(turns, complete=False)
    except MalformedConversation as err:
        raise MalformedPair(f"{where}: {err}") from None
    if turns[-1]["role"] != "user":
        raise MalformedPair(f"{where} ends with an {turns[-1]['role']} turn; the answers reply to a user turn")
    return turns


def split_dialogue(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """(prompt turns, chosen answer, rejected answer) of two whole HH-RLHF dialogues ("\n\nHuman: ...\n\nAssistant:
    ..."): the turns up to their last Assistant turn, which must be the same in both, and that turn of each."""
    turns = [_checked(dialogue_turns, text, field) for field, text in (("chosen", chosen), ("rejected", rejected))]
    prompt = _shared_turns(*turns, "Assistant")
    return _prompt_turns(prompt, "the dialogue before the answers"), turns[0][-1]["content"], turns[1][-1]["content"]


def _messages(record: dict, field: str) -> list[dict]:
    """record[field]'s {role, content} turns, assistant turns tidied as SFT tidies them (conversations.tidy)."""
    return tidy(_checked(read_turns, record, field, "role", "content", {role: role for role in ROLES}))


def split_conversations(record: dict) -> tuple[list[dict], str, str]:
    """(prompt turns, chosen answer, rejected answer) of a pair in TRL's conversational format: {"prompt": turns,
    "chosen": [assistant turn], "rejected": [assistant turn]}, or whole conversations {"chosen": turns,
    "rejected": turns} that share all but their last assistant turn."""
    if record.get("prompt") is not None:
        answers = []
        for field in ("chosen", "rejected"):
            turns = _messages(record, field)
            if len(turns) != 1 or turns[0]["role"] != "assistant":
                raise MalformedPair(f"field '{field}' must hold one assistant turn, the answer to 'prompt' (it has "
                                    f"{', '.join(turn['role'] for turn in turns) or 'none'})")
            answers.append(turns[0]["content"])
        return _prompt_turns(_messages(record, "prompt"), "field 'prompt'"), *answers
    prompt = _shared_turns(_messages(record, "chosen"), _messages(record, "rejected"), "assistant")
    return (_prompt_turns(prompt, "the conversation before the answers"), record["chosen"][-1]["content"],
            record["rejected"][-1]["content"])


def pair_format(record: dict) -> str:
    """'alpaca', 'prompt', 'conversation' or 'dialogue': which of the formats a record is in."""
    if any(isinstance(record.get(field), list) for field in ("prompt", "chosen", "rejected")):
        return "conversation"
    if record.get("prompt") is not None:
        return "prompt"
    return "alpaca" if record.get("instruction") is not None else "dialogue"


def parse_pair(record: object) -> dict:
    """The normalized pair of one record: a dict with PAIR_FIELDS, and "label" where the record has one (a soft
    label, P(chosen is better), as constitution.py writes it). A malformed record raises MalformedPair saying
    what is wrong with which field (and turn)."""
    pair = _parse_pair(record)
    if record.get("label") is not None:  # checked only where it is used (reward.py --soft-labels)
        pair["label"] = record["label"]
    return pair


def label_problem(label: object) -> str | None:
    """Why a pair's 'label' is not a soft label (a probability in [0, 1]), or None."""
    if label is None:
        return "has no 'label' field (constitution.py --stage label writes one)"
    if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0 <= label <= 1:
        return f"has a 'label' of {label!r}, not a probability in [0, 1]"
    return None


def _parse_pair(record: object) -> dict:
    if isinstance(record, MalformedRow):  # a JSONL line that did not parse, with its error
        raise MalformedPair(str(record))
    if not isinstance(record, dict):
        raise MalformedPair(f"is {a_kind(record)}, not an object")
    form = pair_format(record)
    if form in ("prompt", "conversation") and record.get("instruction") is not None:
        raise MalformedPair("has both a 'prompt' (or message lists) and an 'instruction' field; give one of them")
    if form == "conversation":
        messages, chosen, rejected = split_conversations(record)
        return {"instruction": None, "input": None, "prompt": None, "messages": messages,
                "chosen": chosen.lstrip(), "rejected": rejected.lstrip()}
    fields = {"alpaca": ["instruction", "chosen", "rejected"], "prompt": ["prompt", "chosen", "rejected"],
              "dialogue": ["chosen", "rejected"]}[form]
    problem = next(filter(None, (_string_problem(record, field) for field in fields)), None)
    problem = problem or (_string_problem(record, "input", optional=True) if form == "alpaca" else None)
    if problem:
        raise MalformedPair(problem)
    if form == "dialogue":
        messages, chosen, rejected = split_dialogue(record["chosen"], record["rejected"])
        return {"instruction": None, "input": None, "prompt": None, "messages": messages, "chosen": chosen,
                "rejected": rejected}
    if form == "prompt":
        return {"instruction": None, "input": None, "prompt": record["prompt"], "messages": None,
                "chosen": record["chosen"], "rejected": record["rejected"]}
    return {"instruction": record["instruction"], "input": record.get("input") or "", "prompt": None,
            "messages": None, "chosen": record["chosen"], "rejected": record["rejected"]}


def pair_prompt(pair: dict, template: str | Template, chat_template: str | None = None, tokenizer=None):
    """What the model is asked in a pair: its conversation (a list of turns, rendered with the chat template), its
    prompt verbatim, or, for Alpaca style, the prompt template's text (chat_template.prompt_of: a user turn for a
    model trained with a tokenizer's own chat template)."""
    if pair.get("messages") is not None:
        return pair["messages"]
    if pair["prompt"] is not None:
        return pair["prompt"]
    return prompt_of(pair, template, chat_template, tokenizer)


def load_pairs(source: str, skip_invalid: bool = False) -> tuple[list[dict], dict]:
    """Normalized pairs (see parse_pair) and a report of what was read, skipped and dropped.

    Malformed records raise DataError naming file, record (and line) and field, or are skipped with
    `skip_invalid`. Pairs with an empty instruction, prompt or answer are dropped, and so are pairs whose
    answers are equal (up to surrounding whitespace): they prefer nothing. Placeholder inputs such as
    "<noinput>" become "".
    """
    rows = read_raw(source)
    pairs, skipped, empty, empty_details, equal, equal_details = [], [], [], [], [], []
    formats, placeholders = {"alpaca": 0, "prompt": 0, "conversation": 0, "dialogue": 0}, 0
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


def prompt_text(pair: dict, template: str | Template, tokenizer) -> str:
    """A pair's prompt as one text (a conversation rendered with the tokenizer's chat template, else ours): for
    trainers that take text, as TRL's own do in the benchmarks."""
    chat_template = saved_or_ours(tokenizer, template)
    prompt = pair_prompt(pair, template, chat_template, tokenizer)
    return render_prompts(tokenizer, [prompt], chat_template)[0] if isinstance(prompt, list) else prompt


# ---------------------------------------------------------------- tokenization
def build_pair(prompt_ids, chosen_ids, rejected_ids, end_ids, max_length) -> dict | None:
    """The token ids of a pair, each answer closed by `end_ids` (EOS; nothing for answers that carry their end);
    None when prompt + the longer answer + its end exceeds max_length (the answer that carries the score is never
    cut)."""
    chosen, rejected = list(chosen_ids) + list(end_ids), list(rejected_ids) + list(end_ids)
    if len(prompt_ids) + max(len(chosen), len(rejected)) > max_length:
        return None
    return {"prompt_ids": list(prompt_ids), "chosen_ids": chosen, "rejected_ids": rejected}


def pair_chat_template(tokenizer, template: str | Template, chat_template: str | None = None) -> str:
    """The chat template a pair's conversation is rendered with: the given one, else the tokenizer's saved one (the
    SFT model's), else ours for `template`."""
    return chat_template or saved_or_ours(tokenizer, template)


def foreign(chat_template: str, tokenizer) -> str | None:
    """`chat_template` where it is a tokenizer's own, else None: what pair_prompt needs to know to ask an Alpaca
    pair as a user turn (decided once per set, not per pair)."""
    return None if is_ours(chat_template, tokenizer) else chat_template


def tokenize_pair(pair: dict, tokenizer, template: str | Template, max_length: int,
                  chat_template: str | None = None) -> dict | None:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} of one pair (tokenize_pairs says how), or None when it does not
    fit max_length."""
    tokenized, _ = tokenize_pairs([pair], tokenizer, template, max_length, chat_template)
    return tokenized[0] if tokenized else None


def tokenize_pairs(pairs: list[dict], tokenizer, template: str | Template, max_length: int,
                   chat_template: str | None = None) -> tuple[list, dict]:
    """(tokenized pairs, report): each pair's {"prompt_ids", "chosen_ids", "rejected_ids"}, batched. Pairs that do
    not fit max_length are dropped and reported: "too_long_dropped" lists their positions in `pairs`,
    "fit_share" the share that fits.

    Each is tokenized as SFT tokenized its kind. A text prompt is encoded as in training and inference
    (encode_prompt: BOS where the tokenizer adds one), and each answer apart from it, without special tokens
    (no merge crosses the boundary), + EOS. A conversation is rendered with the chat template: the prompt as
    its next assistant turn's (chat_prompt_ids), each answer as that turn, ending with the template's
    end-of-turn, exactly the ids SFT trains on for the dialogue that ends with it (encode_answers)."""
    from tqdm.auto import tqdm

    chat_template = pair_chat_template(tokenizer, template, chat_template)
    prompts = [pair_prompt(pair, template, foreign(chat_template, tokenizer), tokenizer) for pair in pairs]
    tokenized, too_long = [], []
    with tqdm(total=len(pairs), desc="Tokenizing pairs", unit="pair", disable=len(pairs) < 4 * CHUNK) as bar:
        for start in range(0, len(pairs), CHUNK):  # in chunks, for the progress bar on large sets
            part, asked = pairs[start:start + CHUNK], prompts[start:start + CHUNK]
            talks = [i for i, prompt in enumerate(asked) if isinstance(prompt, list)]
            texts = [i for i, prompt in enumerate(asked) if not isinstance(prompt, list)]
            prompt_ids = encode_prompts(tokenizer, asked, chat_template)
            answers = {}
            if texts:
                ids = tokenizer([part[i][key] for key in ("chosen", "rejected") for i in texts],
                                add_special_tokens=False)["input_ids"]
                for n, i in enumerate(texts):
                    answers[i] = (ids[n] + [tokenizer.eos_token_id], ids[len(texts) + n] + [tokenizer.eos_token_id])
            if talks:
                ids = encode_answers(tokenizer, [asked[i] for i in talks] * 2,
                                     [part[i][key] for key in ("chosen", "rejected") for i in talks], chat_template,
                                     [prompt_ids[i] for i in talks] * 2)  # (rendered and tokenized once)
                for n, i in enumerate(talks):
                    answers[i] = (ids[n], ids[len(talks) + n])
            for offset, ids in enumerate(prompt_ids):
                built = build_pair(ids, *answers[offset], (), max_length)
                if built is None:
                    too_long.append(start + offset)
                else:
                    tokenized.append(built)
            bar.update(len(part))
    report = {"pairs": len(pairs), "tokenized": len(tokenized), "too_long_dropped": too_long,
              "max_length": max_length, "fit_share": len(tokenized) / len(pairs) if pairs else 0.0}
    return tokenized, report


# ---------------------------------------------------------------- training sets
def prepare_pairs(source: str, skip_invalid: bool, val_size, seed: int, tokenizer, template, max_length: int,
                  say=print, targets: bool = False) -> tuple[dict, list[dict], dict]:
    """({"train", "validation"} tokenized pairs as Arrow Datasets, the held-out pairs as read, report): load,
    split, tokenize, and say what was left out. The report is what run_config.json keeps. With `targets`, each
    tokenized pair also carries its soft label as "target" (every pair must have a "label")."""
    pairs, report = load_pairs(source, skip_invalid)
    if targets:
        wrong = [(i, problem) for i, pair in enumerate(pairs) if (problem := label_problem(pair.get("label")))]
        if wrong:
            raise DataError(f"{source}: --soft-labels needs a probability in each pair's 'label' field; {len(wrong)} "
                            f"of {len(pairs)} usable pairs do not: usable pair {wrong[0][0]} {wrong[0][1]}")
    train, held_out = split_records(pairs, val_size, seed)
    data, too_long = {}, 0
    for name, part in (("train", train), ("validation", held_out)):
        data[name], tokens = tokenize_pairs(part, tokenizer, template, max_length)
        if targets:
            dropped = set(tokens["too_long_dropped"])
            kept = [pair for i, pair in enumerate(part) if i not in dropped]
            data[name] = [{**example, "target": float(pair["label"])} for example, pair in zip(data[name], kept)]
        too_long += len(tokens["too_long_dropped"])
    say_left_out(source, report, too_long, f"longer than --max-length {max_length}", "pairs", say)
    say(f"Data: {len(data['train'])} train / {len(data['validation'])} held-out pairs")
    return _as_datasets(data, source, "pairs"), held_out, {**left_out_report(report, too_long),
                                                           "formats": report["formats"]}


def load_prompts(source: str, skip_invalid: bool = False, rows: list | None = None) -> tuple[list[dict], dict]:
    """Prompts for online RL, each {"instruction", "input", "prompt", "messages"} as in a normalized pair: the
    prompts of preference pairs (any format), the instructions of Alpaca records (an 'output' is not needed), or
    the conversations train.py reads (messages, ShareGPT) up to their last user turn: the model answers that turn.
    Each also has its "reference" answer, for a verifiable reward (a pair's chosen answer, a record's 'output', a
    conversation's last assistant turn, a prompt-only record's REFERENCE_FIELDS; None where there is none), and its
    "columns": the record's fields, which a user's reward function receives. `rows` takes an earlier
    read_raw(source)."""
    from tuning.data.conversations import detect_format, load_conversations
    from tuning.data.records import load_records

    rows = read_raw(source) if rows is None else rows
    first = next((record for _, record in rows if isinstance(record, dict)), {})
    if "chosen" in first or "rejected" in first:
        pairs, report = load_pairs(source, skip_invalid)
        return [{**{key: pair[key] for key in PROMPT_FIELDS}, "reference": pair["chosen"], "columns": pair}
                for pair in pairs], report
    if "prompt" in first:  # TRL's prompt-only records: {"prompt": text or turns}
        return _prompt_only(source, rows, skip_invalid)
    if detect_format(rows) in ("messages", "sharegpt"):
        talks, report = load_conversations(source, skip_invalid=skip_invalid, rows=rows)
        return [{"instruction": None, "input": None, "prompt": None, "messages": talk["messages"][:-1],
                 "reference": talk["messages"][-1]["content"], "columns": talk} for talk in talks], report
    unchecked = "instruction" in first and "output" not in first  # instructions alone: no answer to check against
    if unchecked:
        rows = [(where, {**record, "output": "-"}) if isinstance(record, dict) and "output" not in record
                else (where, record) for where, record in rows]
    records, report = load_records(source, skip_invalid, rows=rows, other_fields=True)
    return [{"instruction": r["instruction"], "input": r["input"], "prompt": None, "messages": None,
             "reference": None if unchecked else r["output"],
             "columns": {key: value for key, value in r.items() if not (unchecked and key == "output")}}
            for r in records], report


def _reference_field(record: dict) -> str | None:
    """A prompt-only record's reference answer: its first REFERENCE_FIELDS field that is a non-empty string or a
    number (as text: a math set's `"answer": 4`)."""
    for field in REFERENCE_FIELDS:
        value = record.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _prompt_only(source: str, rows: list, skip_invalid: bool) -> tuple[list[dict], dict]:
    """Prompts from TRL's prompt-only records, {"prompt": a text, used verbatim, or a list of turns ending with the
    user's}, with the same errors, skipping and report as load_pairs."""
    prompts, skipped, empty, empty_details = [], [], [], []
    for index, (where, record) in enumerate(rows):
        try:
            if isinstance(record, MalformedRow):  # a JSONL line that did not parse, with its error
                raise MalformedPair(str(record))
            if not isinstance(record, dict):
                raise MalformedPair(f"is {a_kind(record)}, not an object")
            if isinstance(record.get("prompt"), list):
                turns = _prompt_turns(_messages(record, "prompt"), "field 'prompt'")
                prompts.append({"instruction": None, "input": None, "prompt": None, "messages": turns,
                                "reference": _reference_field(record), "columns": record})
                continue
            problem = _string_problem(record, "prompt")
            if problem:
                raise MalformedPair(problem)
        except MalformedPair as err:
            if not skip_invalid:
                raise DataError(f"{where}: {err} (use --skip-invalid to drop such records)") from None
            skipped.append(f"{where}: {err}")
            continue
        if not record["prompt"].strip():
            empty.append(index)
            empty_details.append(f"{where}: empty 'prompt'")
            continue
        prompts.append({"instruction": None, "input": None, "prompt": record["prompt"], "messages": None,
                        "reference": _reference_field(record), "columns": record})
    if not prompts:
        raise DataError(f"{source}: no usable prompts ({len(rows)} read, {len(skipped)} invalid, {len(empty)} empty)")
    return prompts, {"read": len(rows), "skipped": skipped, "empty_dropped": empty, "empty_details": empty_details,
                     "placeholder_inputs": 0}


def prepare_prompts(source: str, skip_invalid: bool, val_size, seed: int, tokenizer, template, judge_tokenizer,
                    judge_template, max_length: int, say=print) -> tuple[dict, list[dict], dict]:
    """({"train", "validation"} Datasets of {"prompt", "judge_prompt", "reference", "record"}: what the policy is
    asked, in its template or chat template (pair_prompt), what the judging reward model reads, in its own, the
    reference answer (None where the record has none) and the record's fields as JSON (for a user's reward
    function), the held-out prompts as read, report. Prompts longer than max_length tokens are left out and
    counted."""
    prompts, report = load_prompts(source, skip_invalid)
    train, held_out = split_records(prompts, val_size, seed)
    chat_template = pair_chat_template(tokenizer, template)
    judge_chat_template = pair_chat_template(judge_tokenizer, judge_template)
    data, too_long = {}, 0
    policy_foreign, judge_foreign = foreign(chat_template, tokenizer), foreign(judge_chat_template, judge_tokenizer)
    for name, part in (("train", train), ("validation", held_out)):
        asked = [pair_prompt(p, template, policy_foreign, tokenizer) for p in part]
        lengths = map(len, encode_prompts(tokenizer, asked, chat_template))
        data[name] = [{"prompt": prompt, "judge_prompt": pair_prompt(p, judge_template, judge_foreign,
                                                                     judge_tokenizer),
                       "reference": p["reference"],
                       "record": json.dumps(p["columns"], ensure_ascii=False, default=str)}  # (a date: its text)
                      for p, prompt, n in zip(part, asked, lengths) if n <= max_length]
        too_long += len(part) - len(data[name])
    if any(len({type(row[column]) for part in data.values() for row in part}) > 1 for column in ("prompt",
                                                                                                 "judge_prompt")):
        raise DataError(f"{source}: mixes conversations and text prompts; give online RL one kind")
    say_left_out(source, report, too_long, f"longer than --max-length {max_length}", "records", say)
    say(f"Data: {len(data['train'])} train / {len(data['validation'])} held-out prompts")
    held_out = [{key: value for key, value in p.items() if key != "columns"} for p in held_out]  # ("record" has them)
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
    """Records to score from a .json/.jsonl(.gz) file: {"prompt" (a text or a list of turns) or "instruction"
    (+ "input"), "answer"}; a conversation {"messages": turns} whose last assistant turn is the answer; or a
    preference pair in any of the formats above. Each comes back as a normalized pair (prompt, messages,
    instruction, input) with "answers": [answer] or [chosen, rejected]."""
    items = []
    for where, record in read_raw(path):
        try:
            if isinstance(record, dict) and "messages" in record and "chosen" not in record:
                if "answer" in record:
                    raise MalformedPair("has both 'messages' and 'answer': the answer to score is the last turn of "
                                        "'messages'; give a 'prompt' of turns with an 'answer' instead")
                turns = _messages(record, "messages")
                if not turns or turns[-1]["role"] != "assistant":
                    raise MalformedPair("field 'messages' must end with the assistant turn to score")
                _prompt_turns(turns[:-1], "field 'messages', before its last turn")
                record = {"prompt": turns[:-1], "answer": turns[-1]["content"]}
            if isinstance(record, dict) and "answer" in record:
                if not isinstance(record["answer"], str):
                    raise MalformedPair("field 'answer' is not a string")
                if record.get("prompt") is None and record.get("instruction") is None:
                    raise MalformedPair("an 'answer' needs a 'prompt', 'messages' or 'instruction' field")
                answer = ([{"role": "assistant", "content": record["answer"]}] if isinstance(record["prompt"], list)
                          else record["answer"]) if record.get("prompt") is not None else record["answer"]
                pair = parse_pair({**record, "chosen": answer, "rejected": answer})
                items.append({**pair, "answers": [pair["chosen"]]})
            else:
                pair = parse_pair(record)
                items.append({**pair, "answers": [pair["chosen"], pair["rejected"]]})
        except MalformedPair as err:
            raise DataError(f"{where}: {err}") from None
    if not items:
        raise DataError(f"{path}: no records to score")
    return items
