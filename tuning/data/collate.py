"""Batches from tokenized examples: dynamic padding, or packing that keeps examples apart.

Padding is always labelled -100 by position, never by token id, so a pad id equal to EOS can't
hide the real EOS from the loss.

Packing modes (the examples of a batch stay the same; only their layout changes):
- "none": one example per row, right-padded to the longest in the batch, with an attention mask.
- "rows": the batch's examples are bin-packed into rows no longer than its longest example.
  No attention_mask; position_ids restart at 0 for each example, from which transformers builds
  a block-diagonal causal mask (GPT-2 does so only when use_cache is off).
- "flat": all examples in one row, for FlashAttention's variable-length kernels on CUDA.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
PACKING_MODES = ("none", "rows", "flat")


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped into bins whose total length is <= capacity."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


class SFTCollator:
    """Callable collator for the Trainer; `mode` is one of PACKING_MODES."""

    def __init__(self, pad_id: int, mode: str = "none", pad_to_multiple_of: int | None = None):
        if mode not in PACKING_MODES:
            raise ValueError(f"packing mode {mode!r}: choose from {', '.join(PACKING_MODES)}")
        self.pad_id, self.mode, self.multiple = pad_id, mode, pad_to_multiple_of

    def _width(self, n: int) -> int:
        m = self.multiple
        return n if not m else -(-n // m) * m

    def __call__(self, features: list[dict]) -> dict:
        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) for f in features]
        real_tokens = sum(map(len, ids))
        if self.mode == "none":
            batch = self._pad(ids, labels)
        else:
            capacity = sum(map(len, ids)) if self.mode == "flat" else max(map(len, ids))
            batch = self._pack(ids, labels, pack_bins([len(x) for x in ids], capacity))
        batch["num_real_tokens"] = real_tokens  # popped by the trainer for an honest tokens/s figure
        return batch

    def _pad(self, ids, labels) -> dict:
        width = self._width(max(map(len, ids)))
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        out_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, (x, y) in enumerate(zip(ids, labels)):
            input_ids[row, : len(x)] = torch.tensor(x)
            out_labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        return {"input_ids": input_ids, "labels": out_labels, "attention_mask": mask}

    def _pack(self, ids, labels, bins) -> dict:
        width = self._width(max(sum(len(ids[i]) for i in b) for b in bins))
        input_ids = torch.full((len(bins), width), self.pad_id, dtype=torch.long)
        out_labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(bins), width), dtype=torch.long)
        for row, members in enumerate(bins):
            start = 0
            for i in members:
                n = len(ids[i])
                input_ids[row, start:start + n] = torch.tensor(ids[i])
                out_labels[row, start:start + n] = torch.tensor(labels[i])
                # The first token of an example must not be predicted from the previous example.
                out_labels[row, start] = IGNORE_INDEX
                positions[row, start:start + n] = torch.arange(n)
                start += n
            # Trailing padding forms its own segment, so no real token ever attends to it.
            positions[row, start:] = torch.arange(width - start)
        return {"input_ids": input_ids, "labels": out_labels, "position_ids": positions}


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
