"""Device, precision, and the model + tokenizer to fine-tune.

    python model.py --model ../shared/distilgpt2-config --init scratch   # what would be trained, and where

Any Hugging Face causal LM works: a Hub id or a local directory. `--init scratch` builds the same
architecture from its config.json with random weights (a directory with only config.json and
tokenizer files is enough), for experiments and offline runs.
"""

from __future__ import annotations

import os

from tuning.cli import UserError

# ---- settings (each has a flag: INIT -> --init) ----
MODEL = "distilgpt2"  # Hub id or local directory of a causal LM (or of a config.json with --init scratch)
INIT = "pretrained"  # pretrained|scratch: load the weights, or random weights from the config
DEVICE = "auto"  # auto|cuda|mps|cpu: auto picks CUDA, then Apple MPS, then CPU
PRECISION = "auto"  # auto|fp32|bf16|fp16: auto = bf16 where supported, fp16 on older GPUs, fp32 on MPS


# Added to errors about a Hub id that could not be loaded.
OFFLINE_HINT = "; a model downloaded before loads offline with HF_HUB_OFFLINE=1"


class ModelError(UserError):
    """A model or tokenizer that can't be loaded, reported without a traceback."""


HUB_PROBE_SECONDS = 3.0  # how long the one check that the Hugging Face Hub is reachable may take


def is_hub_id(name: str) -> bool:
    """Does `name` (a --model, --dataset, ... value) name something on the Hugging Face Hub, not a local path?"""
    import re

    return bool(name) and not os.path.exists(os.path.expanduser(name)) and bool(
        re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.endswith((".json", ".jsonl", ".gz"))


def offline_unless_hub_reachable(names, say=print) -> None:
    """When some of `names` are Hub ids and the Hub can't be reached, switch this process to offline mode before
    anything asks the Hub: copies already downloaded are used, and a missing one fails at once with a hint,
    instead of a minute of retries. Skipped behind a proxy (a direct connection says nothing there) and when
    offline mode is already on."""
    import socket
    from urllib.parse import urlparse

    if not any(is_hub_id(name) for name in names) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return
    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_PROBE_SECONDS).close()
        return
    except OSError:
        pass
    import huggingface_hub.constants
    import datasets.config

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    say(f"note: the Hugging Face Hub ({endpoint.hostname}) can't be reached, so only copies already downloaded are "
        "used (as with HF_HUB_OFFLINE=1); `--smoke` runs with no download at all")


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


def cuda_capability(device) -> tuple[int, int]:
    """The CUDA GPU's compute capability, e.g. (7, 5) for a T4 and (8, 0) for an A100."""
    import torch

    return tuple(torch.cuda.get_device_capability(device))


def cuda_native_bf16(device) -> bool:
    """bf16 in hardware: Ampere (compute capability 8.0) and newer. torch.cuda.is_bf16_supported() also counts
    the slow emulated bf16 of a T4 or V100."""
    return cuda_capability(device) >= (8, 0)


def resolve_precision(precision: str, device) -> tuple[str, str]:
    """(precision, reason) with 'auto' resolved for `device` and explicit choices checked."""
    kind = getattr(device, "type", device)
    if precision == "auto":
        if kind == "cuda":
            major, minor = cuda_capability(device)
            if cuda_native_bf16(device):
                return "bf16", f"CUDA GPU with native bf16 (compute capability {major}.{minor})"
            return "fp16", f"CUDA GPU without native bf16 (compute capability {major}.{minor}): fp16 with loss scaling"
        if kind == "mps":
            return "fp32", "Apple MPS: mixed precision training is not reliable there"
        if cpu_supports_bf16():
            return "bf16", "CPU with native bf16 (AVX512-BF16/AMX): bf16 autocast"
        return "fp32", "CPU without native bf16: fp32"
    if precision == "fp16" and kind != "cuda":
        raise ModelError(f"--precision fp16 needs a CUDA GPU (device is {kind}); use bf16 or fp32")
    if precision == "bf16" and kind == "cuda" and not cuda_native_bf16(device):
        major, minor = cuda_capability(device)
        raise ModelError(f"--precision bf16: this GPU (compute capability {major}.{minor}) has no native bf16 "
                         "and would emulate it slowly; use fp16")
    return precision, "set explicitly"


