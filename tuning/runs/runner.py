"""The run layer: what every training script does around Trainer.train, so each behaves alike.

    checkpoint = runner.open_output_dir(args.output_dir, config, IDENTITY, args.resume, training_args, say)
    before = runner.evaluate_once(trainer, "before", checkpoint, args.output_dir, main_process)
    with runner.guarded(args.output_dir, main_process):
        runner.train(trainer, stopper, checkpoint, args.output_dir)
        ...  # final evaluation and saving
        metrics = runner.run_metrics(trainer)  # then the main process writes metrics.json, last
    runner.finish(trainer)

The output dir is locked for the run, a finished run is not run again, an interruption (Ctrl-C,
SIGTERM) saves a checkpoint, and a full disk or a NaN loss end the run with one line that says
what to do, leaving the last good checkpoint for the same command to resume from.
"""

from __future__ import annotations

import contextlib
import os
import signal

from tuning import rundir
from tuning.rundir import RunStop

_locks = []  # lock files held for the life of the process


def run_script(module, validate, main) -> None:
    """A training script's entry point: flags from its constants, `validate(args)`, then main(args, explicitly
    given settings). A user mistake or a stopped run ends in one line with its exit status; an interruption
    before training (during it, a checkpoint is saved first) with 130, or 143 for SIGTERM."""
    import sys

    from tuning import cli

    parser = cli.build_parser(module)
    args = cli.parse_or_exit(parser, validate)
    given = cli.explicit_dests(parser, sys.argv[1:])
    rundir.sigterm_as_interrupt()  # until training starts; then a SIGTERM saves a checkpoint like Ctrl-C
    try:
        refuse_launcher(os.path.basename(module.__file__))  # before anything loads
        if not args.smoke:
            from tuning.models.loading import offline_unless_hub_reachable

            offline_unless_hub_reachable([args.model, args.dataset], print if os.environ.get("RANK", "0") == "0"
                                         else (lambda *a, **k: None))
        main(args, given)
    except cli.UserError as error:  # bad data, model, device or output dir, or a run stopped: one line
        cli.fail(str(error), getattr(error, "code", 2))
    except KeyboardInterrupt as stop:
        cli.fail("interrupted; run the same command to continue from the newest checkpoint",
                 143 if isinstance(stop, rundir.Terminated) else 130)


def report_to_problems(report_to: str) -> list[str]:
    """--report-to: none, all, or a comma list of integrations that the Trainer knows and that are installed."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if names in (["none"], ["all"]):
        return []
    unknown = [name for name in names if name not in INTEGRATION_TO_CALLBACK] or ([] if names else ["(empty)"])
    if unknown:
        return [f"--report-to {', '.join(unknown)}: not a Trainer integration; use none, all, or a comma list of "
                f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}"]
    return [f"--report-to {name}: its package is not installed (pip install {name.replace('_', '-')})"
            for name in names if name not in get_available_reporting_integrations()]


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


# Config fields of a mixture of experts: a batch may route to only some experts, so some weights go unused.
EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def find_unused_parameters(model, loss_of, training_args, say) -> None:
    """DDP's find_unused_parameters: off where the graph of one real batch's loss (`loss_of(model)`, a forward to
    a scalar) reaches every trainable parameter; on, with a note, for a model that leaves some out, or that routes
    each batch to some of its experts. On, DDP walks the autograd graph at every step; off for a model that does
    leave one out, it stops at the second step. Checked only when the run is distributed."""
    if training_args.world_size < 2 or training_args.ddp_find_unused_parameters is not None:
        return
    config = getattr(model, "config", None)
    if any((getattr(config, name, 0) or 0) > 1 for name in EXPERTS):
        unused = ["experts"]
    else:
        reached = graph_leaves(loss_of(model))
        unused = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in reached]
    training_args.ddp_find_unused_parameters = bool(unused)
    if unused:
        say(f"note: some parameters may get no gradient ({unused[0]}, ...), so DDP looks for unused parameters at "
            "every step")


def graph_leaves(loss) -> set[int]:
    """The ids of the leaf tensors (parameters) that `loss`'s autograd graph reaches, found without a backward."""
    seen, found, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: where a gradient would reach a leaf
            found.add(id(node.variable))
        stack.extend(child for child, _ in node.next_functions)
    return found


