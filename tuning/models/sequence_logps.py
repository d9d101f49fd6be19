"""Per-answer log-probabilities of preference pairs, computed without padding: what DPO compares.

A DPO step needs, for each pair, log pi(chosen | prompt) and log pi(rejected | prompt): the summed
log-probabilities of each answer's tokens and its EOS. TRL's DPOTrainer pads every sequence of a batch to
the longest (its padding-free mode is disabled in TRL 1.16), and on a CPU scores every position with the
vocabulary-sized output layer. Here the sequences are packed into rows as in reward.py (position ids
restart at each sequence, no attention mask, so the model keeps them apart: checked at start-up), and the
output layer runs only at the answer tokens. The loss is TRL's sigmoid DPO loss on these log-probs (a test
shows both give the same loss on the same pairs).

    batch = PairCollator(pad_id, "rows")(pairs)          # pairs: {"prompt_ids", "chosen_ids", "rejected_ids"}
    logps = enable_sequence_logps(model)(**model_inputs(batch)).logits   # 2n: chosen, rejected, chosen, ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuning.models.scoring import ScoreCollator

# The batch entries the model's forward reads (the others are counts or reference log-probs).
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "completion", "sequence", "score_index")


def positions_from_mask(attention_mask):
    """Position ids of left-padded rows as generate() numbers them: each row counts from 0 at its first real
    token (padding gets 0; it is masked). GPT-2 and other models with learned absolute positions need them on
    every forward over such rows: without them they number the padding too."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


class PairCollator:
    """Tokenized pairs as one batch: sequence 2i is pair i's prompt + chosen answer, 2i + 1 its prompt +
    rejected answer (each answer ending with EOS), laid out by scoring.ScoreCollator ("rows": packed rows
    no longer than the longest sequence; "flat": one row; "none": one padded row each, with an attention
    mask). `completion` marks the answer tokens, `sequence` which sequence each position belongs to."""

    def __init__(self, pad_id: int, mode: str = "rows", pad_to_multiple_of: int | None = None):
        self.layout = ScoreCollator(pad_id, mode, pad_to_multiple_of).layout

    def __call__(self, pairs: list[dict]) -> dict:
        sequences, prompt_lengths = [], []
        for pair in pairs:
            for key in ("chosen_ids", "rejected_ids"):
                sequences.append(list(pair["prompt_ids"]) + list(pair[key]))
                prompt_lengths.append(len(pair["prompt_ids"]))
        batch = self.layout(sequences)
        completion = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        owner = torch.zeros_like(batch["input_ids"])
        for i, (row, end) in enumerate(batch["score_index"].tolist()):
            start = end + 1 - len(sequences[i])
            completion[row, start + prompt_lengths[i]:end + 1] = True
            owner[row, start:end + 1] = i
        batch.update(completion=completion, sequence=owner)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):  # added by TRL's reference pass
            if key in pairs[0]:
                batch[key] = torch.tensor([pair[key] for pair in pairs], dtype=torch.float32)
        batch["num_real_tokens"], batch["num_pairs"] = sum(map(len, sequences)), len(pairs)  # popped by the trainer
        return batch


def model_inputs(batch: dict) -> dict:
    return {key: batch[key] for key in MODEL_KEYS if key in batch}


class _SequenceLogps:
    """Mixed into a causal LM's class by enable_sequence_logps: given `completion` and `sequence`, the forward
    returns each sequence's summed answer-token log-probs as `logits` (shape: number of sequences). Inside
    forward, so mixed-precision autocast (which wraps model.forward) covers it."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, completion=None, sequence=None,
                score_index=None, **kwargs):
        if completion is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   **kwargs)
        from transformers.modeling_outputs import CausalLMOutput

        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state
        keep = completion[:, 1:]  # position t predicts token t + 1: score the answer tokens only
        logits = self.get_output_embeddings()(hidden[:, :-1][keep]).float()
        token_logps = logits.log_softmax(-1).gather(-1, input_ids[:, 1:][keep].unsqueeze(-1)).squeeze(-1)
        sums = token_logps.new_zeros(score_index.shape[0]).index_add(0, sequence[:, 1:][keep], token_logps)
        return CausalLMOutput(logits=sums)


def enable_sequence_logps(model):
    """Give `model` (a causal LM) the per-sequence log-prob forward; its other uses are unchanged. A class, not
    an instance attribute, so replicas follow it; same name, so saving is unchanged."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft: the causal LM
    if not isinstance(inner, _SequenceLogps):
        cls = type(inner)
        inner.__class__ = type(cls.__name__, (_SequenceLogps, cls), {"__module__": cls.__module__,
                                                                     "__qualname__": cls.__qualname__})
    return model


def sigmoid_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float):
    """(loss, margins): DPO's -log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))), the mean
    over pairs, as TRL's loss_type "sigmoid" without label smoothing; margins are the implicit-reward margins."""
    margins = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return F.softplus(-margins).mean(), margins  # softplus(-m) = -log sigmoid(m), stable for any m


def packed_logps_match(model, pairs: list[dict], pad_id: int) -> tuple[bool, float, float]:
    """(same, padded, packed): does `model` keep packed sequences apart? Compares each sequence's answer
    log-probs, padded and packed into one row; padded/packed are their means."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded, packed = (model(**model_inputs(PairCollator(pad_id, mode)(pairs))).logits for mode in ("none", "flat"))
    finally:
        model.train(was_training)
    same = bool(torch.allclose(padded, packed, rtol=1e-4, atol=1e-3))
    return same, padded.mean().item(), packed.mean().item()
