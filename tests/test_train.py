"""train.py and model.py end to end on CPU: smoke run, checkpoints, resume, DDP, errors, precision."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tuning.models import devices
from tuning import rundir
from tuning.runs import checks
import train
from conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
FAST = ["--smoke", "--eval-steps", "1000", "--logging-steps", "5"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory holding the smoke data and base model, made once."""
    from tuning import smoke

    path = tmp_path_factory.mktemp("smoke")
    smoke.prepare(str(path / smoke.OUTPUT_DIR))
    return path


def run_train(cwd, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def start_train(cwd, *args):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path, proc, timeout=180):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"training ended before {path} appeared: {proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def load_json(path):
    with open(path) as handle:
        return json.load(handle)


def test_smoke_steps_write_loadable_checkpoints(workdir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = workdir / "few"
    result = run_train(workdir, *FAST, "--max-steps", "4", "--save-steps", "2", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Before: eval loss" in result.stdout and "precision: fp32 (set by --smoke)" in result.stdout
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / "trainer_state.json").exists() and (ckpt / "optimizer.pt").exists()
        assert load_json(ckpt / "sft_template.json")["name"] == "seed"
        AutoModelForCausalLM.from_pretrained(ckpt)
    lm = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert lm.generation_config.eos_token_id == tok.eos_token_id
    assert lm.generation_config.pad_token_id is not None
    metrics = load_json(out / "metrics.json")
    for key in ("train_loss", "eval_loss_before", "eval_loss_after", "eval_perplexity_before",
                "eval_perplexity_after", "train_tokens_per_second", "train_runtime_s", "device", "precision"):
        assert key in metrics, key
    assert metrics["global_step"] == 4 and metrics["train_tokens_per_second"] > 0
    config = load_json(out / "run_config.json")
    assert config["batch_size"] == 32 and config["seed"] == 42 and config["val_size"] == 200
    assert (out / "loss_curve.png").stat().st_size > 5000
    assert load_json(out / "sft_template.json")["with_input"].startswith("### Instruction:")


def test_resume_after_kill_ends_at_the_same_step(workdir):
    out = workdir / "killed"
    args = [*FAST, "--max-steps", "120", "--save-steps", "5", "--output-dir", str(out)]
    proc = start_train(workdir, *args)
    wait_for(out / "checkpoint-5" / "trainer_state.json", proc)
    proc.kill()  # kill -9: no chance to clean up
    proc.wait()
    assert not (out / "metrics.json").exists()
    result = run_train(workdir, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from" in result.stdout and "Evaluating the model before" not in result.stdout
    metrics = load_json(out / "metrics.json")
    assert metrics["global_step"] == 120
    state = load_json(out / "checkpoint-120" / "trainer_state.json")
    assert state["global_step"] == 120
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(5, 121, 5))


def test_ctrl_c_saves_a_checkpoint_and_stops(workdir):
    out = workdir / "interrupted"
    proc = start_train(workdir, *FAST, "--max-steps", "400", "--save-steps", "200", "--output-dir", str(out))
    wait_for(out / "eval_before.json", proc)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-3000:]
    assert "Interrupted: checkpoint saved" in output and "Traceback" not in output
    assert rundir.find_checkpoint(str(out)) is not None


def test_output_dir_of_another_run_is_refused(workdir):
    out = workdir / "other"
    assert run_train(workdir, *FAST, "--max-steps", "2", "--output-dir", str(out)).returncode == 0
    result = run_train(workdir, *FAST, "--max-steps", "2", "--max-length", "64", "--output-dir", str(out))
    assert result.returncode == 2 and "holds a different run" in result.stderr and "max_length" in result.stderr
    assert "Traceback" not in result.stderr
    fresh = run_train(workdir, *FAST, "--max-steps", "2", "--max-length", "64", "--no-resume",
                      "--output-dir", str(out))
    assert fresh.returncode == 0, fresh.stderr[-2000:]


