"""The launchers the README names, each script under each: plain python on several GPUs (simulated on this CPU by
tests/simulate_gpus.py), DeepSpeed and FSDP as accelerate configures them (refused where a script can't run with
them, read from accelerate's environment), evaluations that give every process the same number of forwards, and
DDP's search for unused parameters only where a model needs it."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tuning.runs import launchers
from conftest import ROOT
from test_train import ENV, load_json

SIMULATE = str(ROOT / "tests" / "simulate_gpus.py")


def run(cwd, *command, env=ENV):
    return subprocess.run([sys.executable, *command], cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


# ---------------------------------------------------------------- plain python on a machine with 2 GPUs
# script: (flags, what happens). train.py trains (the Trainer's DataParallel splits every tensor of the batch, and
# each replica's loss is its share of the batch's response tokens); reward.py and align.py read positions inside
# the batch (score_index, DPO's packed sequences), which DataParallel's split would tear from their rows, and say
# so in one line with the torchrun command to use instead.
DATA_PARALLEL = {
    "train.py": (["--smoke", "--max-steps", "3", "--batch-size", "8", "--eval-steps", "1000", "--logging-steps", "1"],
                 "trains"),
    "reward.py": (["--smoke", "--max-steps", "2"], "refused"),
    "align.py": (["--smoke", "--max-steps", "2"], "refused"),
}


@pytest.mark.parametrize("script", list(DATA_PARALLEL))
def test_plain_python_on_two_gpus(smoke_trained, script):
    flags, outcome = DATA_PARALLEL[script]
    if script == "align.py":
        flags = [*flags]  # DPO needs only the SFT model
    result = run(smoke_trained, SIMULATE, "2", str(ROOT / script), *flags, "--output-dir", f"dp-{script}")
    if outcome == "refused":
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert (f"this machine has 2 GPUs, and plain `python {script}` would split batches with DataParallel"
                in result.stderr and f"torchrun --nproc_per_node 2 {script}" in result.stderr)
        assert "Traceback" not in result.stderr
        return
    assert result.returncode == 0, result.stderr[-3000:]
    # The Trainer feeds DataParallel n_gpu x --batch-size examples a step: the same steps as one device with twice
    # the batch, which gives the same losses.
    one = run(smoke_trained, str(ROOT / script), *flags[:4], "16", *flags[5:], "--output-dir", "one-device")
    assert one.returncode == 0, one.stderr[-3000:]
    split, whole = load_json(smoke_trained / f"dp-{script}" / "metrics.json"), load_json(
        smoke_trained / "one-device" / "metrics.json")
    assert split["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)
    assert split["eval_loss_after"] == pytest.approx(whole["eval_loss_after"], rel=1e-4)


# ---------------------------------------------------------------- DeepSpeed and FSDP from accelerate's config
LAUNCHERS = [  # (environment accelerate launch sets, {script: refused?})
    ({}, {"train.py": False, "reward.py": False, "align.py": False}),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
     {"train.py": False, "reward.py": False, "align.py": False}),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
     {"train.py": True, "reward.py": True, "align.py": True}),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, {"train.py": True, "reward.py": True, "align.py": True}),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"},
     {"train.py": True, "reward.py": True, "align.py": True}),
]


@pytest.mark.parametrize("environ,refused", LAUNCHERS)
def test_each_script_runs_or_refuses_each_launcher(environ, refused):
    for script, expected in refused.items():
        assert (launchers.launcher_problem(script, environ) is not None) == expected, (script, environ)


def test_a_zero3_config_file_is_read_for_its_stage(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert "ZeRO-3" in launchers.launcher_problem("train.py", {"ACCELERATE_USE_DEEPSPEED": "true",
                                                            "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)})


@pytest.mark.parametrize("script", ["train.py", "reward.py", "align.py"])
def test_a_refused_launcher_is_one_line_before_anything_loads(tmp_path, script):
    env = {**ENV, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    result = run(tmp_path, str(ROOT / script), "--smoke", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: DeepSpeed ZeRO-3") and len(result.stderr.strip().splitlines()) == 1


def test_a_model_the_trainer_left_on_the_cpu_is_evaluated_on_the_processs_device(tmp_path, monkeypatch):
    """Under DeepSpeed the Trainer leaves the model on the CPU until train() hands it to the engine; the evaluation
    before training moves it to the process's device first (simulated: the Trainer's device is a "meta" one
    here, and the model must follow it before any batch is built)."""
    trainer, _ = sft_trainer(tmp_path, 5, 2)
    moved = []
    monkeypatch.setattr(type(trainer.model), "to", lambda self, device: moved.append(device) or self)
    monkeypatch.setattr(type(trainer.args), "device", property(lambda self: torch.device("meta")))
    batches = trainer.evaluation_batches()
    batch, real = next(batches)
    assert moved == [torch.device("meta")] and batch["input_ids"].device.type == "meta" and real == 2
    batches.close()


# ---------------------------------------------------------------- the same number of forwards in every process
def sft_trainer(tmp_path, n_examples: int, batch_size: int):
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from tuning.data.collate import SFTCollator
    from tuning.runs.trainer import InstructTrainer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_layer=1, n_head=2, n_embd=16, n_positions=64))
    examples = [{"input_ids": list(range(1, 4 + i % 5)), "labels": [-100] + list(range(2, 4 + i % 5))}
                for i in range(n_examples)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=batch_size, use_cpu=True,
                             report_to=[], remove_unused_columns=False)
    return InstructTrainer(model=model, args=args, eval_dataset=Dataset.from_list(examples),
                           data_collator=SFTCollator(0, "none")), examples


def test_every_process_runs_as_many_evaluation_batches_and_padding_counts_nothing(tmp_path, monkeypatch):
    """11 examples over 3 processes (4, 4 and 3 of them), batches of 2: every process runs 2 batches (a sharded
    model's forward waits for every process), the short share is filled up with an example that carries no loss,
    and each real example is counted once."""
    from transformers import TrainingArguments

    trainer, examples = sft_trainer(tmp_path, 11, 2)
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 3))
    counts, seen = [], []
    for rank in range(3):
        monkeypatch.setattr(TrainingArguments, "process_index", property(lambda self, rank=rank: rank))
        batches = list(trainer.evaluation_batches())
        counts.append(len(batches))
        for batch, real in batches:
            labelled = (batch["labels"] != -100).any(-1).tolist()
            assert labelled == [True] * real + [False] * (len(labelled) - real)
            seen += batch["input_ids"][:real].tolist()
        loss = trainer.evaluate()["eval_loss"]  # this rank's share alone (no other process to add up with)
        own = [examples[i] for i in range(rank, 11, 3)]
        if rank == 2:  # the padded share: the same loss as its 3 real examples give alone, on one process
            monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 1))
            monkeypatch.setattr(TrainingArguments, "process_index", property(lambda self: 0))
            alone, _ = sft_trainer(tmp_path / "alone", 0, 8)
            from datasets import Dataset

            assert loss == pytest.approx(alone.evaluate(Dataset.from_list(own))["eval_loss"], rel=1e-6)
    assert counts == [2, 2, 2] and len(seen) == 11


# ---------------------------------------------------------------- DDP's search for unused parameters
def test_ddp_searches_for_unused_parameters_only_where_some_are(capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_layer=1, n_head=2, n_embd=16, n_positions=64))
    ids = torch.randint(0, 50, (2, 6))
    loss = lambda m: m(input_ids=ids, labels=ids).loss  # noqa: E731
    args = SimpleNamespace(world_size=2, ddp_find_unused_parameters=None)
    launchers.find_unused_parameters(model, loss, args, print)
    assert args.ddp_find_unused_parameters is False  # every weight of a full fine-tune is used
    model.unused = torch.nn.Linear(3, 3)  # e.g. a head the loss never reaches
    args.ddp_find_unused_parameters = None
    launchers.find_unused_parameters(model, loss, args, print)
    assert args.ddp_find_unused_parameters is True and "unused.weight" in capsys.readouterr().out
    alone = SimpleNamespace(world_size=1, ddp_find_unused_parameters=None)
    launchers.find_unused_parameters(model, loss, alone, print)
    assert alone.ddp_find_unused_parameters is None  # one process: no DDP, nothing to decide
    moe = SimpleNamespace(world_size=2, ddp_find_unused_parameters=None)
    launchers.find_unused_parameters(SimpleNamespace(config=SimpleNamespace(num_local_experts=8)), loss, moe, print)
    assert moe.ddp_find_unused_parameters is True  # a batch may leave experts out
