"""A constitution: the written principles that Constitutional AI asks a feedback model to apply, and the requests
built from them.

A constitution is a JSON file that users edit (constitutions/harmless.json is the default):

    {"principles": [{"name": "harm",
                     "critique":   "... {prompt} ... {answer} ... Point out every way the answer is harmful.",
                     "revision":   "... {answer} ... {critique} ... Rewrite the answer so that ...",
                     "comparison": "... (A) {answer_a} (B) {answer_b} ... Which answer is less harmful? Reply with A or B."}]}

Each request is asked as one instruction, in the feedback model's own prompt format. The placeholders each
request needs are in PLACEHOLDERS ({prompt}, the request being answered, is optional everywhere); any other
`{name}` is a mistake, reported with the file, the principle and the field. Text is substituted literally, so
braces in a prompt or an answer are safe.

    constitution = read_constitution("constitutions/harmless.json")
    text = request(constitution[0], "critique", prompt="How do I pick a lock?", answer="...")

Data floor: imports records only.
"""

from __future__ import annotations

import json
import os
import re

from tuning.data.records import DataError, a_kind

# The fields of a principle and the placeholders each must hold; {prompt} may appear in any of them.
PLACEHOLDERS = {"critique": ("answer",), "revision": ("answer", "critique"), "comparison": ("answer_a", "answer_b")}
OPTIONAL = ("prompt",)
# The option letters of a comparison question: the feedback model's reply starts with one of them.
OPTIONS = ("A", "B")
_NAME = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def read_constitution(path: str) -> list[dict]:
    """The principles of a constitution file: [{name, critique, revision, comparison}], checked. A DataError (one
    line, naming the file, the principle and the field) for anything a run could not use."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: constitution file not found (see constitutions/ for the format)")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    principles = data.get("principles") if isinstance(data, dict) else None
    if not isinstance(principles, list) or not principles:
        raise DataError(f"{path}: expected an object with a non-empty list 'principles' (see constitutions/harmless.json)")
    names = set()
    for index, principle in enumerate(principles):
        where = f"{path}: principle {index}"
        if not isinstance(principle, dict):
            raise DataError(f"{where}: is {a_kind(principle)}, not an object")
        name = principle.get("name", str(index))
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: field 'name' is not a non-empty string")
        where = f"{where} ('{name}')"
        if name in names:
            raise DataError(f"{where}: another principle has this name")
        names.add(name)
        for field, needed in PLACEHOLDERS.items():
            text = principle.get(field)
            if text is None:
                raise DataError(f"{where}: field '{field}' is missing")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: field '{field}' is not a non-empty string")
            found = set(_NAME.findall(text))
            missing = [f"{{{p}}}" for p in needed if p not in found]
            if missing:
                raise DataError(f"{where}: field '{field}' has no {' or '.join(missing)} placeholder "
                                f"(it needs {', '.join(f'{{{p}}}' for p in needed)})")
            unknown = sorted(found - set(needed) - set(OPTIONAL))
            if unknown:
                raise DataError(f"{where}: field '{field}' has an unknown placeholder {{{unknown[0]}}} (it may use "
                                f"{', '.join(f'{{{p}}}' for p in needed + OPTIONAL)})")
        unknown_fields = sorted(set(principle) - set(PLACEHOLDERS) - {"name"})
        if unknown_fields:
            raise DataError(f"{where}: unknown field '{unknown_fields[0]}' (a principle has name, "
                            f"{', '.join(PLACEHOLDERS)})")
    return [{"name": p.get("name", str(i)), **{field: p[field] for field in PLACEHOLDERS}}
            for i, p in enumerate(principles)]


def request(principle: dict, field: str, **values: str) -> str:
    """A principle's `field` request with its placeholders filled in, literally (a brace in a value stays)."""
    text = principle[field]
    return _NAME.sub(lambda match: values[match.group(1)] if match.group(1) in values else match.group(0), text)


def prompt_text(prompt: dict) -> str:
    """What {prompt} stands for: a record's instruction (and its input after a blank line), a prompt text, or a
    conversation's turns ("User: ...", "Assistant: ...", a blank line apart; a single user turn as itself)."""
    if prompt.get("messages") is not None:
        turns = prompt["messages"]
        if len(turns) == 1 and turns[0]["role"] == "user":
            return turns[0]["content"]
        return "\n\n".join(f"{turn['role'].capitalize()}: {turn['content']}" for turn in turns)
    if prompt.get("prompt") is not None:
        return prompt["prompt"]
    given = prompt.get("input") or ""
    return prompt["instruction"] + (f"\n\n{given}" if given.strip() else "")


def first_turn(prompt: dict) -> dict:
    """A prompt reduced to its conversation's first user turn (a system turn before it stays): the red-team
    request that opens an HH-RLHF dialogue, asked on its own."""
    turns = prompt.get("messages")
    if not turns:
        return prompt
    first = next(i for i, turn in enumerate(turns) if turn["role"] == "user")
    return {**prompt, "messages": turns[:first + 1]}
