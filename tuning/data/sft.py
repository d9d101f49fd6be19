"""SFT examples: Alpaca records as prompt/response tokens whose labels mask the prompt, the EOS kept (or
conversations, labelled by their chat template: chat_template.py), and the tokenized train/validation split
(cached, or a datasetup.py --save dir).

    data, report = prepare_datasets("tatsu-lab/alpaca", tokenizer, "seed", 512, 0.02, 42)

Data floor: imports records, conversations, templates, chat_template, tokencache and rundir.
"""

from __future__ import annotations

import os

from tuning.data import tokencache
from tuning.data.chat_template import IGNORE_INDEX, TRAIN_ON, tokenize_conversations
from tuning.data.conversations import is_conversation
from tuning.data.records import load_records, split_records
from tuning.data.templates import bos_prefix, encode_prompt, format_prompt

TEMPLATE = "seed"  # the default template
MAX_LENGTH = 512  # the default tokens per example
VAL_SIZE = 0.02  # the default validation share
SEED = 42  # the default seed of the split
TRAIN_ON_PROMPT = False  # the default: loss on the response and its EOS only
DATASET = "tatsu-lab/alpaca"  # the default dataset



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


def _tokenize_conversation_batch(batch, tokenizer, chat_template, max_length, train_on, train_on_prompt):
    examples = tokenize_conversations(batch["messages"], tokenizer, chat_template, max_length, train_on,
                                      train_on_prompt)
    return {key: [example[key] for example in examples] for key in examples[0]}


def tokenize_records(records: list, tokenizer, template=TEMPLATE, max_length=MAX_LENGTH,
                     train_on_prompt=TRAIN_ON_PROMPT, desc="Tokenizing", chat_template=None, train_on=TRAIN_ON):
    """A datasets.Dataset of input_ids/labels/length, with too-long prompts removed (see .info). Conversation
    records ({"messages"}, conversations.py) are rendered with `chat_template`, and their labels come from it
    (chat_template.tokenize_conversations: every assistant turn, or the last with train_on="last_assistant")."""
    import datasets

    raw = datasets.Dataset.from_list(records)
    if records and is_conversation(records[0]):
        function, kwargs = _tokenize_conversation_batch, dict(chat_template=chat_template, train_on=train_on)
    else:
        function, kwargs = _tokenize_batch, dict(template=template)
    tokenized = raw.map(function, batched=True, batch_size=1000, remove_columns=raw.column_names,
                        fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length, train_on_prompt=train_on_prompt,
                                       **kwargs), desc=desc)
    return tokenized.filter(lambda lengths: [n > 0 for n in lengths], input_columns="length", batched=True,
                            desc="Dropping prompts longer than --max-length")


def prepare_datasets(source=DATASET, tokenizer=None, template=TEMPLATE, max_length=MAX_LENGTH, val_size=VAL_SIZE,
                     seed=SEED, train_on_prompt=TRAIN_ON_PROMPT, skip_invalid=False, loaded=None, chat_template=None,
                     train_on=TRAIN_ON):
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
    chat = [chat_template, train_on] if records and is_conversation(records[0]) else None
    cache = tokencache.cache_dir(records, tokenizer, template, max_length, train_on_prompt, val_size, seed, chat)
    report.update(records=len(records), cache=cache, records_per_split={"train": len(train), "validation": len(val)},
                  held_out=val)
    if os.path.isfile(os.path.join(cache, "dataset_dict.json")):
        report["from_cache"] = True
        return datasets.load_from_disk(cache), report
    args = (tokenizer, template, max_length, train_on_prompt)
    chat_args = dict(chat_template=chat_template, train_on=train_on)
    dsd = datasets.DatasetDict(train=tokenize_records(train, *args, desc="Tokenizing train", **chat_args),
                               validation=tokenize_records(val, *args, desc="Tokenizing validation", **chat_args))
    report["from_cache"] = False
    tokencache.save(dsd, cache, tokenizer, template, max_length, train_on_prompt)
    return dsd, report
