"""Device, precision, and the model + tokenizer to fine-tune.

    python model.py --model ../shared/distilgpt2-config --init scratch   # what would be trained, and where

Any Hugging Face causal LM works: a Hub id or a local directory. `--init scratch` builds the same
architecture from its config.json with random weights (a directory with only config.json and
tokenizer files is enough), for experiments and offline runs.
"""

from __future__ import annotations

import os

from cli import UserError

# ---- settings (each has a flag: INIT -> --init) ----
MODEL = "distilgpt2"  # Hub id or local directory of a causal LM (or of a config.json with --init scratch)
INIT = "pretrained"  # pretrained|scratch: load the weights, or random weights from the config
DEVICE = "auto"  # auto|cuda|mps|cpu: auto picks CUDA, then Apple MPS, then CPU
PRECISION = "auto"  # auto|fp32|bf16|fp16: auto = bf16 where supported, fp16 on older GPUs, fp32 on MPS


class ModelError(UserError):
    """A model or tokenizer that can't be loaded, reported without a traceback."""


def get_device(requested: str = DEVICE):
    """torch.device for `requested`; 'auto' picks CUDA, then MPS, then CPU."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA GPU is visible to PyTorch (is the CUDA build of torch installed?)")
    if requested == "mps" and not mps:
        raise ModelError("--device mps: Apple MPS is not available on this machine")
    if requested not in ("cuda", "mps", "cpu"):
        raise ModelError(f"--device {requested!r}: choose auto, cuda, mps or cpu")
    return torch.device(requested)


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 math (AVX512-BF16 or AMX); elsewhere bf16 autocast is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:  # macOS, Windows: no cheap check, so stay with fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device) -> tuple[str, str]:
    """(precision, reason) with 'auto' resolved for `device` and explicit choices checked."""
    import torch

    kind = getattr(device, "type", device)
    if precision == "auto":
        if kind == "cuda":
            if torch.cuda.is_bf16_supported():
                return "bf16", "CUDA GPU with bf16 support"
            return "fp16", "CUDA GPU without bf16: fp16 with loss scaling"
        if kind == "mps":
            return "fp32", "Apple MPS: mixed precision training is not reliable there"
        if cpu_supports_bf16():
            return "bf16", "CPU with native bf16 (AVX512-BF16/AMX): bf16 autocast"
        return "fp32", "CPU without native bf16: fp32"
    if precision == "fp16" and kind != "cuda":
        raise ModelError(f"--precision fp16 needs a CUDA GPU (device is {kind}); use bf16 or fp32")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelError("--precision bf16: this GPU does not support bf16; use fp16")
    return precision, "set explicitly"


def load_tokenizer(name_or_path: str = MODEL, flag: str = "--model"):
    """The model's fast tokenizer; pad = EOS when it has no pad token (the collator masks padding by position)."""
    from transformers import AutoTokenizer

    _check_local(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:
        raise ModelError(f"could not load the tokenizer of {name_or_path!r} ({type(err).__name__}: {err}). "
                         f"Offline? Pass a local directory with {flag}, or try --smoke.") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {name_or_path!r} has no EOS token, so answers could never stop")
    if tokenizer.pad_token_id is None:
        # Padding never reaches the loss (labels of padding are -100 by position, not by token id),
        # so reusing EOS as pad keeps the vocabulary unchanged and the real EOS keeps its label.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(name_or_path: str = MODEL, init: str = INIT, tokenizer=None, dtype=None):
    """A causal LM from pretrained weights or, with init='scratch', random weights from its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_local(name_or_path)
    try:
        if init == "scratch":
            config = AutoConfig.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or torch.float32)
    except Exception as err:
        hint = " It holds no weights: add --init scratch." if _has_config_only(name_or_path) else ""
        raise ModelError(f"could not load model {name_or_path!r} ({type(err).__name__}: {err}).{hint}") from None
    model.loss_type = "ForCausalLM"  # the standard shifted cross-entropy; also silences a warning for GPT-2
    if tokenizer is not None:
        set_generation_ids(model, tokenizer)
    return model


def enable_response_only_logits(model) -> bool:
    """Make training forward passes compute the output layer and loss only where labels are not -100.

    With the loss on the response only, ~40% of positions carry no loss, and DistilGPT2's 50,257-word
    output layer is half its weights: skipping those positions saves their share of that cost and
    never builds the full batch x length x vocab logits. The loss is the same shifted cross-entropy
    (sum / num_items_in_batch during training, so gradient accumulation stays exact). The forward is
    replaced on the instance, so the Trainer's autocast and DDP wrappers still go through it.
    Returns False (and changes nothing) for models whose logits get extra processing.
    """
    import types

    import torch.nn.functional as F
    from transformers.modeling_outputs import CausalLMOutputWithPast

    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    dense_forward = model.forward
    body, head = model.base_model, model.get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                num_items_in_batch=None, **kwargs):
        if labels is None or kwargs.get("return_dict") is False:
            return dense_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs.pop("use_cache", None)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False, **kwargs).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        logits = head(hidden[:, :-1][keep]).float()  # only the positions that carry loss
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1))
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
    return True


def set_generation_ids(model, tokenizer) -> None:
    """EOS and pad ids in the config and generation config, so generation stops at EOS after saving."""
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id


def _check_local(name_or_path: str) -> None:
    if name_or_path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ModelError(f"{name_or_path}: no such directory")


def _has_config_only(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) and not any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(path))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    import sys

    import cli

    args = cli.parse_or_exit(cli.build_parser(sys.modules[__name__]), lambda a: None)
    try:
        device = get_device(args.device)
        precision, why = resolve_precision(args.precision, device)
        tok = load_tokenizer(args.model)
        lm = load_model(args.model, args.init, tok)
    except ModelError as error:
        cli.fail(str(error))
    print(f"device: {device}\nprecision: {precision} ({why})")
    print(f"model: {args.model} ({args.init}), {type(lm).__name__}, {count_parameters(lm) / 1e6:.1f}M parameters")
    print(f"tokenizer: {len(tok)} tokens, eos={tok.eos_token!r} ({tok.eos_token_id}), pad id {tok.pad_token_id}")
