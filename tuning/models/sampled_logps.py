"""Per-token log-probabilities of sampled answers, computed without padding: what RLOO's and GRPO's losses and
KL penalties read, from the policy, the old policy and the reference.

TRL 1.16's online trainers score a batch of samples as rows of prompt + answer, every prompt left-padded and every
answer right-padded to the longest, with no position ids (GPT-2 then numbers the padding too), each prompt
computed once for each of its --num-generations answers, and off CUDA they run the vocabulary-sized output layer
at every position. Here (collate.pack_samples) the answers to a prompt share one copy of it, each attending to
the prompt and to itself (a 4D mask), at the positions generate() gave them, packed into rows without padding
(one padded row each for the models that mishandle that: packing_checks); the output layer runs at the answer
tokens only, in tiles (AnswerHead), so no fp32 tokens x vocabulary
tensor is ever kept, at the temperature and logit scaling of TRL's fused head; and the log-probs go back into
TRL's (rows, answer length) layout, so TRL's loss and KL read them unchanged. Tests compare the log-probs,
entropies, advantages, KL, loss and gradients with TRL's own forwards'.

    enable_sampled_logps(model)          # once; the model's other uses are unchanged
    logps, entropies = token_logps(model, input_ids, attention_mask, logits_to_keep, pad_id, temperature)

Models floor: imports data.collate.
"""

from __future__ import annotations

import inspect
import types

import torch

from tuning.data.collate import pack_samples

# Answer tokens per tile of the output layer: 256 tokens x 50,257 words x 4 bytes = 51 MB per fp32 tile of logits
# (the backward pass's tiles, of every token x a slice of the vocabulary, are as large).
TOKEN_CHUNK = 256
# The most output-layer products (answer tokens x vocabulary) the forward keeps for the backward pass, in bf16:
# 2^26 = 134 MB, 1,335 answer tokens of GPT-2's vocabulary (the update's parts of ~1,024 tokens fit).
KEPT_PRODUCTS = 2 ** 26


def head_scaling(config) -> tuple[float | None, float]:
    """(final logit soft-capping, logit scale) of a causal LM's output layer, read as TRL's add_fused_lm_head reads
    them: Gemma-2's soft cap, Cohere's logit_scale, Falcon-H1's lm_head_multiplier, Granite's logits_scaling, ..."""
    text = config.get_text_config()
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return softcap, 1.0 if scale is None else scale


