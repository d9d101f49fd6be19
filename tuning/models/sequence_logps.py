"""Per-answer log-probabilities of preference pairs, computed without padding: what DPO compares.

A DPO step needs, for each pair, log pi(chosen | prompt) and log pi(rejected | prompt): the summed
log-probabilities of each answer's tokens and its EOS. TRL's DPOTrainer pads every sequence of a batch to
the longest (its padding-free mode is disabled in TRL 1.16), and on a CPU scores every position with the
vocabulary-sized output layer. Here the sequences are packed into rows as in reward.py (position ids
restart at each sequence, no attention mask, so the model keeps them apart: checked at start-up), and the
output layer runs only at the answer tokens. The loss is one of TRL's DPO losses on these log-probs (dpo_losses;
a test shows ours and TRL's give the same loss on the same pairs, for each loss type offered).

    batch = PairCollator(pad_id, "rows")(pairs)          # pairs: {"prompt_ids", "chosen_ids", "rejected_ids"}
    logps = enable_sequence_logps(model)(**model_inputs(batch)).logits   # 2n: chosen, rejected, chosen, ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# The batch entries the model's forward reads (the others are counts or reference log-probs).
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "completion", "sequence", "score_index")


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


def answer_lengths(batch: dict):
    """Each sequence's number of scored answer tokens (its answer and EOS): the positions whose log-probs the
    forward sums, counted from the same marks. IPO averages each answer's log-ratio over them."""
    keep = batch["completion"][:, 1:]
    return torch.bincount(batch["sequence"][:, 1:][keep], minlength=batch["score_index"].shape[0])


def dpo_losses(loss_type: str, chosen, rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0,
               chosen_tokens=None, rejected_tokens=None):
    """(each pair's loss, margins) for TRL's DPOTrainer loss_type `loss_type`, by TRL's formula (1.16), from the
    summed answer log-probs of the policy and the reference; the training loss is the mean over pairs. The margins
    are the implicit-reward margins beta * ((chosen - ref_chosen) - (rejected - ref_rejected)) whatever the loss,
    so accuracy and mean margin mean the same for every loss type.

    - sigmoid (DPO): -log sigmoid(margin).
    - ipo: (d - 1 / (2 beta))^2, where d is the difference of the log-ratios each averaged over its answer's
      tokens (`chosen_tokens`, `rejected_tokens`: answer_lengths), as TRL averages them: a squared loss that pulls
      d toward a fixed target instead of ever higher, so over-optimising the pairs is penalized.
    - hinge (SLiC): max(0, 1 - margin): no push at all once a pair's margin reaches 1.
    - robust (rDPO): DPO's loss made unbiased for preference labels flipped with probability `label_smoothing`
      (in [0, 0.5)): ((1 - e) * -log sigmoid(margin) - e * -log sigmoid(-margin)) / (1 - 2e)."""
    chosen_ratios, rejected_ratios = chosen - ref_chosen, rejected - ref_rejected
    margins = beta * (chosen_ratios - rejected_ratios)
    if loss_type == "sigmoid":
        return F.softplus(-margins), margins  # softplus(-m) = -log sigmoid(m), stable for any m
    if loss_type == "ipo":
        per_token = chosen_ratios / chosen_tokens.clamp(min=1) - rejected_ratios / rejected_tokens.clamp(min=1)
        return (per_token - 1 / (2 * beta)) ** 2, margins
    if loss_type == "hinge":
        return torch.relu(1 - margins), margins
    if loss_type == "robust":
        e = label_smoothing
        return ((1 - e) * F.softplus(-margins) - e * F.softplus(margins)) / (1 - 2 * e), margins
    raise ValueError(f"DPO loss type {loss_type!r}: dpo_losses computes sigmoid, ipo, hinge and robust")
