"""Reward-model scores: one number for a (prompt, answer), read at a position this project chooses.

    rm, tokenizer, template = scoring.load_reward_model("distilgpt2-alpaca-rm", device)
    scores = scoring.score_texts(rm, tokenizer, prompts, answers)  # prompts formatted, e.g. with `template`

A reward model is a Hugging Face sequence-classification model with one output, whose body comes from
the SFT model. Its score is read at the answer's last token, the one before the EOS of prompt + answer +
EOS: the position where the SFT model learnt to predict the EOS, so its hidden state already tells a
finished, right answer from a wrong one (a linear probe on the SFT body reads 99% of the smoke pairs there,
83% at the EOS, whose own position SFT never trains; at the EOS a reward model learns markedly less in the
same steps). GPT-2's own head reads the last token that is not `pad_token_id`; with pad = EOS that is
this token in an unpadded text, but a padding slot under left padding. So the position is passed in
explicitly (`score_index`: each sequence's final token, its EOS; the score is read one before it), and
how a batch is laid out (padding, packing, batch size, order) cannot change a score. A saved reward
model has no `pad_token_id`, so Hugging Face's own forward reads the last token of one unpadded text:
the same score for prompt + answer without the EOS.

Models floor: reward.py trains with it; evaluation.py and RLOO score with it. It imports the data floor,
loading and lora.
"""

from __future__ import annotations

import os

import torch

from tuning.models import lora
from tuning.cli import UserError
from tuning.data.collate import ScoreCollator
from tuning.models.loading import context_limit
from tuning.data.chat_template import answer_end_ids, answer_tokens, prompt_ids


class _ScoreAtIndex:
    """Mixed into a sequence-classification model's class by enable_score_index: given `score_index`, the
    forward returns one score per indexed sequence (logits of shape n), read from the body's hidden state
    at the token before the indexed one (each sequence's EOS): the answer's last token. Inside forward, so
    mixed-precision autocast (which wraps model.forward) covers it."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, score_index=None, **kwargs):
        if score_index is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   **kwargs)
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state
        scores = self.score(hidden[score_index[:, 0], score_index[:, 1] - 1]).squeeze(-1)  # the token before the EOS
        return SequenceClassifierOutputWithPast(logits=scores.float())


def enable_score_index(model):
    """Give `model` (a sequence-classification model with one output and a `score` head) the score_index
    forward. A class, not an instance attribute, so replicas follow it; same name, so saving is unchanged."""
    if isinstance(model, _ScoreAtIndex):
        return model
    if not hasattr(model, "score") or model.config.num_labels != 1:
        raise UserError(f"{type(model).__name__} has no one-output `score` head, so it can't be a reward model here")
    cls = type(model)
    model.__class__ = type(cls.__name__, (_ScoreAtIndex, cls), {"__module__": cls.__module__,
                                                                "__qualname__": cls.__qualname__})
    return model


def reward_model_from(name_or_path: str, dtype=None):
    """A reward model whose body is the causal LM at `name_or_path` (the SFT model) and whose score head is
    new and zero: before training it scores every answer 0, preferring nothing. Dropout is off."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized score head" report: expected, and said below
    try:
        if lora.is_adapter_dir(name_or_path):  # a LoRA SFT run: the body of its base with the adapter merged in
            from tuning.models import loading

            lm = loading.load_model(name_or_path, dtype=dtype)
            lm.config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(lm.config, dtype=dtype or torch.float32)
            model.base_model.load_state_dict(lm.base_model.state_dict())
        else:
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1,
                                                                       dtype=dtype or torch.float32)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"could not load {name_or_path!r} as the body of a reward model "
                        f"({type(err).__name__}: {err})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    disable_dropout(model)
    with torch.no_grad():
        model.score.weight.zero_()
        if getattr(model.score, "bias", None) is not None:
            model.score.bias.zero_()
    return enable_score_index(model)


