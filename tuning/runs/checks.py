"""The start-up checks of a training run, before its first step: the batch layout this hardware and model allow
(packing, and whether the model keeps packed sequences apart on real examples), --max-length against the
model's positions, and a --report-to that the Trainer knows and that is installed.

Runs floor: imports the models floor and rundir.
"""

from __future__ import annotations

from tuning import rundir


def resolve_packing(packing: str, device, precision: str) -> tuple[str, str | None]:
    """(collator mode, attention implementation) for --packing on `device` at `precision`.

    FlashAttention 2 needs flash_attn installed, a GPU of compute capability 8.0 or newer (Ampere+) and
    bf16 or fp16; elsewhere "auto" means rows and an explicit "flat" runs through SDPA's block mask.
    """
    import importlib.util

    from tuning.models.devices import cuda_native_bf16

    flash = (device.type == "cuda" and precision in ("bf16", "fp16") and cuda_native_bf16(device)
             and importlib.util.find_spec("flash_attn") is not None)
    if packing == "auto":
        packing = "flat" if flash else "rows"
    if packing == "flat" and not flash:
        return packing, None  # correct through SDPA's block mask, but only fast with FlashAttention
    return packing, "flash_attention_2" if packing == "flat" else None


def probe_examples(train, n: int = 4, among: int = 32) -> list:
    """The start-up checks' examples: the n shortest of the first `among` training examples (real ones,
    and cheap: the checks run the model in fp32 on the CPU)."""
    first = [train[i] for i in range(min(among, len(train)))]
    return sorted(first, key=lambda example: len(example.get("input_ids") or example["chosen_ids"]))[:n]


def choose_packing(model, packing: str, explicit: bool, say, what: str, n: int, matches) -> str:
    """`packing`, or "none" when `matches()` (-> (same, padded value, packed value) of the model's `what`
    on n real examples) shows that this model lets packed examples attend to each other (OPT, BLOOM, MPT)."""
    if packing == "none" or n < 2:
        return packing
    same, padded, packed = matches()
    if same:
        return packing
    why = (f"{type(model).__name__} lets packed examples attend to each other ({what} of {n} "
           f"training examples: {padded:.4f} padded, {packed:.4f} packed)")
    if explicit:
        raise rundir.UserError(f"--packing {packing}: {why}; use --packing none")
    say(f"note: {why}, so batches are padded instead (--packing none)")
    return "none"


def fit_max_length(args, explicit: set, model: str, positions: int | None, say, reserve: int = 0) -> None:
    """One rule for --max-length against the model's positions, in every training script. Left at its default,
    it follows the model: the smaller of the default and the positions (less `reserve`, the --max-new-tokens that
    RLOO adds to a prompt), with a note when lowered. Given explicitly, a value that does not fit is refused at
    start, rather than a crash at the first long example in the middle of training."""
    if not positions:  # a config that does not say (rotary models without a limit): nothing to check
        return
    room, also = positions - reserve, f" + --max-new-tokens {reserve}" if reserve else ""
    if room < 1:
        raise rundir.UserError(f"--max-new-tokens {reserve} leaves no room for a prompt in the {positions} positions "
                               f"of {model}")
    if args.max_length <= room:
        return
    if "max_length" in explicit:
        raise rundir.UserError(f"--max-length {args.max_length}{also} is more than the {positions} positions of "
                               f"{model}; use --max-length {room} or less")
    why = (f"so that a prompt and --max-new-tokens {reserve} fit the {positions} positions of {model}" if reserve
           else f"the {positions} positions of {model}")
    say(f"note: --max-length lowered from {args.max_length} to {room}, {why}")
    args.max_length = room


def model_positions(name_or_path: str) -> int | None:
    """The positions of a model (Hub id, dir, adapter dir or a config-only dir), None where its config says none.
    A model that can't be read is left to the loading that follows, which says why."""
    from tuning.models import lora
    from tuning.models.loading import context_limit

    try:
        return context_limit(lora.load_config(name_or_path))
    except rundir.UserError:
        raise
    except Exception:
        return None


def report_to_problems(report_to: str) -> list[str]:
    """--report-to: none, all, or a comma list of integrations that the Trainer knows and that are installed."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if names in (["none"], ["all"]):
        return []  # (before importing the integrations: seconds, which a refused start should not wait for)
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    unknown = [name for name in names if name not in INTEGRATION_TO_CALLBACK] or ([] if names else ["(empty)"])
    if unknown:
        return [f"--report-to {', '.join(unknown)}: not a Trainer integration; use none, all, or a comma list of "
                f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}"]
    return [f"--report-to {name}: its package is not installed (pip install {name.replace('_', '-')})"
            for name in names if name not in get_available_reporting_integrations()]


def refuse_without_vllm(device) -> None:
    """align.py --vllm: TRL samples with vLLM, which needs a CUDA GPU and the vllm package; refused in one line
    naming what this machine lacks."""
    import importlib.util

    missing = [] if device.type == "cuda" else [f"a CUDA GPU (this run's device is {device.type})"]
    if importlib.util.find_spec("vllm") is None:
        missing.append("the vllm package (pip install vllm)")
    if missing:
        raise rundir.UserError(f"--vllm needs {' and '.join(missing)}; leave --vllm out to sample with transformers")
