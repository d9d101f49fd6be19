"""The reward model's trainer: the Hugging Face Trainer with the run layer (trainer.RunLayer), the pairwise loss, an
evaluation in pairwise accuracy, and the picture of the held-out reward margins."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from transformers import Trainer

from tuning.models.scoring import pairwise_stats
from tuning.runs.trainer import RunLayer


def pairwise_loss(scores: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged over pairs; `scores` alternate chosen, rejected. With soft
    `targets` t (P(chosen is better)), the cross-entropy against them: -t log sigmoid(m) - (1 - t) log sigmoid(-m)."""
    margins = (scores[0::2] - scores[1::2]).squeeze(-1)
    if targets is None:
        return F.softplus(-margins).mean()  # softplus(-m) = -log sigmoid(m), stable for any m
    targets = targets.to(margins.dtype)
    return (targets * F.softplus(-margins) + (1 - targets) * F.softplus(margins)).mean()


class RewardTrainer(RunLayer, Trainer):
    """Batches from collate.ScoreCollator: each pair's chosen and rejected answers in the same batch,
    scored at the answer's last token (one before the EOS that score_index marks), never at a position guessed from
    pad_token_id."""

    COUNTS = {"num_real_tokens": "real_tokens", "num_pairs": "pairs"}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs.pop("targets", None)
        outputs = model(**inputs)
        loss = pairwise_loss(outputs.logits, targets)
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval") -> dict:
        """Pairwise accuracy (ties count half), loss and mean margin on the held-out pairs; each process
        scores every world_size-th pair. The margins themselves come back under PREFIX_margins."""
        from accelerate.utils import gather_object

        margins, started = [], time.perf_counter()
        for batch, real in self.evaluation_batches(eval_dataset):
            batch.pop("targets", None)  # held-out accuracy is against the chosen answer, soft labels or not
            scores = self.model(**batch).logits.float()
            margins += (scores[0::2] - scores[1::2])[:real].tolist()
        margins = gather_object(margins) if self.args.world_size > 1 else margins
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in pairwise_stats(margins).items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - started, 4)
        return {**self.report_evaluation(metrics), f"{metric_key_prefix}_margins": margins}