def enable_sampled_logps(model):
    """Give `model` (a causal LM, or a peft model around one) the packed answer-token forward: called with
    `answer_sources` and `answer_targets` (collate.pack_samples' "sources" and "targets"), it returns the log-prob
    (and with `entropy`, the entropy) of each target under the temperature-scaled distribution at its source
    position; any other call is the model's forward as it was. Set on the instance, over whatever forward it has (TRL's fused head, accelerate's autocast),
    so every caller (DDP, FSDP, peft, disabled adapters) reaches it through the model's forward."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "_forward_before_sampled_logps" in lm.__dict__:
        return model
    previous = lm.forward

    def forward(self, *args, answer_sources=None, answer_targets=None, temperature: float = 1.0, entropy: bool = False,
                **kwargs):
        if answer_sources is None:
            return previous(*args, **kwargs)
        return answer_token_logps(self, kwargs["input_ids"], kwargs.get("attention_mask"), kwargs["position_ids"],
                                  answer_sources, answer_targets, temperature, entropy)

    signature = inspect.signature(previous)  # generate() reads the forward's parameters (logits_to_keep, ...)
    forward.__signature__ = signature.replace(parameters=[
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *signature.parameters.values()])
    lm._forward_before_sampled_logps = previous
    lm.forward = types.MethodType(forward, lm)
    return model


def answer_token_logps(lm, input_ids, attention_mask, position_ids, sources, targets, temperature: float,
                       entropy: bool):
    """(log-probs, entropies or None) of each of `targets` at the hidden state of its source position (flat
    indices into rows x width). A 4D boolean `attention_mask` (pack_samples' shared prompts) is given to the
    attention as it expects it: as is to SDPA, as 0 / -inf to be added to the scores elsewhere."""
    from transformers.utils import ModelOutput

    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_for(lm, attention_mask),
                           position_ids=position_ids, use_cache=False).last_hidden_state
    head = lm.get_output_embeddings()
    softcap, scale = head_scaling(lm.config)
    answers = hidden.reshape(-1, hidden.shape[-1])[sources].to(head.weight.device)
    backward = torch.is_grad_enabled() and (answers.requires_grad or head.weight.requires_grad)
    logps, entropies = AnswerHead.apply(answers, head.weight, head.bias, targets.to(head.weight.device), temperature,
                                        softcap, scale, entropy, backward)
    return ModelOutput(log_probs=logps, entropy=entropies)


class AnswerHead(torch.autograd.Function):
    """Log-probs (and entropies) of `targets` under the output layer at `hidden` (answer tokens x hidden size),
    in tiles of about TOKEN_CHUNK x vocabulary-size logits, none of them kept in fp32: the backward pass reads the
    forward's products in bf16 (keeps_products) or recomputes them (fp32 runs, or too many to keep).
    The logits are scaled as TRL's fused head scales them (logit scale, soft cap, 1 / temperature). The matrix
    products run in the autocast precision (bf16 on a CPU with it), as a plain autocast forward and backward would,
    with the softmax and the sums over the vocabulary in fp32. TRL's kernel (trl.kernels) makes its backward's
    products in fp32 for accuracy on GPUs; on a CPU, where bf16 products take half the time, that is the costliest
    part of an online step's update, and ours equals it in fp32 (tested).

    The forward pass tiles the tokens (each tile's log-sum-exp over the whole vocabulary). The backward pass tiles
    the vocabulary instead, every token in each tile: each slice of the weight's gradient is then one product,
    written once, where token tiles would each add a vocabulary x hidden-size product into it (converting and
    adding 38.6M numbers per tile for GPT-2: as long as the product itself, here)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, softcap, scale: float, entropy: bool,
                backward: bool):
        """`backward`: whether a backward pass will follow (grad mode on and an input that needs a gradient: in
        here grad mode is always off), so that keeping the products can pay."""
        ctx.set_materialize_grads(False)  # (an entropy only logged gets no gradient: nothing to compute for it)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        logps, entropies, lses = [], [], []
        keep = backward and keeps_products(dtype, len(targets), weight.shape[0])
        products = torch.empty(len(targets), weight.shape[0], dtype=dtype, device=hidden.device) if keep else None
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            for start in range(0, len(targets), TOKEN_CHUNK):
                tile = hidden[start:start + TOKEN_CHUNK].to(dtype) @ w.t()
                if keep:
                    products[start:start + len(tile)] = tile
                z, _ = _scaled(tile, bias, temperature, softcap, scale)
                lse = torch.logsumexp(z, -1)
                logps.append(z.gather(-1, targets[start:start + TOKEN_CHUNK, None]).squeeze(-1) - lse)
                if entropy:  # sum_j p_j (lse - z_j)
                    entropies.append(lse - (torch.softmax(z, -1) * z).sum(-1))
                lses.append(lse)
        lse = torch.cat(lses)
        out_entropy = torch.cat(entropies) if entropy else None
        ctx.save_for_backward(hidden, weight, bias, targets, lse, out_entropy if entropy else lse, products)
        ctx.settings = (dtype, temperature, softcap, scale)
        return torch.cat(logps), out_entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, bias, targets, lse, entropy, products = ctx.saved_tensors
        dtype, temperature, softcap, scale = ctx.settings
        device = hidden.device.type
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]  # (under LoRA the output layer is frozen)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        words, tokens = weight.shape[0], len(targets)
        width = max(1, TOKEN_CHUNK * words // max(1, tokens))  # (a tile as large as the forward's)
        g = None if grad_logps is None else grad_logps.float()[:, None]
        with torch.autocast(device, enabled=False):
            h = hidden.to(dtype)
            for start in range(0, words, width):
                end = min(start + width, words)
                w = weight[start:end].to(dtype)
                z, dz = _scaled(h @ w.t() if products is None else products[:, start:end].to(torch.float32, copy=True),
                                None if bias is None else bias[start:end], temperature, softcap, scale)
                logp = z.sub_(lse[:, None])
                p = logp.exp()
                grad = torch.zeros_like(p) if g is None else p.mul(-g)  # d log p_target / d z_j = 1[j = target] - p_j
                if g is not None:
                    inside = ((targets >= start) & (targets < end)).nonzero().squeeze(1)
                    grad.index_put_((inside, targets[inside] - start), g[inside, 0], accumulate=True)
                if grad_entropy is not None:  # d entropy / d z_j = -p_j (log p_j + entropy)
                    grad.sub_(p.mul_(logp.add_(entropy[:, None])).mul_(grad_entropy.float()[:, None]))
                if not isinstance(dz, float) or dz != 1.0:
                    grad.mul_(dz)
                grad = grad.to(dtype)
                if grad_hidden is not None:
                    grad_hidden += (grad @ w).float()
                if grad_weight is not None:
                    grad_weight[start:end] = (grad.t() @ h).float()
                if grad_bias is not None:
                    grad_bias[start:end] = grad.float().sum(0)
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None, None, None)


