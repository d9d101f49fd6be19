"""The faults a run survives (SIGTERM, a full disk, two runs at once, NaN, a damaged checkpoint, a finished run
started again) and a resumed run that reports as one run. train.py is run as users run it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tuning import rundir, smoke
from tuning.runs import runner
from conftest import ROOT
from test_train import FAST, ENV, load_json, run_train, start_train, wait_for, workdir  # noqa: F401  (fixture)


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(workdir):
    out = workdir / "terminated"
    args = [*FAST, "--max-steps", "60", "--save-steps", "20", "--output-dir", str(out)]
    proc = start_train(workdir, *args)
    wait_for(out / "eval_before.json", proc)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)  # what Slurm, Kubernetes and spot preemption send
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output[-3000:]
    assert "Interrupted: checkpoint saved in" in output and "Traceback" not in output
    stopped_at = rundir.find_checkpoint(str(out))
    assert stopped_at is not None and output.count("Stopping after this step") == 1
    result = run_train(workdir, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {stopped_at}" in result.stdout
    assert load_json(out / "metrics.json")["global_step"] == 60


SITE_FULL_DISK = """
import errno, torch
_save = torch.save
def save(obj, f, *args, **kwargs):  # the disk fills up while checkpoint-4 is written
    if "checkpoint-4" in str(f) and str(f).endswith("optimizer.pt"):
        with open(f, "wb") as handle:
            handle.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return _save(obj, f, *args, **kwargs)
