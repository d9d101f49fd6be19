"""Batches from tokenized examples: dynamic padding, or packing that keeps examples apart. The three kinds of
batch the training scripts feed a model: SFT examples with labels (SFTCollator), sequences scored at their last
token (ScoreCollator: the reward model's pairs), and preference pairs with their answer tokens marked
(PairCollator: DPO's answer log-probs); and online RL's sampled answers, packed from TRL's padded batch
(pack_samples: RLOO's and GRPO's per-token log-probs).

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

from tuning.data.chat_template import IGNORE_INDEX  # noqa: F401 (the one label without loss)
PACKING_MODES = ("none", "rows", "flat")


def positions_from_mask(attention_mask):
    """Position ids of left-padded rows as generate() numbers them: each row counts from 0 at its first real
    token (padding gets 0; it is masked). GPT-2 and other models with learned absolute positions need them on
    every forward over such rows: without them they number the padding too."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


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


class ScoreCollator:
    """Token-id sequences, or tokenized preference pairs, laid out as one batch with `score_index`.

    `score_index` (n x 2) holds the row and column of each sequence's final token, in input order; for
    pairs, sequence 2i is pair i's prompt + chosen answer and 2i + 1 its prompt + rejected answer. Modes
    as for SFTCollator: "none" pads one sequence a row (with an attention mask), "rows" packs them into
    rows no longer than the longest, "flat" into one row; packed rows restart position_ids at each
    sequence and carry no attention mask, so the model keeps them apart (checked at start-up)."""

    def __init__(self, pad_id: int, mode: str = "none", pad_to_multiple_of: int | None = None):
        if mode not in PACKING_MODES:
            raise ValueError(f"packing mode {mode!r}: choose from {', '.join(PACKING_MODES)}")
        self.pad_id, self.mode, self.multiple = pad_id, mode, pad_to_multiple_of

    def __call__(self, pairs: list[dict]) -> dict:
        sequences = []
        for pair in pairs:
            sequences += [pair["prompt_ids"] + pair["chosen_ids"], pair["prompt_ids"] + pair["rejected_ids"]]
        batch = self.layout(sequences)
        if "target" in pairs[0]:  # soft labels (reward.py --soft-labels): each pair's P(chosen is better)
            batch["targets"] = torch.tensor([pair["target"] for pair in pairs], dtype=torch.float)
        batch["num_real_tokens"], batch["num_pairs"] = sum(map(len, sequences)), len(pairs)  # popped by the trainer
        return batch

    def layout(self, sequences: list[list[int]]) -> dict:
        lengths = [len(s) for s in sequences]
        if self.mode == "none":
            bins = [[i] for i in range(len(sequences))]
        else:
            bins = pack_bins(lengths, sum(lengths) if self.mode == "flat" else max(lengths))
        width = max(sum(lengths[i] for i in members) for members in bins)
        width = width if not self.multiple else -(-width // self.multiple) * self.multiple
        input_ids = torch.full((len(bins), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(bins), width), dtype=torch.long)
        mask = torch.zeros((len(bins), width), dtype=torch.long)
        index = torch.zeros((len(sequences), 2), dtype=torch.long)
        for row, members in enumerate(bins):
            start = 0
            for i in members:
                n = lengths[i]
                input_ids[row, start:start + n] = torch.tensor(sequences[i])
                positions[row, start:start + n] = torch.arange(n)
                mask[row, start:start + n] = 1
                index[i] = torch.tensor([row, start + n - 1])
                start += n
            positions[row, start:] = torch.arange(width - start)  # trailing padding: a segment of its own
        batch = {"input_ids": input_ids, "score_index": index}
        if self.mode == "none":
            batch["attention_mask"] = mask
        else:
            batch["position_ids"] = positions
        return batch


class PairCollator:
    """Tokenized pairs as one batch: sequence 2i is pair i's prompt + chosen answer, 2i + 1 its prompt +
    rejected answer (each answer ending with EOS), laid out by collate.ScoreCollator ("rows": packed rows
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


def pack_samples(input_ids, attention_mask, logits_to_keep: int, pad_id: int, mode: str = "rows") -> dict:
    """TRL's batch of sampled answers (RLOO, GRPO: each row a left-padded prompt, then its answer right-padded to
    `logits_to_keep` columns; `attention_mask` marks the real tokens) laid out by `mode` for their log-probs, each
    sample at the positions generate() gave it (its prompt from 0, its answer after it):

    - "rows": the answers to one prompt share it: the prompt once, then each answer, which attends to the prompt
      and to itself only (a 4D mask: "attention_mask", (rows, 1, width, width), True where a token may attend);
      these groups are bin-packed into rows no longer than the longest group. The prompt is computed once for
      its --num-generations answers, in every forward and its backward.
    - "flat": every sample whole in one row, position ids restarting at each, no mask (FlashAttention's
      variable-length kernels, which take no 4D mask).
    - "none": each sample in a row of its own, right-padded, with an attention mask (models that mishandle
      both: packing_checks.packed_samples_match decides).

    "sources" (flat indices into rows x width) are the positions whose hidden states predict the answer tokens
    "targets"; "slots" where each log-prob goes in TRL's (rows, logits_to_keep) layout: row i's j-th answer token
    is slot i * logits_to_keep + j. Samples with no answer token (a mask_truncated_completions row) are left out:
    there is nothing to score."""
    if mode not in PACKING_MODES:
        raise ValueError(f"packing mode {mode!r}: choose from {', '.join(PACKING_MODES)}")
    real = attention_mask.bool().cpu()
    ids = input_ids.cpu()
    prompt_width = ids.shape[1] - logits_to_keep
    answers = real[:, prompt_width:].sum(1).tolist()
    prompts = [ids[i, :prompt_width][real[i, :prompt_width]] for i in range(len(ids))]
    if any(answers[i] and not len(prompts[i]) for i in range(len(ids))):
        raise ValueError("pack_samples: a sample has no prompt token before its answer")
    groups: dict[tuple, list[int]] = {}  # prompt -> its samples with an answer, in batch order
    for i in range(len(ids)):
        if answers[i]:
            key = tuple(prompts[i].tolist()) if mode == "rows" else (i,)
            groups.setdefault(key, []).append(i)
    members = list(groups.values())
    lengths = [len(prompts[m[0]]) + sum(answers[i] for i in m) for m in members]
    if mode == "none":
        bins = [[g] for g in range(len(members))]
    else:
        bins = pack_bins(lengths, sum(lengths) if mode == "flat" else max(lengths, default=1))
    width = max((sum(lengths[g] for g in b) for b in bins), default=1)
    packed = torch.full((len(bins), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    group = torch.full((len(bins), width), -1, dtype=torch.long)  # which group each token is in (-1: padding)
    part = torch.zeros((len(bins), width), dtype=torch.long)  # 0: the prompt, k: the group's k-th answer
    sources, targets, slots = [], [], []
    for row, bin_groups in enumerate(bins):
        start = 0
        for g in sorted(bin_groups):
            prompt = prompts[members[g][0]]
            n = len(prompt)
            packed[row, start:start + n] = prompt
            positions[row, start:start + n] = torch.arange(n)
            group[row, start:start + n] = g
            last_prompt, start = row * width + start + n - 1, start + n
            for k, i in enumerate(members[g], 1):
                a = answers[i]
                answer = ids[i, prompt_width:prompt_width + a]
                packed[row, start:start + a] = answer
                positions[row, start:start + a] = torch.arange(n, n + a)
                group[row, start:start + a], part[row, start:start + a] = g, k
                flat = row * width + start
                sources += [last_prompt, *range(flat, flat + a - 1)]  # each token predicts the next
                targets += answer.tolist()
                slots += range(i * logits_to_keep, i * logits_to_keep + a)
                start += a
        positions[row, start:] = torch.arange(width - start)  # trailing padding: a segment of its own
    device = input_ids.device
    batch = {"input_ids": packed.to(device), "position_ids": positions.to(device),
             "sources": torch.tensor(sources, dtype=torch.long, device=device),
             "targets": torch.tensor(targets, dtype=torch.long, device=device),
             "slots": torch.tensor(slots, dtype=torch.long, device=device), "attention_mask": None}
    if mode == "none":
        batch["attention_mask"] = (group >= 0).long().to(device)
    elif mode == "rows":
        order = torch.arange(width)
        same = group[:, :, None] == group[:, None, :]
        seen = part[:, None, :] == 0
        own = part[:, :, None] == part[:, None, :]
        batch["attention_mask"] = (same & (seen | own) & (order[:, None] >= order[None, :]))[:, None].to(device)
    return batch
