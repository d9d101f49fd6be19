"""What each launcher lets a training script do, decided at start: DeepSpeed and FSDP from accelerate's
environment (before any Trainer exists), plain python on several GPUs (the Trainer's nn.DataParallel), and
DDP's search for unused parameters only where a model needs it.

Runs floor: imports rundir.
"""

from __future__ import annotations

import os

from tuning import rundir

# Config fields of a mixture of experts: a batch may route to only some experts, so some weights go unused.
EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def launcher_problem(script: str, environ=None) -> str | None:
    """Why the launcher's sharding can't run `script` (None when it can), read from what `accelerate launch` sets
    from its config before any Trainer exists:

    - DeepSpeed ZeRO-3 partitions the weights as they load, and each script's start-up checks and evaluations
      run the model outside DeepSpeed's engine: refused everywhere (ZeRO-1 and 2 keep whole weights in each
      process: the evaluations before training run them on this process's device, RunLayer.on_device);
    - FSDP: the same start-up checks, the evaluation before training and DPO's reference pass run the whole model
      in each process before FSDP shards it, which only works for a model that would not need FSDP; and with
      SHARDED_STATE_DICT (FSDP2's default) the Trainer saves no model files. Refused, with what to use instead.
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
                    "or 2 (or --lora for a model that does not fit)")
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return (f"FSDP (your accelerate config) is not supported: {script}'s start-up checks, its evaluation before "
                "training" + (" and DPO's reference pass" if script == "align.py" else "") + " run the whole model "
                "in each process before FSDP shards it; use DDP (torchrun) or DeepSpeed zero_stage 1 or 2, and "
                "--lora for a model that does not fit")
    return None


def refuse_launcher(script: str) -> None:
    problem = launcher_problem(script)
    if problem:
        raise rundir.UserError(problem)


def refuse_data_parallel(training_args, script: str) -> None:
    """Plain `python` on a machine with several GPUs has Trainer split each batch with DataParallel, which
    the script's own forward passes (reference pass, evaluation, generation) do not go through."""
    if training_args.n_gpu > 1:
        raise rundir.UserError(f"this machine has {training_args.n_gpu} GPUs, and plain `python {script}` would "
                               f"split batches with DataParallel, which {script} does not support: run `torchrun "
                               f"--nproc_per_node {training_args.n_gpu} {script} ...` (or set CUDA_VISIBLE_DEVICES=0)")


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