def refuse_data_parallel(training_args, script: str) -> None:
    """Plain `python` on a machine with several GPUs has Trainer split each batch with DataParallel, which
    the script's own forward passes (reference pass, evaluation, generation) do not go through."""
    if training_args.n_gpu > 1:
        raise rundir.UserError(f"this machine has {training_args.n_gpu} GPUs, and plain `python {script}` would "
                               f"split batches with DataParallel, which {script} does not support: run `torchrun "
                               f"--nproc_per_node {training_args.n_gpu} {script} ...` (or set CUDA_VISIBLE_DEVICES=0)")


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


def launcher_problem(script: str, environ=None) -> str | None:
    """Why the launcher's sharding can't run `script` (None when it can), read from what `accelerate launch` sets
    from its config before any Trainer exists:

    - DeepSpeed ZeRO-3 partitions the weights as they load, and each script's start-up checks and evaluations
      run the model outside DeepSpeed's engine: refused everywhere (ZeRO-1 and 2 keep whole weights: fine);
    - FSDP in align.py: DPO's reference pass and RLOO's sampling run the whole model in each process;
    - FSDP with SHARDED_STATE_DICT (FSDP2's default) saves checkpoints with no model files, and no final model.
    """
    import json

    environ = os.environ if environ is None else environ
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        path = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        if stage is None and path.endswith(".json") and os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                stage = json.load(handle).get("zero_optimization", {}).get("stage")
        if str(stage) == "3":
            return (f"DeepSpeed ZeRO-3 (your accelerate config) partitions the weights as they load, and {script}'s "
                    "start-up checks and evaluations run the whole model outside DeepSpeed's engine: use zero_stage 1 "
                    "or 2" + ("" if script == "align.py" else ", or FSDP") + " (or --lora for a model that does not fit)")
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        if script == "align.py":
            return ("FSDP (your accelerate config) shards the weights, and align.py's DPO reference pass and RLOO "
                    "sampling run the whole model in each process: use DDP (torchrun), or DeepSpeed zero_stage 1 or 2")
        version = environ.get("FSDP_VERSION", "1")
        kind = environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT" if version == "1" else "SHARDED_STATE_DICT")
        if kind.upper() != "FULL_STATE_DICT":
            return (f"FSDP with {kind.upper()} (your accelerate config{', FSDP2' if version == '2' else ''}) saves no "
                    f"model files, so {script} would end without a model: set fsdp_state_dict_type: FULL_STATE_DICT")
    return None


def refuse_launcher(script: str) -> None:
    problem = launcher_problem(script)
    if problem:
        raise rundir.UserError(problem)


def model_path(path: str) -> str:
    """A local model dir as an absolute path (so a run config names it from any working dir); a Hub id as is."""
    return os.path.abspath(path) if os.path.isdir(path) else path


def refuse_other_script(output_dir: str, command: str) -> None:
    """A dir that holds another script's run (an SFT model, say) is never resumed into or cleared."""
    saved = (rundir.read_run_config(output_dir) or {}).get("command", "")
    script, theirs = command.split()[1:2], saved.split()[1:2]
    if saved and theirs != script:
        raise rundir.UserError(f"{output_dir}/ holds a run of {theirs[0]}, which this {script[0]} run would "
                               "overwrite; use another --output-dir")