def test_a_saved_dataset_run_is_evaluated_on_its_own_held_out_records(workdir, tmp_path):
    """datasetup.py --save, train.py --dataset DIR (settings read from DIR), then evaluation.py run from
    another directory on a checkpoint: the exact records the run held out are evaluated."""
    saved = workdir / "saved-alpaca"
    made = subprocess.run([sys.executable, str(ROOT / "datasetup.py"), "--dataset", "smoke-run/data.json",
                           "--tokenizer", "smoke-run/base", "--template", "alpaca", "--max-length", "96",
                           "--val-size", "12", "--save", str(saved)], cwd=workdir, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    assert f"Use: python train.py --dataset {saved} with a --model whose tokenizer is smoke-run/base" in made.stdout
    out = workdir / "from-saved"
    result = run_train(workdir, "--model", "smoke-run/base", "--dataset", str(saved), "--max-steps", "2",
                       "--save-steps", "2", "--eval-steps", "1000", "--batch-size", "8", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    config = load_json(out / "run_config.json")
    assert config["template"] == "alpaca" and config["max_length"] == 96
    held_out = [json.loads(line) for line in (out / "held_out.jsonl").read_text().splitlines()]
    assert held_out == [json.loads(line) for line in (saved / "held_out.jsonl").read_text().splitlines()]
    assert len(held_out) == 12
    report = subprocess.run([sys.executable, str(ROOT / "evaluation.py"), "--finetuned", str(out / "checkpoint-2"),
                             "--only", "finetuned", "--num-generations", "3", "--max-new-tokens", "4",
                             "--output-dir", str(tmp_path / "eval")], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    written = load_json(tmp_path / "eval" / "report.json")
    assert written["finetuned"]["perplexity_examples"] == 12 and "base" not in written
    assert [s["instruction"] for s in written["samples"]] == [r["instruction"] for r in held_out[:3]]


def test_torchrun_two_cpu_processes(workdir):
    out = workdir / "ddp"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(ROOT / "train.py"), *FAST, "--max-steps", "4", "--save-steps", "2",
                             "--output-dir", str(out)], cwd=workdir, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = load_json(out / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["global_step"] == 4
    single = run_train(workdir, *FAST, "--max-steps", "1", "--output-dir", str(workdir / "ddp-single"))
    assert single.returncode == 0, single.stderr[-3000:]
    # The per-token validation loss, whatever the number of processes (no example counted twice).
    assert metrics["eval_loss_before"] == pytest.approx(load_json(workdir / "ddp-single" / "metrics.json")
                                                        ["eval_loss_before"], abs=1e-4)
    assert (out / "checkpoint-4" / "trainer_state.json").exists()


def test_scratch_distilgpt2_config_on_real_records(distilgpt2_sft):
    metrics = load_json(distilgpt2_sft / "metrics.json")
    assert metrics["global_step"] == 2 and metrics["eval_loss_before"] > 9  # random weights: ~ln(50257)


@pytest.mark.parametrize("args,expected", [
    (["--batchsize", "3"], "unrecognized arguments: --batchsize"),
    (["--batch-size", "0", "--lr", "-1"], "--batch-size must be >= 1"),
    (["--packing", "tight"], "argument --packing: invalid choice"),
    (["--epochs", "many"], "argument --epochs: invalid number value"),
    (["--precision", "fp16", "--device", "cpu", "--smoke"], "--precision fp16 needs a CUDA GPU"),
    (["--model", "./no-such-model", "--dataset", "{data}"], "./no-such-model: no such directory"),
    (["--dataset", "missing.jsonl"], "missing.jsonl: file not found"),
])
def test_bad_flags_are_refused_naming_the_flag(tmp_path, args, expected):
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}] * 4))
    args = [a.replace("{data}", str(tmp_path / "d.json")) for a in args]
    result = run_train(tmp_path, *args, "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr
    if "--lr" in args:
        assert "--lr must be > 0" in result.stderr  # every problem is reported at once


def test_flags_mirror_every_constant():
    from tuning import cli

    parser = cli.build_parser(train)
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for name in ("--model", "--init", "--dataset", "--template", "--output-dir", "--epochs", "--max-steps",
                 "--batch-size", "--grad-accum", "--lr", "--lr-scheduler", "--warmup-ratio", "--weight-decay",
                 "--max-length", "--val-size", "--eval-steps", "--save-steps", "--logging-steps", "--seed",
                 "--precision", "--packing", "--train-on-prompt", "--resume", "--no-resume", "--device", "--smoke"):
        assert name in flags, name
    args = parser.parse_args(["--val-size", "100", "--lr", "3e-4"])
    assert args.val_size == 100 and isinstance(args.val_size, int) and args.lr == 3e-4


def test_precision_auto_on_this_cpu():
    cpu = torch.device("cpu")
    precision, _ = devices.resolve_precision("auto", cpu)
    assert precision == ("bf16" if devices.cpu_supports_bf16() else "fp32")
    assert devices.resolve_precision("fp32", cpu)[0] == "fp32"
    assert devices.resolve_precision("auto", torch.device("mps"))[0] == "fp32"


@pytest.mark.parametrize("gpu,capability,expected", [
    ("T4", (7, 5), "fp16"), ("V100", (7, 0), "fp16"), ("A100", (8, 0), "bf16"), ("RTX 4090", (8, 9), "bf16"),
    ("H100", (9, 0), "bf16")])
def test_precision_auto_on_cuda_follows_the_hardware(monkeypatch, gpu, capability, expected):
    """Decided from the device's compute capability: is_bf16_supported() also counts emulated bf16 (T4, V100)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 reports, emulation included
    assert devices.resolve_precision("auto", torch.device("cuda"))[0] == expected, gpu
    if expected == "fp16":
        with pytest.raises(devices.DeviceError, match="no native bf16"):
            devices.resolve_precision("bf16", torch.device("cuda"))
    else:
        assert devices.resolve_precision("bf16", torch.device("cuda"))[0] == "bf16"


@pytest.mark.parametrize("capability,precision,flash_installed,packing,expected", [
    ((8, 0), "bf16", True, "auto", ("flat", "flash_attention_2")),
    ((9, 0), "fp16", True, "auto", ("flat", "flash_attention_2")),
    ((8, 0), "fp32", True, "auto", ("rows", None)),  # FlashAttention 2 has no fp32 kernels
    ((7, 5), "fp16", True, "auto", ("rows", None)),  # a T4: FlashAttention 2 needs Ampere or newer
    ((8, 0), "bf16", False, "auto", ("rows", None)),
    ((7, 5), "fp16", True, "flat", ("flat", None)),  # asked for: one row through SDPA's block mask
    ((8, 0), "bf16", True, "none", ("none", None)),
])
def test_flash_attention_only_where_it_runs(monkeypatch, capability, precision, flash_installed, packing, expected):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if flash_installed else None) if name == "flash_attn"
                        else real_find_spec(name, *a))
    assert checks.resolve_packing(packing, torch.device("cuda"), precision) == expected
    assert checks.resolve_packing("auto", torch.device("cpu"), precision) == ("rows", None)


def test_get_device_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.get_device("auto").type == "mps"
    assert devices.get_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.get_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(devices.DeviceError, match="--device cuda"):
        devices.get_device("cuda")


def test_pad_is_eos_but_eos_keeps_its_label(tiny_tokenizer):
    from tuning.data.collate import SFTCollator

    tok = tiny_tokenizer
    eos = tok.eos_token_id
    batch = SFTCollator(eos, "none")([{"input_ids": [5, 6, eos], "labels": [-100, 6, eos]},
                                      {"input_ids": [5, 6, 7, 8, eos], "labels": [-100, -100, 7, 8, eos]}])
    assert batch["labels"][0].tolist() == [-100, 6, eos, -100, -100]
    assert batch["input_ids"][0].tolist() == [5, 6, eos, eos, eos]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["num_real_tokens"] == 8
