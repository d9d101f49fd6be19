"""Conversations: chat records as users bring them, read into one shape, a list of {role, content} turns,
with errors that name the file, the record (and line), the turn and the field.

    records, report = load_conversations("chat.jsonl")   # [{"messages": [{"role": "user", "content": ...}, ...]}]

Formats, detected per file from its first record (FORMAT = "auto"), or named:
    messages  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}  (TRL, most Hub sets)
    sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
    hh        {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", ...}: an HH-RLHF dialogue's chosen side
    alpaca    {"instruction", "input", "output"}: not a conversation; records.load_records reads it as today

A conversation is an optional system turn, then user and assistant turns by turns, ending with the
assistant's: every assistant turn is an answer to learn (chat_template.py marks them).

Data floor: imports cli and records.
"""

from __future__ import annotations

import os
import re

from tuning.cli import UserError
from tuning.data.records import DataError, MalformedRow, a_kind, read_raw

FORMAT = "auto"  # the default: detect each file's format from its first record
FORMATS = ("auto", "alpaca", "messages", "sharegpt", "hh")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}  # ShareGPT's "from" -> our role
# The turn markers of Anthropic HH-RLHF dialogues.
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
# How many problems a "no usable conversations" error quotes.
SHOWN = 3


class MalformedConversation(ValueError):
    """Why a record is not a conversation; load_conversations adds the file, record and line."""


def detect_format(rows: list) -> str:
    """The format of a file's records, from the first record that is an object: "messages", "sharegpt", "hh" or
    "alpaca"; a DataError when none fits."""
    first = next((record for _, record in rows if isinstance(record, dict)), None)
    if first is None:
        return "alpaca"  # nothing to tell from: records.load_records says what is wrong with them
    for field, form in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"),
                        ("chosen", "hh")):
        if field in first:
            return form
    where = next(where for where, record in rows if record is first)
    raise DataError(f"{where}: can't tell the data format from its fields ({', '.join(map(repr, first)) or 'none'}); "
                    "expected 'messages', 'conversations', 'instruction' or 'chosen' (or set --format)")


def check_turns(turns: list[dict], complete: bool = True) -> None:
    """The order of normalized turns: an optional system turn first, then user and assistant by turns, starting
    with the user and (when `complete`) ending with the assistant; MalformedConversation names the turn
    (numbered from 1)."""
    if not turns:
        raise MalformedConversation("has no turns")
    for number, turn in enumerate(turns, start=1):
        if not turn["content"].strip():
            raise MalformedConversation(f"turn {number} ({turn['role']}): its content is empty")
        if turn["role"] == "system" and number > 1:
            raise MalformedConversation(f"turn {number}: a system turn can only come first")
    dialogue = turns[1:] if turns[0]["role"] == "system" else turns
    offset = len(turns) - len(dialogue)
    for number, turn in enumerate(dialogue, start=1 + offset):
        expected = "user" if (number - offset) % 2 else "assistant"
        if turn["role"] != expected:
            previous = turns[number - 2]["role"] if number > 1 else None
            why = (f"turns {number - 1} and {number} are both from the {turn['role']}" if previous == turn["role"]
                   else f"turn {number} is from the {turn['role']}; the dialogue starts with a user turn")
            raise MalformedConversation(why)
    if not dialogue:
        raise MalformedConversation("has only a system turn: no user turn to answer")
    if complete and dialogue[-1]["role"] != "assistant":
        raise MalformedConversation(f"ends with a {turns[-1]['role']} turn (turn {len(turns)}), not an assistant's: "
                                    "nothing to learn after it")


def read_turns(record: dict, field: str, role_key: str, content_key: str, roles: dict) -> list[dict]:
    """The normalized turns of record[field], a list of {role_key, content_key} objects."""
    value = record.get(field)
    if value is None:
        raise MalformedConversation(f"field '{field}' is missing")
    if not isinstance(value, list):
        raise MalformedConversation(f"field '{field}' is {a_kind(value)}, not a list of turns")
    turns = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise MalformedConversation(f"turn {number} of '{field}' is {a_kind(turn)}, not an object")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in roles:
            raise MalformedConversation(f"turn {number} of '{field}': field '{role_key}' is {role!r}; expected "
                                        f"{', '.join(map(repr, roles))}")
        if not isinstance(content, str):
            raise MalformedConversation(f"turn {number} of '{field}': field '{content_key}' is "
                                        f"{'missing' if content is None else a_kind(content) + ', not a string'}")
        turns.append({"role": roles[role], "content": content})
    return turns


def tidy(turns: list[dict]) -> list[dict]:
    """Assistant turns without leading whitespace: a newline or spaces there would merge with the template's
    newline before the answer into one token, trained as the answer's though half of it is the prompt's, and
    absent from the prompt at inference."""
    return [{**turn, "content": turn["content"].lstrip()} if turn["role"] == "assistant" else turn for turn in turns]


