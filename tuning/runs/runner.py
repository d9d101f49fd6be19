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
_made = []  # output dirs this process created: removed again if a run stops before writing anything there


def run_script(module, validate, main) -> None:
    """A training script's entry point: flags from its constants, `validate(args)`, then main(args, explicitly
    given settings). A user mistake or a stopped run ends in one line with its exit status; an interruption
    before training (during it, a checkpoint is saved first) with 130, or 143 for SIGTERM."""
    import sys

    from tuning import cli

    parser = cli.build_parser(module)
    args = cli.parse_or_exit(parser, validate)
    given = cli.explicit_dests(parser, sys.argv[1:])
    sigterm_as_interrupt()  # until training starts; then a SIGTERM saves a checkpoint like Ctrl-C
    try:
        from tuning.runs.launchers import refuse_launcher

        refuse_launcher(os.path.basename(module.__file__))  # before anything loads
        if not args.smoke:
            from tuning.models.loading import offline_unless_hub_reachable

            offline_unless_hub_reachable([args.model, args.dataset], print if os.environ.get("RANK", "0") == "0"
                                         else (lambda *a, **k: None))
        main(args, given)
    except cli.UserError as error:  # bad data, model, device or output dir, or a run stopped: one line
        remove_empty_dirs()
        cli.fail(str(error), getattr(error, "code", 2))
    except KeyboardInterrupt as stop:
        remove_empty_dirs()
        cli.fail("interrupted; run the same command to continue from the newest checkpoint",
                 143 if isinstance(stop, Terminated) else 130)


def refuse_other_script(output_dir: str, command: str) -> None:
    """A dir that holds another script's run (an SFT model, say) is never resumed into or cleared."""
    saved = (rundir.read_run_config(output_dir) or {}).get("command", "")
    script, theirs = command.split()[1:2], saved.split()[1:2]
    if saved and theirs != script:
        raise rundir.UserError(f"{output_dir}/ holds a run of {theirs[0]}, which this {script[0]} run would "
                               "overwrite; use another --output-dir")


def remove_empty_dirs() -> None:
    """An output dir this process made, left holding nothing but its lock (a run refused before it wrote
    anything, a bad data file, say), goes again: no empty run dirs behind a mistake."""
    import shutil

    for directory in _made:
        if os.path.isdir(directory) and set(os.listdir(directory)) <= {rundir.LOCK_FILE}:
            shutil.rmtree(directory, ignore_errors=True)


def open_output_dir(output_dir: str, config: dict, identity: tuple[str, ...], resume: bool, training_args,
                    say=print) -> str | None:
    """Lock the output dir and return the checkpoint to resume from (None: start fresh).

    Refuses a dir that holds another run, or that another process trains into; a finished run raises
    RunStop with exit status 0. --no-resume deletes the earlier run's checkpoints and results.
    """
    main_process = training_args.process_index == 0
    if main_process:
        if not os.path.exists(output_dir):
            _made.append(output_dir)
        _locks.append(rundir.lock(output_dir))
    with training_args.main_process_first(desc="checking the output dir"):
        refuse_other_script(output_dir, config["command"])
        if not resume:
            if main_process and rundir.clear_run(output_dir):
                say(f"--no-resume: deleted the checkpoints and results of the earlier run in {output_dir}/")
            return None
        extended = rundir.check_same_run(output_dir, config, identity)
        step = rundir.finished_step(output_dir, config)
        if step is not None and not extended:
            raise RunStop(f"{output_dir}/ already holds this finished run (step {step}); nothing to do. A higher "
                          "--max-steps or --epochs continues it; --no-resume trains it again from the start.", code=0)
        checkpoint = rundir.find_checkpoint(output_dir, warn=say)
        if extended and main_process:  # (its metrics.json stays, the shorter run's, until this one ends)
            rundir.record_run_length(output_dir, config["extended"][-1])
    if extended:
        longer = ", ".join(f"--{name.replace('_', '-')} {config[name]}" for name in rundir.LENGTH
                           if config[name] != config["extended"][-1][name])
        say(f"Extending the run in {output_dir}/ (step {config['extended'][-1]['global_step']}) to {longer}. The "
            "learning-rate schedule is computed again for the new length, from the step reached: after a decay to "
            "0, the rate rises again")
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
        if not disk_full(error, output_dir):
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
            "global_step": trainer.state.global_step,
            "run_length": {"max_steps": trainer.args.max_steps, "epochs": trainer.args.num_train_epochs}}


def finish(trainer) -> None:
    """Wait until the main process has written the results, then close the process group cleanly (a
    process that exits while the others still talk to it can abort them)."""
    trainer.accelerator.wait_for_everyone()
    trainer.end()


# ---------------------------------------------------------------- what stops a run
class Terminated(KeyboardInterrupt):
    """A SIGTERM, stopping the process like Ctrl-C (exit status 143 rather than 130)."""


def sigterm_as_interrupt() -> None:
    """SIGTERM (Slurm, Kubernetes, spot preemption) stops the process like Ctrl-C does."""

    def interrupt(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, interrupt)


LOW_SPACE = 64 * 2**20  # bytes: below this, a failed write is put down to a full disk


def disk_full(error: BaseException, directory: str) -> bool:
    """Did `error` come from a full disk? An ENOSPC anywhere in its chain says so; torch.save only says
    "iostream error" or "unexpected pos", so such a failed write while `directory`'s disk is (nearly) full
    counts too."""
    import errno
    import shutil

    chain = error
    while chain is not None:
        if isinstance(chain, OSError) and chain.errno == errno.ENOSPC:
            return True
        if any(s in str(chain) for s in ("No space left on device", "StorageFull")):
            return True
        chain = chain.__cause__ or chain.__context__
    if not any(s in str(error) for s in ("unexpected pos", "iostream error", "file write failed")):
        return False  # not a failed write (a CUDA out-of-memory, say), however full the disk
    try:
        return shutil.disk_usage(directory).free < LOW_SPACE
    except OSError:
        return False