def disable_dropout(model) -> None:
    """No dropout in a reward model, as in TRL: it would make the two scores of a pair noisy."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def without_pad_id(model) -> None:
    """Before saving: no pad_token_id in the config, so Hugging Face's own forward reads the last token of an
    unpadded text (and refuses padded batches) instead of guessing the position from pad = EOS: given prompt +
    answer without the EOS, it reads the score where score_ids does."""
    model.config.pad_token_id = None


def load_reward_model(path: str, device=None, flag: str = "--reward-model"):
    """(model, tokenizer, template) of a reward model saved by reward.py, in eval mode on `device`."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tuning.models import loading
    from tuning.data.templates import load_template

    if lora.is_adapter_dir(path) and lora.adapter_task(path) == "SEQ_CLS":  # a reward.py --lora run
        rm = lora.load_merged(path, reward_model_from)  # the SFT body, the adapters and the trained score head
        without_pad_id(rm)  # (the SFT body's config may have pad = EOS; --merge saves this model)
        rm = enable_score_index(rm).to(device or "cpu").eval()
        return rm, loading.load_tokenizer(path, flag=flag), load_template(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        from tuning import rundir

        last = rundir.find_checkpoint(path)
        hint = f" Its training did not finish: resume it, or score with {last}." if last else (
            " Train one with `python reward.py` (or `python reward.py --smoke`).")
        if lora.is_adapter_dir(path):  # a train.py / align.py --lora output
            hint = " It holds a causal LM's LoRA adapter (train.py or align.py --lora): train a reward model on it."
        raise UserError(f"{flag} {path}: no reward model there (config.json missing).{hint}")
    config = AutoConfig.from_pretrained(path)
    kinds = config.architectures or []
    if not any(kind.endswith("ForSequenceClassification") for kind in kinds) or config.num_labels != 1:
        what = (f"a causal language model ({', '.join(kinds)}), such as the SFT model" if any(
            kind.endswith(("LMHeadModel", "ForCausalLM")) for kind in kinds) else f"a {', '.join(kinds) or 'model'} "
            f"with {config.num_labels} outputs")
        raise UserError(f"{flag} {path}: not a reward model (it is {what}); reward.py writes one with a single score")
    tokenizer = loading.load_tokenizer(path, flag=flag)
    rm = AutoModelForSequenceClassification.from_pretrained(path)
    rm = enable_score_index(rm).to(device or "cpu").eval()
    return rm, tokenizer, load_template(path)


def answer_ids(tokenizer, prompt, answer: str, chat_template: str | None = None) -> list[int]:
    """prompt + answer + its end as the reward model reads it, exactly as preferences.tokenize_pair makes a pair:
    a text prompt as training and inference encode it and the answer + EOS; a conversation (a list of turns)
    rendered with `chat_template` (else the tokenizer's) and the answer + the template's end-of-turn. The answer
    is tokenized apart from the prompt (no merge across the boundary); long ones are cut later."""
    return prompt_ids(tokenizer, prompt, chat_template) + answer_tokens(tokenizer, prompt, answer, chat_template)


@torch.no_grad()
def score_ids(model, sequences: list[list[int]], pad_id: int, batch_size: int = 16, mode: str = "none") -> list[float]:
    """The score of each token-id sequence (read at its last token), in input order. Sequences are
    batched by length to pad little; the result does not depend on the batching."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    collate, scores = ScoreCollator(pad_id, mode), [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate.layout([sequences[i] for i in chunk]).items()}
            for i, value in zip(chunk, model(**batch).logits.tolist()):
                scores[i] = value
    finally:
        model.train(was_training)
    return scores


@torch.no_grad()
def score_samples(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> list[float]:
    """The score of each prompt + answer (token ids, the answer with its end), read where score_ids reads it (at the
    token before the last), with the answers to one prompt sharing it: sampled_logps' layout (collate.pack_samples'
    "rows": the prompt once, each answer attending to it and to itself), so a prompt is read once for all its
    answers. For a model that keeps them apart (Judge checks on the first answers it scores)."""
    from tuning.data.collate import pack_samples
    from tuning.models.sampled_logps import attention_for, padded_samples

    device = next(model.parameters()).device
    ids, mask, keep = padded_samples(prompts, answers, pad_id, device)
    batch = pack_samples(ids, mask, keep, pad_id, "rows")
    where = {slot: k for k, slot in enumerate(batch["slots"].tolist())}  # each answer token's place in the layout
    last = batch["sources"][[where[i * keep + len(answer) - 1] for i, answer in enumerate(answers)]]
    width = batch["input_ids"].shape[1]
    index = torch.stack([last // width, last % width + 1], 1)  # (row, column of the final token): read one before
    was_training = model.training
    model.eval()
    try:
        scores = model(input_ids=batch["input_ids"], attention_mask=attention_for(model, batch["attention_mask"]),
                       position_ids=batch["position_ids"], score_index=index).logits
    finally:
        model.train(was_training)
    return scores.tolist()


def within_context(ids: list[int], limit: int | None, end: int = 1) -> list[int]:
    """prompt + answer + its end (EOS, or a chat template's `end` end-of-turn tokens) cut to the reward model's
    `limit` tokens: the answer's last words go, its end stays. A generated answer, decoded and encoded again, can
    take more tokens than it was generated in (a character cut mid-way, another tokenizer), and noise more than
    it fits."""
    return ids if not limit or len(ids) <= limit else ids[:limit - end] + ids[-end:]


def end_length(tokenizer, prompt, chat_template: str | None = None) -> int:
    """How many tokens close an answer to `prompt`: the EOS after a text, the chat template's end-of-turn in a
    conversation."""
    return len(answer_end_ids(tokenizer, chat_template)) if isinstance(prompt, list) else 1


def score_texts(model, tokenizer, prompts: list, answers: list[str], batch_size: int = 16,
                cut: bool = False, chat_template: str | None = None) -> list[float]:
    """The reward of each answer to its prompt: a formatted text, or a conversation rendered with `chat_template`
    (the reward model's). A text longer than the model's context is cut to fit with `cut` (generated answers:
    within_context), else refused with a UserError naming it."""
    sequences = [answer_ids(tokenizer, p, a, chat_template) for p, a in zip(prompts, answers)]
    limit = context_limit(model.config)
    too_long = [i for i, s in enumerate(sequences) if limit and len(s) > limit]
    if too_long and not cut:
        raise UserError(f"answer {too_long[0] + 1} ({answers[too_long[0]][:40]!r}): prompt + answer is "
                        f"{len(sequences[too_long[0]])} tokens, more than the reward model's {limit}")
    turn_end = end_length(tokenizer, next((p for p in prompts if isinstance(p, list)), ""), chat_template)
    ends = [turn_end if isinstance(p, list) else 1 for p in prompts]  # (the template's end: found once)
    return score_ids(model, [within_context(s, limit, end) for s, end in zip(sequences, ends)], tokenizer.pad_token_id,
                     batch_size)


def pairwise_stats(margins) -> dict:
    """Pairwise accuracy (ties count half), loss -log sigmoid(margin) and mean margin of chosen - rejected."""
    margins = torch.as_tensor(margins, dtype=torch.float64)
    if margins.numel() == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "mean_margin": float("nan")}
    accuracy = ((margins > 0).double() + 0.5 * (margins == 0).double()).mean()
    loss = torch.nn.functional.softplus(-margins).mean()
    return {"accuracy": float(accuracy), "loss": float(loss), "mean_margin": float(margins.mean())}


