"""LoRA adapters (through peft) for every training stage, and model dirs that hold an adapter.

    python model.py --model ../shared/distilgpt2-config --init scratch   # ends with the layers auto adapts

Full fine-tuning with AdamW needs about 16 bytes a parameter; LoRA trains small low-rank matrices beside
the frozen weights of every linear layer in the attention and MLP blocks, and saves only those. An adapter
dir (adapter_config.json + adapter_model.safetensors) names its base model, so every script that takes a
model dir takes an adapter dir too, with no extra flag.

Models floor, beside loading.py: it imports cli, and loading inside functions (to load an adapter's base).
"""

from __future__ import annotations

import json
import os
import warnings

from tuning.cli import UserError

# peft 0.21 still asks transformers for its old activation-checkpointing names.
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)

LORA_TARGET = "auto"  # the default: every linear layer of the attention and MLP blocks (or a comma list of names)

# What peft writes beside adapter_model.safetensors.
ADAPTER_CONFIG = "adapter_config.json"
# Modules that are never adapted: the output layer (tied to the embeddings in GPT-2) and a reward head.
NOT_ADAPTED = ("lm_head", "score", "classifier", "embed_out")


class LoraError(UserError):
    """A LoRA setting or an adapter dir that can't be used, reported without a traceback."""


def problems(args) -> list[str]:
    """What is wrong with a training script's --lora settings (LORA_R, LORA_ALPHA, LORA_DROPOUT, MERGE)."""
    found = [f"--lora-r must be >= 1 (got {args.lora_r})"] if args.lora_r < 1 else []
    if args.lora_alpha <= 0:
        found.append(f"--lora-alpha must be > 0 (got {args.lora_alpha})")
    if not 0 <= getattr(args, "lora_dropout", 0.0) < 1:  # (reward.py and align.py train without dropout)
        found.append(f"--lora-dropout must be in [0, 1) (got {args.lora_dropout})")
    if args.merge and not args.lora:
        found.append("--merge: only with --lora (a full fine-tune already saves full weights)")
    if args.lora and getattr(args, "init", "pretrained") == "scratch":
        found.append("--lora with --init scratch: LoRA adapts trained weights, and random ones would stay random")
    return found


def linear_layers(model) -> list[str]:
    """The names (last part of the module path, as peft matches them) of the model's linear layers inside its
    blocks: nn.Linear, and GPT-2's Conv1D (a linear layer with transposed weights); sorted, without the output
    layer or a reward head."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = {path.rsplit(".", 1)[-1] for path, module in model.named_modules()
             if isinstance(module, (torch.nn.Linear, Conv1D)) and "." in path and ".lora_" not in path
             and not path.endswith(".base_layer")}  # (peft's own layers, where adapters are attached already)
    return sorted(name for name in names if name not in NOT_ADAPTED)


def resolve_targets(model, target: str = LORA_TARGET) -> list[str]:
    """--lora-target as layer names: 'auto' = every linear layer of the blocks (GPT-2: c_attn, c_fc, c_proj;
    Llama/Qwen/Mistral: q,k,v,o,gate,up,down _proj), or a comma list checked against the model's layers."""
    available = linear_layers(model)
    if target.strip() == "auto":
        if not available:
            raise LoraError(f"--lora-target auto: {type(model).__name__} has no linear layers to adapt")
        return available
    wanted = [name.strip() for name in target.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in available]
    if not wanted or unknown:
        raise LoraError(f"--lora-target {target!r}: {'no layer named ' + ', '.join(unknown) if unknown else 'empty'}"
                        f"; {type(model).__name__}'s linear layers are {', '.join(available)} (or use auto)")
    return wanted


def add_lora(model, base: str, r: int, alpha: float, dropout: float, target: str = LORA_TARGET,
             reward_head: bool = False, *, seed: int):
    """`model` wrapped by peft with fresh LoRA adapters (B = 0: the wrapped model computes what it did). Only
    the adapters train; a reward model's scalar head (`score`) trains in full and is saved with them. The
    saved adapter names `base` (the --model it was trained on, itself maybe an adapter dir) as its base.
    The adapters' random initial values come from `seed`: the same command trains the same model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = resolve_targets(model, target)
    conv1d = any(isinstance(m, Conv1D) for path, m in model.named_modules() if path.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="SEQ_CLS" if reward_head else "CAUSAL_LM", fan_in_fan_out=conv1d,
                        modules_to_save=["score"] if reward_head else None)
    torch.manual_seed(seed)
    wrapped = get_peft_model(model, config)
    wrapped.peft_config["default"].base_model_name_or_path = base
    return wrapped


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; with LoRA, total includes the frozen base weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def describe(model) -> str:
    trainable, total = parameter_counts(model)
    return f"{trainable:,} trainable of {total:,} parameters ({trainable / max(1, total):.2%})"


def is_adapter_dir(path: str) -> bool:
    """A dir holding a LoRA adapter (adapter_config.json, written by a --lora run) rather than full weights."""
    return os.path.isfile(os.path.join(os.path.expanduser(path), ADAPTER_CONFIG))


def is_model_dir(path: str) -> bool:
    """A dir holding a finished model: full weights' config.json, or an adapter."""
    return os.path.isfile(os.path.join(path, "config.json")) or is_adapter_dir(path)


def load_config(name_or_path: str):
    """The transformers config of a model, Hub id or dir; of an adapter dir, its base model's."""
    from transformers import AutoConfig

    if is_adapter_dir(name_or_path):
        return load_config(adapter_base(name_or_path))
    return AutoConfig.from_pretrained(name_or_path)


def adapter_base(path: str) -> str:
    """The base model an adapter dir was trained on (peft's base_model_name_or_path: a Hub id, or the absolute
    path of a local model or adapter dir)."""
    base = adapter_config(path).get("base_model_name_or_path")
    if not base:
        raise LoraError(f"{path}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    if os.path.isabs(base) and not os.path.isdir(base):
        raise LoraError(f"the LoRA adapter in {path} was trained on {base}, which is not there any more: put that "
                        f"model back, or edit base_model_name_or_path in {path}/{ADAPTER_CONFIG}")
    return base


def adapter_task(path: str) -> str:
    """The adapter's peft task type: CAUSAL_LM (train.py, align.py) or SEQ_CLS (reward.py)."""
    return adapter_config(path).get("task_type") or "CAUSAL_LM"


def adapter_config(path: str) -> dict:
    """The adapter dir's adapter_config.json, as peft wrote it."""
    with open(os.path.join(os.path.expanduser(path), ADAPTER_CONFIG), encoding="utf-8") as handle:
        return json.load(handle)


def load_merged(path: str, load_base):
    """The model of an adapter dir as a plain transformers model: its base (`load_base(name)`, which may
    itself be an adapter dir) with the adapter folded into the weights, so it runs as fast as a full model."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(load_base(adapter_base(path)), path).merge_and_unload()
    except UserError:
        raise
    except Exception as err:
        raise LoraError(f"could not load the adapter in {path} ({type(err).__name__}: {err})") from None


def save_merged(adapter_dir: str, directory: str, load) -> None:
    """--merge: the adapter that a run saved in `adapter_dir`, folded into its base (`load(adapter_dir)` gives
    the merged model), saved as a full model dir that needs no peft. Built from the saved files on the main
    process, so it works however the launcher split the live model (DDP, DeepSpeed)."""
    from transformers import AutoTokenizer

    load(adapter_dir).save_pretrained(directory)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(directory)
