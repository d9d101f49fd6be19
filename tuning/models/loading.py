"""Models and tokenizers from the Hugging Face Hub or a local directory, ready for training and generation:
pad and stop ids set, a LoRA adapter dir merged in, a reward model refused where a causal LM goes, and the
Hub's reachability checked once, so an offline machine fails in seconds with a hint.

    tokenizer = load_tokenizer("distilgpt2"); model = load_model("distilgpt2", "pretrained", tokenizer)

Any Hugging Face causal LM works: a Hub id or a local directory. init="scratch" builds the same architecture
from its config.json with random weights (a directory with only config.json and tokenizer files is enough).
Models floor: imports cli and lora.
"""

from __future__ import annotations

import os

from tuning.cli import UserError

MODEL = "distilgpt2"  # the default model
INIT = "pretrained"  # the default start: pretrained weights (scratch: random weights from the config)

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


def context_limit(config) -> int | None:
    """The most tokens a model of this config reads at once (None where the config does not say)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and any others in the generation config (Llama 3)."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [] if configured is None else [configured]
    return [tokenizer.eos_token_id] + [i for i in configured if i != tokenizer.eos_token_id]


def set_generation_ids(model, tokenizer) -> None:
    """EOS and pad ids in the config and generation config, so generation stops at EOS after saving.

    The tokenizer's EOS is added to (never replaces) a list of stop ids that the model already has. (The Trainer
    aligns the config's pad id with the tokenizer's anyway. A reward model reads its score at the answer's last
    token, which is where Hugging Face's own head reads it with pad = EOS too; a saved one has no pad id.)"""
    stops = stop_token_ids(model, tokenizer)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = stops if len(stops) > 1 and cfg is model.generation_config else tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id


def _check_local(name_or_path: str) -> None:
    if name_or_path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ModelError(f"{name_or_path}: no such directory")


def _has_config_only(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) and not any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(path))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