torch.save = save
"""


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(workdir, tmp_path):
    from transformers import AutoModelForCausalLM

    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(SITE_FULL_DISK))
    out = workdir / "disk-full"
    args = [*FAST, "--max-steps", "6", "--save-steps", "2", "--output-dir", str(out)]
    full = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=workdir, capture_output=True,
                          text=True, timeout=300, env={**ENV, "PYTHONPATH": str(tmp_path)})
    assert full.returncode == 1, full.stderr[-3000:]
    lines = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in full.stderr
    assert f"no space left on the disk of {out}/" in lines[0] and "checkpoint-2, is intact" in lines[0]
    assert rundir.find_checkpoint(str(out)) == str(out / "checkpoint-2") and not (out / "checkpoint-4").exists()
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")
    resumed = run_train(workdir, *args)  # space freed: the same command goes on
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoint-2'}" in resumed.stdout
    assert load_json(out / "metrics.json")["global_step"] == 6


def test_two_runs_into_one_dir_and_a_killed_runs_lock(workdir):
    out = workdir / "locked"
    args = [*FAST, "--max-steps", "60", "--save-steps", "5", "--output-dir", str(out)]
    first = start_train(workdir, *args)
    wait_for(out / "checkpoint-5" / "trainer_state.json", first)
    second = run_train(workdir, *args)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"{out}/ is in use by another run (process {first.pid})" in second.stderr
    first.kill()  # kill -9 leaves the lock file behind, but not the lock
    first.wait()
    third = run_train(workdir, *args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "Resuming from" in third.stdout


def test_a_finished_run_started_again_changes_nothing(workdir):
    out = workdir / "finished"
    args = [*FAST, "--max-steps", "6", "--save-steps", "3", "--output-dir", str(out)]
    assert run_train(workdir, *args).returncode == 0
    metrics = (out / "metrics.json").read_text()
    again = run_train(workdir, *args)
    assert again.returncode == 0 and "already holds this finished run (step 6); nothing to do" in again.stdout
    assert (out / "metrics.json").read_text() == metrics and not (out / "checkpoint-7").exists()
    fresh = run_train(workdir, *args, "--no-resume")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "--no-resume: deleted the checkpoints and results of the earlier run" in fresh.stdout
    assert load_json(out / "metrics.json")["global_step"] == 6


def test_a_finished_run_is_extended_by_a_higher_max_steps(workdir):
    """A higher --max-steps continues a finished run from its last checkpoint instead of being refused (the only way
    was to start over); run_config.json keeps the length it had. A lower one is another run, refused."""
    out = workdir / "extended"
    args = [*FAST, "--save-steps", "2", "--save-total-limit", "2", "--output-dir", str(out)]
    assert run_train(workdir, *args, "--max-steps", "4").returncode == 0
    longer = run_train(workdir, *args, "--max-steps", "6")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert f"Extending the run in {out}/ (step 4) to --max-steps 6" in longer.stdout
    assert f"Resuming from {out / 'checkpoint-4'}" in longer.stdout
    assert load_json(out / "metrics.json")["global_step"] == 6
    config = load_json(out / "run_config.json")
    epochs = smoke.TRAIN_SETTINGS["epochs"]  # (the smoke preset's; --max-steps ends the run first)
    assert config["max_steps"] == 6 and config["extended"] == [{"global_step": 4, "max_steps": 4, "epochs": epochs}]
    assert load_json(out / "metrics.json")["run_length"] == {"max_steps": 6, "epochs": epochs}
    again = run_train(workdir, *args, "--max-steps", "6")
    assert again.returncode == 0 and "already holds this finished run (step 6)" in again.stdout
    shorter = run_train(workdir, *args, "--max-steps", "5")
    assert shorter.returncode == 2 and "holds a different run (max_steps: 6 there, 5 now)" in shorter.stderr
    assert "this one holds a finished model, which --no-resume would delete" in shorter.stderr


@pytest.mark.parametrize("damaged,state", [("model.safetensors", "damaged (truncated?)"),
                                           ("optimizer.pt", "damaged (truncated?)"), ("scheduler.pt", "missing")])
def test_a_damaged_checkpoint_is_skipped_with_a_warning(workdir, damaged, state):
    out = workdir / f"damaged-{damaged}"
    args = [*FAST, "--max-steps", "6", "--save-steps", "2", "--save-total-limit", "5", "--output-dir", str(out)]
    assert run_train(workdir, *args).returncode == 0
    os.remove(out / "metrics.json")  # as if the run had stopped after checkpoint-4
    shutil.rmtree(out / "checkpoint-6")
    path = out / "checkpoint-4" / damaged
    if state == "missing":  # the Trainer would quietly start a fresh scheduler without it
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy or a save cut short
    warnings = []
    assert rundir.find_checkpoint(str(out), warnings.append) == str(out / "checkpoint-2")
    assert warnings == [f"warning: skipping {out / 'checkpoint-4'}: {damaged} is {state}; "
                        "using an older checkpoint"]
    result = run_train(workdir, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert warnings[0] in result.stdout and f"Resuming from {out / 'checkpoint-2'}" in result.stdout
    assert load_json(out / "metrics.json")["global_step"] == 6


def test_a_resumed_run_reports_as_one_run(workdir):
    """Interrupted and resumed, or not: the same tokens, loss, and steps in metrics.json."""
    args = [*FAST, "--max-steps", "20", "--save-steps", "5"]
    whole = run_train(workdir, *args, "--output-dir", str(workdir / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = workdir / "pieces"
    proc = start_train(workdir, *args, "--output-dir", str(out))
    wait_for(out / "checkpoint-10" / "trainer_state.json", proc)
    proc.kill()
    proc.wait()
    resumed = run_train(workdir, *args, "--output-dir", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "missing keys" not in resumed.stdout + resumed.stderr  # the tied lm_head is no cause for alarm
    one, two = load_json(workdir / "whole" / "metrics.json"), load_json(out / "metrics.json")
    assert two["train_real_tokens"] == one["train_real_tokens"] and two["global_step"] == one["global_step"] == 20
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-3)
    assert two["train_runtime_s"] > 0 and two["train_tokens_per_second"] > 0


def test_changed_learning_rate_settings_are_refused_on_resume(workdir):
    out = workdir / "schedule"
    assert run_train(workdir, *FAST, "--max-steps", "2", "--output-dir", str(out)).returncode == 0
    os.remove(out / "metrics.json")
    result = run_train(workdir, *FAST, "--max-steps", "2", "--lr-scheduler", "constant", "--warmup-ratio", "0.5",
                       "--output-dir", str(out))
    assert result.returncode == 2 and "holds a different run" in result.stderr
    assert "lr_scheduler: 'cosine' there, 'constant' now" in result.stderr and "warmup_ratio" in result.stderr
    assert load_json(out / "run_config.json")["lr_scheduler"] == "cosine"  # still the truth


def test_a_nan_loss_stops_the_run_before_it_spreads(tmp_path):
    """At the first NaN: stop with the step, lr and precision; no NaN weights saved; older checkpoints stay."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from tuning.runs import runner
    from tuning.data.collate import SFTCollator
    from test_speed import examples, tiny_gpt2
    from tuning.runs.trainer import InstructTrainer, NonFiniteLoss

    model = tiny_gpt2()
    calls = []
    forward = model.forward

    def poisoned(*args, **kwargs):  # the fifth micro-batch's loss overflows
        out = forward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5 and out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=8, save_steps=2,
                             save_strategy="steps", report_to="none", use_cpu=True, remove_unused_columns=False,
                             learning_rate=1e-3, logging_steps=1)
    trainer = InstructTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples(16)),
                              data_collator=SFTCollator(0, "rows"))
    with pytest.raises(NonFiniteLoss, match=r"became nan at step 5 \(learning rate .*, precision fp32\)"):
        trainer.train()
    assert [os.path.basename(c) for c in rundir.checkpoints(str(tmp_path))] == ["checkpoint-4", "checkpoint-2"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(rundir.RunStop, match=r"try a lower --lr.*The last good checkpoint is .*checkpoint-4"):
        with runner.guarded(str(tmp_path), True):
            raise NonFiniteLoss("the training loss became nan at step 5 (...); try a lower --lr")


def test_empty_fields_are_named(tmp_path):
    from tuning.data import records

    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "  ", "output": "x"}]))
    with pytest.raises(records.DataError, match=r"1 empty: record 0: empty 'instruction'\)"):
        records.load_records(str(path))