def keeps_products(dtype, tokens: int, words: int) -> bool:
    """Whether AnswerHead's forward keeps the output layer's products (answer tokens x vocabulary) for the backward
    pass, which then need not recompute them (a quarter of the layer's work in the policy update): in a 2-byte
    precision (bf16: 100 MB for 1,024 answer tokens of GPT-2's), up to KEPT_PRODUCTS of them, as in a part of the
    update (a batch whose update is not split recomputes them); not in fp32."""
    return dtype.itemsize < 4 and tokens * words <= KEPT_PRODUCTS


def _scaled(products, bias, temperature: float, softcap, scale: float):
    """(the output layer's logits from its products h W^T, as the sampler and TRL's loss see them, in fp32; their
    derivative with respect to the layer's own output, h W^T + b: a number, or a tensor under a soft cap)."""
    raw = products.float()
    if bias is not None:
        raw += bias.float()
    if softcap is None:
        factor = scale / temperature
        return (raw if factor == 1.0 else raw.mul_(factor)), factor
    t = torch.tanh(raw.mul_(scale / softcap))
    return t * (softcap / temperature), (1 - t * t).mul_(scale / temperature)


def padded_samples(prompts: list[list[int]], answers: list[list[int]], pad_id: int, device=None):
    """(input_ids, attention_mask, logits_to_keep) of prompt + answer samples laid out as TRL's online trainers lay
    them out: each prompt left-padded to the longest, each answer right-padded to the longest."""
    left, right = max(map(len, prompts)), max(map(len, answers))
    ids = [[pad_id] * (left - len(p)) + p + a + [pad_id] * (right - len(a)) for p, a in zip(prompts, answers)]
    mask = [[0] * (left - len(p)) + [1] * (len(p) + len(a)) + [0] * (right - len(a)) for p, a in zip(prompts, answers)]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device), right


def attention_for(model, mask):
    """pack_samples' 4D boolean mask as `model`'s attention takes it: as is for SDPA (True: may attend), as 0 / the
    lowest value, added to the scores, for eager attention; a 2D mask, or none, unchanged."""
    if mask is None or mask.dim() != 4 or model.config._attn_implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(~mask, torch.finfo(model.dtype).min)


def token_logps(model, input_ids, attention_mask, logits_to_keep: int, pad_id: int, temperature: float = 1.0,
                entropy: bool = False, packing: str = "rows"):
    """(log-probs, entropies or None) of TRL's batch of samples, each (rows, logits_to_keep) as TRL lays them out:
    row i's j-th answer token at [i, j], 0 where the answer has ended; the samples laid out by `packing`
    (collate.pack_samples). `model` has enable_sampled_logps; call it under the run's autocast, with or without
    gradients."""
    batch = pack_samples(input_ids, attention_mask, logits_to_keep, pad_id, packing)
    rows = input_ids.shape[0]
    if batch["slots"].numel() == 0:
        zeros = torch.zeros((rows, logits_to_keep), device=input_ids.device)
        return zeros, zeros.clone() if entropy else None
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], answer_sources=batch["sources"], answer_targets=batch["targets"],
                temperature=temperature, entropy=entropy)

    def laid_out(values):
        flat = values.new_zeros(rows * logits_to_keep).index_copy(0, batch["slots"].to(values.device), values)
        return flat.view(rows, logits_to_keep)

    return laid_out(out.log_probs), laid_out(out.entropy) if entropy else None
