"""How the policy samples its answers in online RL (RLOO, GRPO), faster: each prompt read once, its own decoding
loop, and on a CPU the attention kernel that decodes fastest there.

TRL's online trainers sample by calling the policy's generate() on their batch of prompts, each repeated
--num-generations times. Within fast_sampling(model), a call that samples (do_sample, one sequence a row, no beams)
still goes through generate(), which prepares everything as it would (the logits processors of the generation
config: temperature, top-k, top-p, ...; the stopping criteria; the attention mask), but:

- rows that repeat a prompt share one forward over all but its last token, whose key/value cache is then copied to
  each of its rows (Cache.reorder_cache); each row keeps the positions its attention mask gives it;
- the tokens are then drawn by sample_answers, generate()'s documented hook for a decoding loop (custom_generate).
  It is generate()'s sampling loop with two changes, measured on 2 CPU cores (8 HH prompts x 4 answers of 128
  tokens, DistilGPT2, bf16): each token is drawn with one uniform number per row from the cumulative
  probabilities, where torch.multinomial draws an exponential number for every word of the 50,257 (~30 ms a
  step); and the cache has room for the whole rows from the start (sampling_cache), where a DynamicCache
  concatenates each token to a new copy of itself. The answers come from the same distribution as generate()'s,
  by other random draws (tested: the same answers given the same draws, in fp32);
- on a CPU it decodes with eager attention: PyTorch's CPU SDPA kernel is slow for one query over a long cache
  (14.8 s against 20.9 s for the 32 answers above, before the two changes). The prefill, and training's
  forwards, keep SDPA. All three together: 7.5 s, where generate() as it comes takes 21.2 s.

Any other call (greedy, beams, a streamer, scores asked back, a cache implementation of its own, an
encoder-decoder) is generate() as it comes. align_trainers uses it for TRL's sampling only: the held-out greedy
answers stay inference.py's own.

Models floor: imports data.collate.
"""

from __future__ import annotations

import inspect
import types
from contextlib import contextmanager

import torch
from transformers.cache_utils import StaticCache

from tuning.data.collate import positions_from_mask


@contextmanager
def fast_sampling(model, record: list | None = None):
    """A context in which `model`'s generate() (a causal LM's, or a peft model's inner one) samples as the module
    says: each repeated prompt read once, then sample_answers' loop; generate() is as it was again after it.
    `record`, a list, receives each call's log-probs of the tokens drawn (sample_answers), for the calls that
    sample_answers draws (None appended for the others)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous, original = lm.__dict__.get("generate"), lm.generate

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        if not samples_plainly(self, input_ids, kwargs):
            if record is not None:
                record.append(None)
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        cache = sampling_cache(self, input_ids, attention_mask, kwargs)  # (the prefill keeps SDPA: long rows)
        steps = None if record is None else []
        out = original(input_ids=input_ids, attention_mask=attention_mask, custom_generate=sample_answers,
                       cache=cache, drawn_logps=steps, **kwargs)
        if record is not None:
            record.append(torch.stack(steps, 1) if steps else None)
        return out

    lm.generate = types.MethodType(generate, lm)
    try:
        yield model
    finally:
        if previous is None:
            del lm.generate
        else:
            lm.generate = previous


def samples_plainly(lm, input_ids, kwargs: dict) -> bool:
    """Whether a generate() call draws one sampled sequence per row of its prompt ids, with a cache that
    generate() builds as it does by default, and asks nothing back but the ids: what sample_answers does."""
    config = kwargs.get("generation_config") or lm.generation_config
    setting = lambda name: kwargs.get(name, getattr(config, name, None))  # noqa: E731 (a call's own override first)
    own = lm.generation_config  # (generate() fills a given config's unset fields from the model's own; it
    # drops Gemma's "hybrid", its cache's old name)
    return input_ids is not None and input_ids.dim() == 2 and not lm.config.is_encoder_decoder and \
        own.cache_implementation in (None, "hybrid") and (own.num_return_sequences or 1) == 1 and \
        (own.num_beams or 1) == 1 and \
        all(kwargs.get(name) is None for name in ("cache", "past_key_values", "inputs_embeds", "assistant_model",
                                                  "streamer", "custom_generate", "synced_gpus")) and \
        setting("do_sample") is True and setting("use_cache") is not False and \
        setting("cache_implementation") is None and not setting("return_dict_in_generate") and \
        (setting("num_beams") or 1) == 1 and (setting("num_return_sequences") or 1) == 1


def sample_answers(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                   streamer=None, drawn_logps: list | None = None, **model_kwargs):
    """generate()'s sampling loop (GenerationMixin._sample) for the calls samples_plainly admits, with the
    tokens drawn by draw_tokens, in the cache sampling_cache made; generate() calls it with everything prepared
    (custom_generate). Returns the prompt and answer ids, each answer padded after its stop. `drawn_logps`, a
    list, receives each step's log-probs of the tokens drawn (rows,), as TRL's trainers define a token's log-prob:
    the model's logits at the sampling temperature, before any other processor (top-k, top-p, ...), in fp32."""
    # (generate() gives a callable custom_generate no synced_gpus: under ZeRO-3 or FSDP with several processes,
    # which would need it, launchers.py refuses align.py)
    if synced_gpus or streamer is not None or generation_config.return_dict_in_generate or \
            not generation_config.do_sample:  # (never from fast_sampling; the loop as it comes otherwise)
        return model._sample(input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer,
                             **model_kwargs)
    temperature = generation_config.temperature or 1.0
    pad = generation_config._pad_token_tensor
    stops_at_eos = any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)
    unfinished = torch.ones(len(input_ids), dtype=torch.bool, device=input_ids.device)
    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    with decoding_attention(model):
        while True:
            model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
            logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
            del outputs
            scores = logits_processor(input_ids, logits if drawn_logps is None else logits.clone())  # (in place)
            tokens = draw_tokens(scores.softmax(-1))
            if drawn_logps is not None:
                drawn_logps.append(torch.log_softmax(logits.div_(temperature), -1).gather(-1, tokens[:, None])[:, 0])
            if stops_at_eos:  # (a finished row gets padding)
                tokens = torch.where(unfinished, tokens, pad)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            unfinished &= ~stopping_criteria(input_ids, None)
            if not unfinished.any():
                return input_ids
            inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
            outputs = model(**inputs, return_dict=True)


