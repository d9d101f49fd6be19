"""How the policy samples its answers in online RL (RLOO, GRPO), faster: each prompt read once, and on a CPU the
attention kernel that decodes fastest there.

TRL's online trainers sample by calling the policy's generate() on their batch of prompts, each repeated
--num-generations times, so every prompt is read (the prefill: a forward over all its tokens) once for each of its
answers. Within fast_sampling(model), generate():

- rows that repeat a prompt share one forward over all but its last token, whose key/value cache is then copied to
  each of its rows (Cache.reorder_cache), and generate() goes on from there as it would have: the same sampler, the
  same random draws, the same stopping, each row at the positions its attention mask gives it (the same answers in
  fp32, tested; under bf16 the logits can differ in their last bits);
- then, on a CPU, it decodes with eager attention: PyTorch's CPU SDPA kernel is slow for one query over a long
  cache (a decoding step). Measured here (2 cores), 128 tokens for 8 HH prompts x 4 took 14.8 s with both, 20.9 s
  without. The prefill, and training's forwards, keep SDPA, faster on long rows.

A call without a repeated row, or one whose generation config builds its cache its own way (a cache
implementation, beams, several sequences a row), is generate() as it was. align_trainers uses it for TRL's
sampling only: the held-out greedy answers stay inference.py's own.

Models floor: imports data.collate.
"""

from __future__ import annotations

import inspect
import types
from contextlib import contextmanager

import torch

from tuning.data.collate import positions_from_mask


@contextmanager
def fast_sampling(model):
    """A context in which `model`'s generate() (a causal LM's, or a peft model's inner one) reads each repeated
    prompt once and, on a CPU, decodes with eager attention; generate() is as it was again after it."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous, original = lm.__dict__.get("generate"), lm.generate

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        cache = prefilled_cache(self, input_ids, attention_mask, kwargs)  # (the prefill keeps SDPA: long rows)
        if cache is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        with decoding_attention(self):
            return original(input_ids=input_ids, attention_mask=attention_mask, cache=cache, **kwargs)

    lm.generate = types.MethodType(generate, lm)
    try:
        yield model
    finally:
        if previous is None:
            del lm.generate
        else:
            lm.generate = previous


@contextmanager
def decoding_attention(lm):
    """A context in which `lm` attends with eager attention if it runs SDPA on a CPU; else nothing changes."""
    before = lm.config._attn_implementation
    if before != "sdpa" or lm.device.type != "cpu":
        yield
        return
    lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.set_attn_implementation(before)


def prefilled_cache(lm, input_ids, attention_mask, kwargs: dict):
    """The key/value cache of every row's prompt but its last token, each distinct prompt computed once; None where
    nothing repeats (or the call is not a plain prompt batch: no mask, its own cache, a prompt of one token)."""
    config = kwargs.get("generation_config") or lm.generation_config
    setting = lambda name: kwargs.get(name, getattr(config, name, None))  # noqa: E731 (a call's own override first)
    if input_ids is None or attention_mask is None or input_ids.dim() != 2 or input_ids.shape[1] < 2 or \
            any(kwargs.get(name) is not None for name in ("cache", "past_key_values", "inputs_embeds",
                                                          "assistant_model")) or \
            setting("use_cache") is False or setting("cache_implementation") is not None or \
            (setting("num_beams") or 1) != 1 or (setting("num_return_sequences") or 1) != 1:
        return None  # (a cache given, or one generate() would build its own way, or rows it would multiply)
    rows = [tuple(row) for row in torch.cat([input_ids, attention_mask], 1).tolist()]
    first: dict[tuple, int] = {}  # each distinct row: where it first comes
    for i, row in enumerate(rows):
        first.setdefault(row, i)
    if len(first) == len(rows) or attention_mask[:, :-1].sum(1).min() < 1:
        return None
    distinct = {row: k for k, row in enumerate(first)}  # each distinct row: its place among them
    unique = torch.tensor(list(first.values()), device=input_ids.device)
    mask = attention_mask[unique, :-1]
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}
    with torch.no_grad():
        out = lm(input_ids=input_ids[unique, :-1], attention_mask=mask, position_ids=positions_from_mask(mask),
                 use_cache=True, **extra)
    cache = out.cache
    cache.reorder_cache(torch.tensor([distinct[row] for row in rows], device=input_ids.device))
    return cache