def load_tokenizer(name_or_path: str = MODEL, flag: str = "--model", smoke_hint: bool = False):
    """The model's fast tokenizer; pad = EOS when it has no pad token (the collator masks padding by position)."""
    from transformers import AutoTokenizer

    _check_local(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:
        raise ModelError(f"could not load the tokenizer of {name_or_path!r} ({type(err).__name__}: {err}). "
                         f"Offline? Pass a local directory with {flag}{', or try --smoke' if smoke_hint else ''}"
                         f"{OFFLINE_HINT if is_hub_id(name_or_path) else ''}.") from None
    return ready_tokenizer(tokenizer, name_or_path)


def ready_tokenizer(tokenizer, name: str = MODEL):
    """The checks and settings every tokenizer gets: an EOS is required, pad = EOS when it has none."""
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {name!r} has no EOS token, so answers could never stop")
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

    from tuning.models import lora

    _check_local(name_or_path)
    refuse_reward_model(name_or_path)
    if lora.is_adapter_dir(name_or_path):  # a LoRA run's output: its base with the adapter merged in
        model = lora.load_merged(name_or_path, lambda base: load_model(base, "pretrained", None, dtype))
        # Named by the adapter dir, not its base: a copy made from the name (TRL's RLOO reference) is this model.
        model.name_or_path = model.config._name_or_path = os.path.abspath(os.path.expanduser(name_or_path))
        return _ready(model, tokenizer)
    try:
        if init == "scratch":
            config = AutoConfig.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or torch.float32)
    except Exception as err:
        hint = " It holds no weights: add --init scratch." if _has_config_only(name_or_path) else (
            f" Offline? Pass a local directory{OFFLINE_HINT}." if is_hub_id(name_or_path) else "")
        raise ModelError(f"could not load model {name_or_path!r} ({type(err).__name__}: {err}).{hint}") from None
    return _ready(model, tokenizer)


def refuse_reward_model(path: str, flag: str = "") -> None:
    """A reward model (reward.py's output, full or a LoRA adapter) where a causal LM goes is refused in one line:
    loaded as a causal LM, its score head would be dropped and its answers would be noise."""
    import json

    from tuning.models import lora

    directory = os.path.expanduser(path)
    if lora.is_adapter_dir(directory):
        what = "a reward model's LoRA adapter (reward.py --lora)" if lora.adapter_task(directory) == "SEQ_CLS" else ""
    elif os.path.isfile(os.path.join(directory, "config.json")):
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
            kinds = json.load(handle).get("architectures") or []
        reward = [kind for kind in kinds if kind.endswith("ForSequenceClassification")]
        what = f"a reward model ({reward[0]}, reward.py's output)" if reward else ""
    else:
        return
    if what:
        raise ModelError(f"{flag + ' ' if flag else ''}{path} holds {what}, not a causal language model: pass an SFT "
                         "model here, train.py's or align.py's output (a reward model goes to --reward-model)")


def _ready(model, tokenizer):
    model.loss_type = "ForCausalLM"  # the standard shifted cross-entropy; also silences a warning for GPT-2
    if tokenizer is not None:
        set_generation_ids(model, tokenizer)
    return model


class _ResponseOnlyLogits:
    """Mixed into a causal LM's class by enable_response_only_logits (see there).

    The forward reads the body and head of the module it is called on, so a replica made by
    nn.DataParallel or torch.nn.parallel.replicate computes with the replica's own weights.
    """

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                num_items_in_batch=None, **kwargs):
        if labels is None or kwargs.get("return_dict") is False:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        import torch.nn.functional as F
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("use_cache", None)
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False, **kwargs).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.get_output_embeddings()(hidden[:, :-1][keep]).float()  # only the positions that carry loss
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1))
        return CausalLMOutputWithPast(loss=loss)


def _response_only_class(cls):
    # Same name and module, so save_pretrained still writes the original architecture into config.json.
    return type(cls.__name__, (_ResponseOnlyLogits, cls), {"__module__": cls.__module__,
                                                           "__qualname__": cls.__qualname__})


