"""How the policy samples its answers in online RL (RLOO, GRPO), faster: each prompt read once, and on a CPU the
attention kernel that decodes fastest there.

TRL's online trainers sample by calling the policy's generate() on their batch of prompts, each repeated
--num-generations times, so every prompt is read (the prefill: a forward over all its tokens) once for each of its
answers. enable_fast_sampling(model) wraps generate():

- rows that repeat a prompt share one forward over all but its last token, whose key/value cache is then copied to
  each of its rows (Cache.reorder_cache), and generate() goes on from there as it would have: the same sampler, the
  same random draws, the same stopping, each row at the positions its attention mask gives it;
- on a CPU, generate() runs with eager attention: PyTorch's CPU SDPA kernel is slow for one query over a long
  cache (a decoding step), so eager attention samples 128 tokens for 8 HH prompts x 4 in about two thirds of the time
  (benchmarks/align_throughput.py). Training's forwards keep SDPA, faster on long rows.

A call without a repeated row, or one that brings its own cache, is generate() as it was, apart from the attention
on a CPU (the held-out answers; inference.py never goes through it).

Models floor: imports data.collate.
"""

from __future__ import annotations

import inspect
import types
from contextlib import contextmanager

import torch

from tuning.data.collate import positions_from_mask


def enable_fast_sampling(model):
    """Give `model` (a causal LM, or a peft model around one) the faster generate(); on the instance, so TRL's call
    (through peft, or on the unwrapped model) reaches it."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "_generate_before_fast_sampling" in lm.__dict__:
        return model
    previous = lm.generate

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        with decoding_attention(self):
            cache = prefilled_cache(self, input_ids, attention_mask, kwargs)
            if cache is not None:
                kwargs["cache"] = cache
            return previous(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    lm._generate_before_fast_sampling = previous
    lm.generate = types.MethodType(generate, lm)
    return model


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
    if input_ids is None or attention_mask is None or input_ids.dim() != 2 or input_ids.shape[1] < 2 or \
            any(kwargs.get(name) is not None for name in ("cache", "past_key_values", "inputs_embeds")):
        return None
    rows = [tuple(row) for row in torch.cat([input_ids, attention_mask], 1).tolist()]
    distinct: dict[tuple, int] = {}
    for row in rows:
        distinct.setdefault(row, len(distinct))
    if len(distinct) == len(rows) or attention_mask[:, :-1].sum(1).min() < 1:
        return None
    first = {}
    for i, row in enumerate(rows):
        first.setdefault(row, i)
    unique = torch.tensor(list(first.values()), device=input_ids.device)
    mask = attention_mask[unique, :-1]
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}
    with torch.no_grad():
        out = lm(input_ids=input_ids[unique, :-1], attention_mask=mask, position_ids=positions_from_mask(mask),
                 use_cache=True, **extra)
    cache = out.cache
    cache.reorder_cache(torch.tensor([distinct[row] for row in rows], device=input_ids.device))
    return cache
