"""What would be trained, and where: the device, the precision, the model and tokenizer, and the layers LoRA adapts.

    python model.py --model ../shared/distilgpt2-config --init scratch   # DistilGPT2's architecture, random weights
    python model.py --model Qwen/Qwen2.5-0.5B --init scratch               # any causal LM (config only)

Any Hugging Face causal LM works: a Hub id or a local directory. `--init scratch` builds the same
architecture from its config.json with random weights (a directory with only config.json and
tokenizer files is enough), for experiments and offline runs.
"""

from __future__ import annotations

import sys

# ---- settings (each has a flag: INIT -> --init) ----
MODEL = "distilgpt2"  # Hub id or local directory of a causal LM (or of a config.json with --init scratch)
INIT = "pretrained"  # pretrained|scratch: load the weights, or random weights from the config
DEVICE = "auto"  # auto|cuda|mps|cpu: auto picks CUDA, then Apple MPS, then CPU
PRECISION = "auto"  # auto|fp32|bf16|fp16: auto = bf16 where supported, fp16 on older GPUs, fp32 on MPS


def main(args, explicit: set) -> None:
    from tuning.models import devices, loading, lora

    device = devices.get_device(args.device)
    precision, why = devices.resolve_precision(args.precision, device)
    print(f"device: {device}\nprecision: {precision} ({why})", flush=True)  # needs no download
    tokenizer = loading.load_tokenizer(args.model)
    lm = loading.load_model(args.model, args.init, tokenizer)
    print(f"model: {args.model} ({args.init}), {type(lm).__name__}, "
          f"{loading.count_parameters(lm) / 1e6:.1f}M parameters")
    print(f"tokenizer: {len(tokenizer)} tokens, eos={tokenizer.eos_token!r} ({tokenizer.eos_token_id}), "
          f"pad id {tokenizer.pad_token_id}")
    print(f"LoRA (--lora-target auto) adapts: {', '.join(lora.resolve_targets(lm))}")


if __name__ == "__main__":
    from tuning import cli

    cli.run(sys.modules[__name__], main, lambda args: None)