def enable_response_only_logits(model, check_batch: dict) -> bool:
    """Make training forward passes compute the output layer and loss only where labels are not -100.

    With the loss on the response only, ~40% of positions carry no loss, and DistilGPT2's 50,257-word
    output layer is half its weights: skipping those positions saves their share of that cost and
    never builds the full batch x length x vocab logits. The loss is the same shifted cross-entropy
    (sum / num_items_in_batch during training, so gradient accumulation stays exact).

    Only models whose own loss it reproduces exactly are changed: `check_batch` (a collated training
    batch) goes through both forwards, and a model whose loss differs (logit scaling or soft-capping as
    in Granite and Gemma 2, an MoE router loss, ...) keeps its own forward. Returns whether it was enabled.
    """
    original = type(model)
    if isinstance(model, _ResponseOnlyLogits):
        return True
    if transforms_logits(model.config):  # known from the config, even where random weights would hide it
        return False
    model.__class__ = _response_only_class(original)  # a class, not an instance attribute: replicas follow it
    if not _same_loss(model, original.forward, check_batch):
        model.__class__ = original
        return False
    return True


# Config settings that change the logits after the output layer, with the value that leaves them alone.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logits_scaling": 1.0, "logit_scale": 1.0,
                    "lm_head_multiplier": 1.0, "output_logits_multiplier": 1.0}


def transforms_logits(config) -> bool:
    """Does the config say the model scales or soft-caps its logits (Gemma 2, Granite, Cohere, Falcon-H1)?"""
    return any(getattr(config, name, neutral) not in (neutral, None, 0) for name, neutral in LOGIT_TRANSFORMS.items())


def _same_loss(model, own_forward, batch: dict) -> bool:
    """Does `model` give the logits (where labels are set) and the loss of `own_forward` on `batch`?"""
    import torch

    inputs = {k: v for k, v in batch.items() if k != "num_real_tokens"}
    keep = inputs["labels"][:, 1:] != -100
    ours = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: ours.append(out))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            own = own_forward(model, **inputs)
            ours_loss = model(**inputs).loss
        own_logits = own.logits[:, :-1][keep].float()
        return (len(ours) == 2 and ours[1].shape == own_logits.shape  # [0] is the head inside own_forward
                and bool(torch.allclose(own_logits, ours[1].float(), rtol=1e-4, atol=1e-4))
                and bool(torch.allclose(own.loss.float(), ours_loss.float(), rtol=1e-5, atol=1e-6)))
    except torch.OutOfMemoryError:
        raise
    except Exception:  # a family whose body does not take these inputs: keep its own forward
        return False
    finally:
        hook.remove()
        model.train(was_training)


def context_limit(config) -> int | None:
    """The most tokens a model of this config reads at once (None where the config does not say)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def positions_from_mask(attention_mask):
    """Position ids of left-padded rows as generate() numbers them: each row counts from 0 at its first real
    token (padding gets 0; it is masked). GPT-2 and other models with learned absolute positions need them on
    every forward over such rows: without them they number the padding too."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and any others in the generation config (Llama 3)."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [] if configured is None else [configured]
    return [tokenizer.eos_token_id] + [i for i in configured if i != tokenizer.eos_token_id]


def set_generation_ids(model, tokenizer) -> None:
    """EOS and pad ids in the config and generation config, so generation stops at EOS after saving.

    The tokenizer's EOS is added to (never replaces) a list of stop ids that the model already has. Generation
    reads the pad id from the generation config; the model config gets none where pad = EOS, so that a reward
    model built on this model (a reward.py --lora adapter names it as its base) never reads its score at the
    last token that is not EOS, the token before the answer's EOS, as Hugging Face's own forward would."""
    stops = stop_token_ids(model, tokenizer)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = stops if len(stops) > 1 and cfg is model.generation_config else tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    pad_is_eos = tokenizer.pad_token_id == tokenizer.eos_token_id
    model.config.pad_token_id = None if pad_is_eos else tokenizer.pad_token_id


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

    from tuning import cli

    args = cli.parse_or_exit(cli.build_parser(sys.modules[__name__]), lambda a: None)
    try:
        device = get_device(args.device)
        precision, why = resolve_precision(args.precision, device)
        print(f"device: {device}\nprecision: {precision} ({why})", flush=True)  # needs no download
        tok = load_tokenizer(args.model)
        lm = load_model(args.model, args.init, tok)
    except ModelError as error:
        cli.fail(str(error))
    print(f"model: {args.model} ({args.init}), {type(lm).__name__}, {count_parameters(lm) / 1e6:.1f}M parameters")
    print(f"tokenizer: {len(tok)} tokens, eos={tok.eos_token!r} ({tok.eos_token_id}), pad id {tok.pad_token_id}")