def draw_tokens(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (rows, vocabulary), each drawn with its probability: where one uniform number
    per row falls among the row's cumulative probabilities (in float64, so that a word of probability 0, which
    top-k or top-p leave, is drawn only if the number rounds to the row's total, about once in 2^53 draws). A row
    that is not a distribution (NaN, as from a diverged model) is refused, as torch.multinomial refuses it."""
    cumulative = probs.double().cumsum(-1)
    total = cumulative[:, -1]
    if not ((total > 0) & (total < float("inf"))).all():  # (one check, NaN included: a NaN is not > 0)
        raise RuntimeError("sampling: a row of probabilities is NaN, infinite or all zero")
    where = torch.rand(len(probs), 1, dtype=torch.float64, device=probs.device) * total[:, None]
    return torch.searchsorted(cumulative, where, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)


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


def sampling_cache(lm, input_ids, attention_mask, kwargs: dict) -> StaticCache:
    """A cache with room for the whole sampled rows (prompt and answer), holding already, where rows repeat a
    prompt, the keys and values of every row's prompt but its last token, each distinct prompt computed once.

    Its room is what makes decoding fast on a CPU: a DynamicCache concatenates each token's keys and values to
    the cache (a new copy of it at every step), and a view of room kept for them (keys[..., :length, :]) makes
    PyTorch's bf16 batched products 8x slower than over the whole contiguous room (0.7 ms against 5.9 ms for one
    query of 32 rows x 12 heads over 400 tokens here); so each step attends over the whole room, the part not
    yet written masked out (as transformers' StaticCache is meant to be used)."""
    config = kwargs.get("generation_config") or lm.generation_config
    new = kwargs.get("max_new_tokens") or config.max_new_tokens
    length = input_ids.shape[1] + new if new else (kwargs.get("max_length") or config.max_length)
    cache = StaticCache(config=lm.config, max_cache_len=length)
    prefix = prefilled_cache(lm, input_ids, attention_mask) if not any(cache.is_sliding) else None
    for i, (keys, values, *_) in enumerate(prefix or ()):
        cache.layers[i].update(keys, values)
    return cache


def prefilled_cache(lm, input_ids, attention_mask):
    """The key/value cache of every row's prompt but its last token, each distinct prompt computed once; None where
    nothing repeats (or there is no mask, or a prompt of one token)."""
    if attention_mask is None or input_ids.shape[1] < 2:
        return None
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