def open_output_dir(output_dir: str, config: dict, identity: tuple[str, ...], resume: bool, training_args,
                    say=print) -> str | None:
    """Lock the output dir and return the checkpoint to resume from (None: start fresh).

    Refuses a dir that holds another run, or that another process trains into; a finished run raises
    RunStop with exit status 0. --no-resume deletes the earlier run's checkpoints and results.
    """
    main_process = training_args.process_index == 0
    if main_process:
        _locks.append(rundir.lock(output_dir))
    with training_args.main_process_first(desc="checking the output dir"):
        refuse_other_script(output_dir, config["command"])
        if not resume:
            if main_process and rundir.clear_run(output_dir):
                say(f"--no-resume: deleted the checkpoints and results of the earlier run in {output_dir}/")
            return None
        extended = rundir.check_same_run(output_dir, config, identity)
        step = rundir.finished_step(output_dir)
        if step is not None and not extended:
            raise RunStop(f"{output_dir}/ already holds this finished run (step {step}); nothing to do. A higher "
                          "--max-steps or --epochs continues it; --no-resume trains it again from the start.", code=0)
        checkpoint = rundir.find_checkpoint(output_dir, warn=say)
        if extended and main_process and step is not None:  # its results are those of the shorter run: gone
            os.remove(os.path.join(output_dir, rundir.METRICS_FILE))
    if extended:
        longer = ", ".join(f"--{name.replace('_', '-')} {config[name]}" for name in rundir.LENGTH
                           if config[name] != config["extended"][-1][name])
        say(f"Extending the run in {output_dir}/ (step {config['extended'][-1]['global_step']}) to {longer}; the "
            "learning-rate schedule is stretched over the new length")
    if checkpoint:
        say(f"Resuming from {checkpoint} (--no-resume to start over)")
    return checkpoint


def evaluate_once(trainer, prefix: str, checkpoint: str | None, output_dir: str, main_process: bool) -> dict:
    """trainer.evaluate() before training, its metrics named PREFIX_... and kept in eval_PREFIX.json so a resumed
    run reuses them. They are logged as the later evaluations are (eval/loss in TensorBoard), at step 0."""
    path = os.path.join(output_dir, f"eval_{prefix}.json")
    saved = rundir.read_json(path) if checkpoint else None
    if saved is not None:
        return saved
    metrics = {f"{prefix}{key[len('eval'):]}" if key.startswith("eval_") else key: value
               for key, value in trainer.evaluate(metric_key_prefix="eval").items()}
    if main_process:
        rundir.write_json(path, metrics)
    return metrics


@contextlib.contextmanager
def guarded(output_dir: str, main_process: bool):
    """Turn a full disk or a non-finite loss into a RunStop that says what to do next."""
    from tuning.runs.trainer import NonFiniteLoss

    try:
        yield
    except RunStop:
        raise
    except NonFiniteLoss as error:
        last = rundir.find_checkpoint(output_dir)
        where = f" The last good checkpoint is {last}." if last else ""
        raise RunStop(f"{error}.{where}") from None
    except Exception as error:
        if not rundir.disk_full(error, output_dir):
            raise
        if main_process:
            rundir.remove_incomplete_checkpoints(output_dir)  # frees the space the cut-short save took
        last = rundir.find_checkpoint(output_dir)
        where = f"the newest complete checkpoint, {last}, is intact" if last else "no checkpoint was complete yet"
        raise RunStop(f"no space left on the disk of {output_dir}/ while saving ({type(error).__name__}: "
                      f"{str(error).splitlines()[0][:120] if str(error) else ''}); {where}. Free some space and run "
                      "the same command to continue.") from None


def train(trainer, stopper, checkpoint: str | None, output_dir: str):
    """trainer.train() that stops cleanly on Ctrl-C or SIGTERM (RunStop with exit status 130 or 143)."""
    with stopper.installed():
        result = trainer.train(resume_from_checkpoint=checkpoint)
    if stopper.stopped:
        code = 128 + (stopper.signal or signal.SIGINT)
        raise RunStop(f"Interrupted: checkpoint saved in {rundir.find_checkpoint(output_dir)}. "
                      "Run the same command to continue.", code=code)
    return result


def run_metrics(trainer) -> dict:
    """Loss, real tokens (and the trainer's other counts), runtime and tokens/s of the whole run, all
    sessions of it together. A collective."""
    totals = trainer.run_totals()
    steps = max(trainer.state.global_step, 1)
    counts = {f"train_{name}": value for name, value in totals.items() if name not in ("loss_sum", "runtime_s")}
    return {"train_loss": totals["loss_sum"] / steps, **counts, "train_runtime_s": totals["runtime_s"],
            "train_tokens_per_second": totals["real_tokens"] / totals["runtime_s"],
            "global_step": trainer.state.global_step}


def finish(trainer) -> None:
    """Wait until the main process has written the results, then close the process group cleanly (a
    process that exits while the others still talk to it can abort them)."""
    trainer.accelerator.wait_for_everyone()
    trainer.end()
