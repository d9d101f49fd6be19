"""Does a model keep sequences packed into one row apart? The start-up checks of every training script: the same
sequences laid out one a row (with an attention mask) and packed into one row (position ids restarting at each,
no mask) must give the same numbers. Models that build the block mask from position_ids (GPT-2, Llama, Qwen2, ...)
pass; OPT, BLOOM and MPT let packed sequences attend to each other, and train padded instead.

Models floor: imports data.collate and the models' own forwards.
"""

from __future__ import annotations

import torch

from tuning.data.collate import PairCollator, ScoreCollator, SFTCollator
from tuning.models.sequence_logps import model_inputs


def packed_loss_matches(model, examples: list[dict], pad_id: int) -> tuple[bool, float, float]:
    """(same, padded loss, packed loss): does `model` keep packed examples apart?

    The per-token response losses of `examples` laid out one per row (with an attention mask) are
    compared with those of the same examples packed into one row without a mask, position ids
    restarting at each. Models that build the block mask from position_ids (GPT-2, Llama, Qwen2, ...)
    agree; OPT, BLOOM and MPT let packed examples attend to each other.
    """
    import torch.nn.functional as F

    def token_losses(batch):  # sorted, since packing reorders the examples
        labels = batch.pop("labels")[:, 1:].reshape(-1)
        batch.pop("num_real_tokens", None)
        logits = model(**batch, use_cache=False).logits[:, :-1].float()
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="none")
        return losses[labels != -100].sort().values

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded = token_losses(SFTCollator(pad_id, "none")(examples))
            try:
                packed = token_losses(SFTCollator(pad_id, "flat")(examples))
            except Exception:  # e.g. a forward without position_ids
                return False, padded.mean().item(), float("nan")
    finally:
        model.train(was_training)
    same = packed.shape == padded.shape and bool(torch.allclose(padded, packed, rtol=1e-5, atol=1e-5))
    return same, padded.mean().item(), packed.mean().item()


def packed_scores_match(model, sequences: list[list[int]], pad_id: int) -> tuple[bool, float, float]:
    """(same, padded, packed): does `model` keep packed sequences apart? Compares the body's hidden states
    at the scored tokens (the score head is still zero), padded and packed; padded/packed are their means."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = {mode: ScoreCollator(pad_id, mode).layout(sequences) for mode in ("none", "flat")}
            index = {mode: batch["score_index"] for mode, batch in batches.items()}
            hidden = {mode: model.base_model(**{k: v for k, v in b.items() if k != "score_index"},
                                             use_cache=False).last_hidden_state
                      for mode, b in batches.items()}
    finally:
        model.train(was_training)
    # At the scored position: the answer's last token, one before each sequence's EOS (scoring._ScoreAtIndex).
    padded = hidden["none"][index["none"][:, 0], index["none"][:, 1] - 1]
    packed = hidden["flat"][index["flat"][:, 0], index["flat"][:, 1] - 1]
    same = bool(torch.allclose(padded, packed, rtol=1e-4, atol=1e-4))
    return same, padded.mean().item(), packed.mean().item()


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


def packed_samples_match(model, samples: list[tuple[list[int], list[int]]], pad_id: int,
                         mode: str = "rows") -> tuple[bool, float, float]:
    """(same, padded, packed): does `model` (with sampled_logps.enable_sampled_logps) score samples laid out by
    `mode` as it scores them one padded row each? Compares the per-token log-probs of (prompt ids, answer ids)
    samples, in fp32; padded/packed are their means. Give each prompt several answers of different lengths, so that
    "rows" shares it. A model that can't take the layout (a 4D mask: BLOOM's ALiBi) does not match, and neither does
    one with a sliding attention window, which a 4D mask would override (Mistral, Gemma 2 and 3, ...)."""
    from tuning.models.sampled_logps import padded_samples, token_logps

    text = model.config.get_text_config()
    if mode == "rows" and getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False, float("nan"), float("nan")
    ids, mask, keep = padded_samples([p for p, _ in samples], [a for _, a in samples], pad_id,
                                     next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded = token_logps(model, ids, mask, keep, pad_id, packing="none")[0]
            try:
                packed = token_logps(model, ids, mask, keep, pad_id, packing=mode)[0]
            except Exception:  # e.g. a model that builds its attention bias from a 2D mask
                return False, padded.mean().item(), float("nan")
    finally:
        model.train(was_training)
    same = bool(torch.allclose(padded, packed, rtol=1e-4, atol=1e-4))
    return same, padded.mean().item(), packed.mean().item()