def test_ctrl_c_in_a_script_without_checkpoints_is_one_line(capsys, monkeypatch):
    """inference.py, evaluation.py, the web page's loading, ...: Ctrl-C ends them in one line, exit 130."""
    import inference
    from tuning import cli


    def interrupted(args, explicit):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["inference.py"])
    with pytest.raises(SystemExit) as stop:
        cli.run(inference, interrupted, lambda args: None)
    assert stop.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"


def test_only_the_first_process_prints_the_stop_message(capsys, monkeypatch):
    from tuning import cli

    for rank, printed in (("1", ""), ("0", "error: Interrupted\n")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit):
            cli.fail("Interrupted", 130)
        assert capsys.readouterr().err == printed


def test_a_full_disk_is_recognised_however_it_is_worded(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    assert runner.disk_full(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path))
    wrapped = RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")  # safetensors
    assert runner.disk_full(wrapped, str(tmp_path))
    torch_save = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 325696 vs 325584")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(60 * 2**20, 60 * 2**20, 0))
    assert runner.disk_full(torch_save, str(tmp_path))  # what a 60 MB tmpfs gave, once full
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**30, 2**39))
    assert not runner.disk_full(torch_save, str(tmp_path)) and not runner.disk_full(ValueError("x"), str(tmp_path))