def dialogue_turns(text: str, field: str = "chosen") -> list[dict]:
    """The turns of one HH-RLHF dialogue text ("\\n\\nHuman: ...\\n\\nAssistant: ..."), each content stripped."""
    if not isinstance(text, str):
        raise MalformedConversation(f"field '{field}' is {'missing' if text is None else a_kind(text)}, "
                                    "not a dialogue string")
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise MalformedConversation(f"field '{field}' does not start with a '\\n\\nHuman:' turn")
    return [{"role": HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def parse_conversation(record: object, form: str, complete: bool = True) -> list[dict]:
    """The checked turns of one record in format `form` (ending with the assistant's, when `complete`);
    MalformedConversation says what is wrong where."""
    if isinstance(record, MalformedRow):
        raise MalformedConversation(str(record))
    if not isinstance(record, dict):
        raise MalformedConversation(f"is {a_kind(record)}, not an object")
    if form == "messages":
        turns = read_turns(record, "messages", "role", "content", {role: role for role in ROLES})
    elif form == "sharegpt":
        turns = read_turns(record, "conversations", "from", "value", SHAREGPT_ROLES)
    else:
        turns = dialogue_turns(record.get("chosen"))
    check_turns(turns, complete)
    return tidy(turns)


def is_conversation(record: dict) -> bool:
    return "messages" in record


def load_conversations(source: str, form: str = FORMAT, skip_invalid: bool = False,
                       rows: list | None = None) -> tuple[list[dict], dict]:
    """({"messages": turns} records, report) from `source` in format `form` (not "alpaca"; "auto" detects it).

    Malformed records raise DataError naming file, record (and line), turn and field, or are skipped with
    `skip_invalid`. `rows` takes an earlier read_raw(source)."""
    rows = read_raw(source) if rows is None else rows
    form = detect_format(rows) if form == "auto" else form
    records, skipped = [], []
    for where, record in rows:
        try:
            records.append({"messages": parse_conversation(record, form)})
        except MalformedConversation as err:
            if not skip_invalid:
                raise DataError(f"{where}: {err} (use --skip-invalid to drop such records)") from None
            skipped.append(f"{where}: {err}")
    if not records:
        problems = [p.removeprefix(f"{source}: ") for p in skipped]
        shown = "; ".join(problems[:SHOWN]) + ("; ..." if len(problems) > SHOWN else "")
        raise DataError(f"{source}: no usable conversations ({len(rows)} read, {len(skipped)} invalid"
                        f"{': ' + shown if shown else ''})")
    report = {"read": len(rows), "skipped": skipped, "empty_dropped": [], "empty_details": [],
              "placeholder_inputs": 0, "format": form}
    return records, report


def load_training_records(source: str, form: str = FORMAT, skip_invalid: bool = False) -> tuple[list[dict], dict]:
    """What train.py trains on: Alpaca records (records.load_records, as before) or conversations, by `form`."""
    from tuning.data.records import load_records

    rows = read_raw(source)
    form = detect_format(rows) if form == "auto" else form
    if form == "alpaca":
        records, report = load_records(source, skip_invalid, rows=rows)
        return records, {**report, "format": "alpaca"}
    return load_conversations(source, form, skip_invalid, rows=rows)


def read_conversations_to_answer(path: str, flag: str = "--messages-file") -> list[dict]:
    """Conversations to answer (inference.py --messages-file): a .json file holding one conversation (a list of
    turns) or a list of them, or a .jsonl file with one per line; each a list of turns, a {"messages"} or a
    ShareGPT {"conversations"} record. Each comes back as {"messages": the turns up to the last user turn,
    "reference": the assistant turn after it, or None}: a conversation that ends with the assistant's is
    answered again at its last turn, which becomes the reference."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: file not found")
    if path.endswith(".json"):
        import json

        with open(path, encoding="utf-8") as handle:
            try:
                whole = json.load(handle)
            except json.JSONDecodeError:
                whole = None  # read_raw says where
        if isinstance(whole, dict):
            raise UserError(f"{flag} {path}: holds one object; give a conversation as a list of turns, or a list "
                            "of conversations (a .jsonl file takes one {\"messages\": [...]} per line)")
    rows = read_raw(path)
    if rows and all(isinstance(record, dict) and "instruction" in record for _, record in rows):
        raise UserError(f"{flag} {path}: holds instruction records, not conversations; use --prompts-file {path}")
    if rows and all(isinstance(record, dict) and "role" in record for _, record in rows):
        rows = [(path, [record for _, record in rows])]  # the file is one conversation
    items = []
    for where, record in rows:
        record = {"messages": record} if isinstance(record, list) else record
        form = "sharegpt" if isinstance(record, dict) and "conversations" in record else "messages"
        try:
            turns = parse_conversation(record, form, complete=False)
        except MalformedConversation as err:
            raise DataError(f"{where}: {err}") from None
        reference = turns.pop()["content"] if turns[-1]["role"] == "assistant" else None
        items.append({"messages": turns, "reference": reference})
    if not items:
        raise UserError(f"{flag} {path}: no conversations in it")
    return items
