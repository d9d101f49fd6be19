"""Tokenized data on disk: the cache that makes a second run quick, and `datasetup.py --save` directories.

Both are keyed on everything the tokens depend on (records, tokenizer, template text, settings and a
format version), so an edited template or tokenizer never reuses stale tokens.
"""

from __future__ import annotations

import hashlib
import json
import os

from tuning import rundir
from tuning.data.records import DataError
from tuning.data.templates import bos_prefix, template_of

CACHE_VERSION = 2  # part of every cache key: bump it when the tokenized format changes


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = f"{bos_prefix(tokenizer)}/{tokenizer.eos_token_id}"
    return hashlib.sha256((text + extra).encode()).hexdigest()[:16]


def cache_dir(records, tokenizer, template, max_length, train_on_prompt, val_size, seed, chat=None) -> str:
    """The cache of one tokenization; `chat` ([chat template, train_on]) keys conversations on what labels them."""
    import datasets

    key = [CACHE_VERSION, records, tokenizer_fingerprint(tokenizer), list(template_of(template)), max_length,
           train_on_prompt, val_size, seed] + ([chat] if chat else [])
    key = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "instruct-sft", key)


def is_saved_dir(source: str) -> bool:
    return os.path.isfile(os.path.join(source, "dataset_dict.json"))


def _meta(tokenizer, template, max_length, train_on_prompt) -> dict:
    """What a tokenization depends on: written with a --save dir and checked when it is loaded."""
    return {"template": template if isinstance(template, str) else None, "template_text": list(template_of(template)),
            "max_length": max_length, "train_on_prompt": train_on_prompt, "tokenizer": tokenizer_fingerprint(tokenizer),
            "cache_version": CACHE_VERSION}


def save(dsd, path, tokenizer, template, max_length, train_on_prompt, held_out=None):
    tmp = path + f".tmp{os.getpid()}"  # write then rename: an interrupted save never looks complete
    dsd.save_to_disk(tmp)
    with open(os.path.join(tmp, "sft_meta.json"), "w") as handle:
        # val_size: the split's real size, for train.py's run_config (the fraction asked for is not it)
        json.dump({**_meta(tokenizer, template, max_length, train_on_prompt),
                   "val_size": len(dsd["validation"])}, handle)
    if held_out is not None:
        rundir.write_records(os.path.join(tmp, rundir.HELD_OUT_FILE), held_out)
    if os.path.exists(path):
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)


def saved_settings(path: str) -> dict:
    """The template, max_length, train_on_prompt and validation size a --save dir was made with."""
    with open(os.path.join(path, "sft_meta.json")) as handle:
        return json.load(handle)


def load_saved(path, tokenizer, template, max_length, train_on_prompt):
    """Load a `--save` directory, refusing one made with other settings than those asked for."""
    import datasets

    meta = saved_settings(path)
    if meta.get("cache_version") != CACHE_VERSION:
        raise DataError(f"{path}: was made by an older version of datasetup.py; make it again with "
                        f"datasetup.py --save {path}")
    asked = _meta(tokenizer, template, max_length, train_on_prompt)
    diffs = [f"{k}: saved {meta.get(k)!r}, asked {v!r}" for k, v in asked.items() if meta.get(k) != v]
    if diffs:
        raise DataError(f"{path}: was tokenized with other settings ({'; '.join(diffs)})")
    report = {"from_cache": True, "saved_dir": path}
    held_out = os.path.join(path, rundir.HELD_OUT_FILE)
    if os.path.isfile(held_out):
        report["held_out"] = rundir.read_records(held_out)
    return datasets.load_from_disk(path), report