def test_no_resume_clears_the_earlier_runs_results_and_model_only(tmp_path):
    for name in ("model.safetensors", "config.json", "metrics.json", "eval_before.json", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoint-3").mkdir()
    rundir.clear_run(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing stale, nothing of the user's


def test_a_filesystem_without_locks_warns_instead_of_refusing(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(handle, flags):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert rundir.lock(str(tmp_path)) is not None
    assert "can't be locked (No locks available)" in capsys.readouterr().out


def test_a_save_dir_from_an_older_version_says_so(tmp_path, tiny_tokenizer):
    from tuning.data import tokencache

    (tmp_path / "dataset_dict.json").write_text("{}")
    (tmp_path / "sft_meta.json").write_text(json.dumps({"template": "seed", "max_length": 64}))
    with pytest.raises(rundir.UserError, match="made by an older version of datasetup.py; make it again"):
        tokencache.load_saved(str(tmp_path), tiny_tokenizer, "seed", 64, False)


# ---------------------------------------------------------------- checkpoints as each launcher writes them
def write_checkpoint(directory, files: dict) -> None:
    """A checkpoint dir whose files have real formats: torch zips (.pt/.pth/.bin), safetensors, JSON, text."""
    from safetensors.torch import save_file

    for name, kind in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "torch":
            torch.save({"state": torch.zeros(3)}, path)
        elif kind == "safetensors":
            save_file({"w": torch.zeros(3)}, str(path))
        elif kind == "json":
            path.write_text("{}")
        else:
            path.write_text(kind)


# Each launcher's checkpoint, file by file as transformers 5.24's Trainer._save_checkpoint writes it (read from its
# source, since DeepSpeed and FSDP need GPUs): the Trainer's files, then the launcher's optimizer (and model) state.
COMMON = {"trainer_state.json": "json", "run_totals.json": "json", "training_args.bin": "torch"}
LAYOUTS = {
    "one process or DDP": {"model.safetensors": "safetensors", "config.json": "json", "optimizer.pt": "torch",
                           "scheduler.pt": "torch", "rng_state_0.pth": "torch", "rng_state_1.pth": "torch"},
    "DeepSpeed ZeRO-2": {"model.safetensors": "safetensors", "config.json": "json", "latest": "global_step10",
                         "zero_to_fp32.py": "# DeepSpeed's recovery script",
                         "global_step10/mp_rank_00_model_states.pt": "torch",
                         "global_step10/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": "torch",
                         "global_step10/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": "torch",
                         "rng_state_0.pth": "torch", "rng_state_1.pth": "torch"},
    "DeepSpeed ZeRO-3, weights not gathered": {
        "config.json": "json", "latest": "global_step10", "scheduler.pt": "torch",
        "global_step10/zero_pp_rank_0_mp_rank_00_model_states.pt": "torch",
        "global_step10/zero_pp_rank_1_mp_rank_00_model_states.pt": "torch",
        "global_step10/zero_pp_rank_0_mp_rank_00_optim_states.pt": "torch",
        "global_step10/zero_pp_rank_1_mp_rank_00_optim_states.pt": "torch", "rng_state_0.pth": "torch"},
    "FSDP, FULL_STATE_DICT": {"model.safetensors": "safetensors", "config.json": "json",
                              "pytorch_model_fsdp.bin": "torch", "optimizer.bin": "torch", "scheduler.pt": "torch",
                              "rng_state_0.pth": "torch", "rng_state_1.pth": "torch"},
    "FSDP, SHARDED_STATE_DICT": {"pytorch_model_fsdp_0/.metadata": "dcp", "pytorch_model_fsdp_0/__0_0.distcp": "x",
                                 "optimizer_0/.metadata": "dcp", "optimizer_0/__0_0.distcp": "x",
                                 "scheduler.pt": "torch", "rng_state_0.pth": "torch"},
}
# What resume can't do without, per layout: taken away, the checkpoint is skipped, naming it.
NEEDED = {"one process or DDP": ["optimizer.pt", "scheduler.pt", "model.safetensors"],
          "DeepSpeed ZeRO-2": ["latest", "global_step10/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                               "global_step10/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"],
          "DeepSpeed ZeRO-3, weights not gathered": ["global_step10/zero_pp_rank_1_mp_rank_00_optim_states.pt"],
          "FSDP, FULL_STATE_DICT": ["optimizer.bin", "pytorch_model_fsdp.bin", "scheduler.pt"],
          "FSDP, SHARDED_STATE_DICT": ["optimizer_0/.metadata", "pytorch_model_fsdp_0/.metadata", "scheduler.pt"]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_finds_the_checkpoint_every_launcher_writes(tmp_path, layout):
    """A complete checkpoint in any launcher's layout is resumed from; one without what resume reads (the
    optimizer and model states in the launcher's own files) is skipped, naming the missing file. Before, only
    optimizer.pt counted, so DeepSpeed and FSDP runs silently started again from step 0."""
    (tmp_path / "run_config.json").write_text(json.dumps({"world_size": 2}))  # each run writes one
    write_checkpoint(tmp_path / "checkpoint-5", {**COMMON, **LAYOUTS["one process or DDP"]})
    write_checkpoint(tmp_path / "checkpoint-10", {**COMMON, **LAYOUTS[layout]})
    assert rundir.find_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    for needed in NEEDED[layout]:
        path = tmp_path / "checkpoint-10" / needed
        saved = path.read_bytes()
        path.unlink()
        warnings = []
        assert rundir.find_checkpoint(str(tmp_path), warnings.append) == str(tmp_path / "checkpoint-5"), needed
        assert warnings and "is missing; using an older checkpoint" in warnings[0], warnings
        path.write_bytes(saved)
        path.write_bytes(saved[: len(saved) // 2])  # cut short: skipped too, where the format shows it
        if needed.endswith((".pt", ".bin", ".safetensors")):
            assert rundir.find_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-5"), needed
        path.write_bytes(saved)
    assert rundir.find_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")


def test_an_extension_stopped_before_its_end_is_not_taken_for_finished(tmp_path):
    """metrics.json stays the shorter run's until the longer one ends; the lengths it names tell them apart."""
    rundir.write_json(str(tmp_path / "metrics.json"), {"global_step": 4})  # a run finished before run_length
    assert rundir.finished_step(str(tmp_path), {"max_steps": 6, "epochs": 9.0}) == 4  # (nothing to tell yet)
    rundir.record_run_length(str(tmp_path), {"max_steps": 4, "epochs": 9.0, "global_step": 4})
    assert rundir.finished_step(str(tmp_path), {"max_steps": 6, "epochs": 9.0}) is None  # extended, not finished
    assert rundir.finished_step(str(tmp_path), {"max_steps": 4, "epochs": 9.0}) == 4
    assert rundir.finished_step(str(tmp_path)) == 4

