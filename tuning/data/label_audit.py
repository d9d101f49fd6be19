"""The label audit: what a run will learn, checked on its tokenized conversations before the first step.

    problems = audit_labels(examples, tokenizer.eos_token_id, collator)   # [] when the labels are right
    print(marked_example(examples[0], tokenizer))                           # trained tokens in [[ ]]

The failures it stops on are the ones other projects shipped silently: an example with nothing to learn
(everything masked), an assistant turn whose end-of-turn token is not learned (a model that never stops), and
a collator that masks the end-of-turn token because it is also the pad id.

Data floor: imports cli and chat_template.
"""

from __future__ import annotations

from tuning.cli import UserError
from tuning.data.chat_template import IGNORE_INDEX, has_generation_markers

# Examples the collator check runs on, and problems of one kind quoted by name.
COLLATED = 16
SHOWN = 3


def audit_labels(examples: list[dict], eot_id: int, collator, what: str = "example") -> list[str]:
    """Every problem found in tokenized conversations (tokenize_conversations's examples, with `spans`):
    examples with no trained token; assistant turns whose last trained token is not the end-of-turn token
    `eot_id` (except a turn cut short by --max-length); and end-of-turn labels the collator loses."""
    problems, empty, unended = [], [], []
    for index, example in enumerate(examples):
        labels = example["labels"]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            empty.append(index)
            continue
        for number, (start, end) in enumerate(example["spans"], start=1):
            cut = example["truncated"] and end == len(labels)
            if not cut and labels[end - 1] != eot_id:
                unended.append(f"{what} {index}, assistant turn {number}")
    if empty:
        problems.append(f"{len(empty)} {what}s have no trained token (e.g. {what} "
                        f"{', '.join(map(str, empty[:SHOWN]))}): the chat template marks no assistant tokens in them")
    if unended:
        problems.append(f"{len(unended)} assistant turns do not end with a trained end-of-turn token (id {eot_id}) "
                        f"({'; '.join(unended[:SHOWN])}): the model would never learn to stop")
    sample = [e for e in examples if e["input_ids"]][:COLLATED]
    if sample:
        expected = sum(list(e["labels"][1:]).count(eot_id) for e in sample)  # (packing masks each first label)
        kept = int((collator(sample)["labels"] == eot_id).sum())
        if kept < expected:
            problems.append(f"the collator keeps {kept} of {expected} end-of-turn labels in a batch of {len(sample)} "
                            f"{what}s: the pad id masks the end-of-turn token (id {eot_id})")
    return problems


def marked_example(example: dict, tokenizer, start: str = "[[", end: str = "]]") -> str:
    """The example's text with each run of trained tokens between `start` and `end`: what the model learns."""
    pieces, run, trained = [], [], None
    for token, label in zip(example["input_ids"], example["labels"]):
        is_trained = label != IGNORE_INDEX
        if is_trained != trained and run:
            text = tokenizer.decode(run)
            pieces.append(f"{start}{text}{end}" if trained else text)
            run = []
        run.append(token)
        trained = is_trained
    if run:
        text = tokenizer.decode(run)
        pieces.append(f"{start}{text}{end}" if trained else text)
    return "".join(pieces)


def require_generation_markers(chat_template: str, owner: str) -> None:
    """Conversations are labelled from the chat template's generation markers: a UserError for one without."""
    if not has_generation_markers(chat_template):
        raise UserError(f"the chat template of {owner}'s tokenizer has no {{% generation %}} markers, so its "
                        "assistant turns can't be told from the rest: add them around each assistant message "
                        "(transformers' return_assistant_tokens_mask), or remove its chat_template to use ours")


def require_sound_labels(data, tokenizer, collator) -> None:
    """audit_labels on every split of tokenized conversations; a UserError listing every problem found."""
    problems = []
    for split in data:
        problems += [f"{split}: {p}" for p in audit_labels(list(data[split]), tokenizer.eos_token_id, collator)]
    if problems:
        raise UserError("the labels would teach the wrong thing:\n  " + "\n  ".join(problems))
