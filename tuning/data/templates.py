"""Prompt templates, and a record's prompt as text and as tokens: the one formatting path that training,
inference and evaluation share."""

from __future__ import annotations

from typing import NamedTuple

from tuning.data.records import is_placeholder_input

TEMPLATE = "seed"  # the default template's name


class Template(NamedTuple):
    with_input: str
    no_input: str


# The one copy of each prompt template; training, inference and evaluation all import these.
TEMPLATES = {
    "seed": Template(
        with_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        no_input="### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "alpaca": Template(
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        no_input=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    ),
}

def template_of(template: str | Template) -> Template:
    """The Template itself, given one or its name in TEMPLATES."""
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


def format_prompt(record: dict, template: str | Template = TEMPLATE) -> str:
    """The prompt text for a record (template: a name in TEMPLATES or a Template); the answer follows it.

    Training, inference and evaluation all format prompts here, so they can't disagree."""
    form = template_of(template)
    text_input = record.get("input") or ""
    if text_input.strip() and not is_placeholder_input(text_input):  # "<noinput>" and the like mean none
        return form.with_input.format(instruction=record["instruction"], input=text_input)
    return form.no_input.format(instruction=record["instruction"])


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids, starting with BOS where the tokenizer itself adds one (Llama, Gemma, OPT; not GPT-2)."""
    return bos_prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] when the tokenizer puts it before a text on its own (its add_bos_token or post-processor), else []."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else []


def load_template(model_dir: str, requested: str = "auto"):
    """The template to format prompts with: the one saved with the fine-tuned model, unless overridden."""
    import json
    import os
    import sys

    from tuning.rundir import TEMPLATE_FILE

    if requested != "auto":
        return TEMPLATES[requested]
    path = os.path.join(model_dir, TEMPLATE_FILE)
    if not os.path.isfile(path):
        print(f"note: {path} not found; using the 'seed' template", file=sys.stderr)
        return TEMPLATES["seed"]
    with open(path) as handle:
        saved = json.load(handle)
    return Template(saved["with_input"], saved["no_input"])


def write_template(directory: str, template) -> None:
    """The prompt template (a name in TEMPLATES, or a Template) beside a model, so inference formats prompts
    exactly as training did (load_template reads it back)."""
    import os

    from tuning.rundir import TEMPLATE_FILE, write_json

    form = template_of(template)
    name = next((key for key, value in TEMPLATES.items() if value == form), "custom")
    write_json(os.path.join(directory, TEMPLATE_FILE), {"name": name, **form._asdict()})
