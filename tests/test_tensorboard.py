"""--report-to tensorboard in every training script: the event files under OUTPUT_DIR/runs hold the training
loss that the run logged, and nothing is written elsewhere."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from test_train import ENV


def scalars(run_dir) -> dict:
    """{tag: [(step, value)]} from every event file under run_dir/runs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in sorted((run_dir / "runs").iterdir()):
        reader = EventAccumulator(str(events))
        reader.Reload()
        for tag in reader.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in reader.Scalars(tag))
    return found


@pytest.mark.parametrize("script", ["train.py", "reward.py", "align.py"])
def test_the_training_loss_reaches_tensorboard(smoke_trained, script):
    pytest.importorskip("tensorboard")
    out = smoke_trained / f"tb-{script[:-3]}"
    result = subprocess.run([sys.executable, str(ROOT / script), "--smoke", "--max-steps", "4", "--logging-steps", "2",
                             "--eval-steps", "1000", "--report-to", "tensorboard", "--output-dir", str(out)],
                            cwd=smoke_trained, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    losses = [(entry["step"], entry["loss"]) for entry in logged if "loss" in entry]
    written = scalars(out)["train/loss"]
    assert [step for step, _ in written] == [step for step, _ in losses] == [2, 4]
    assert [value for _, value in written] == pytest.approx([value for _, value in losses], rel=1e-6)
    assert not (smoke_trained / "runs").exists()  # (transformers' default for logs before training)
    before = json.loads((out / "eval_before.json").read_text())
    first = {"train.py": "loss", "reward.py": "accuracy", "align.py": "accuracy"}[script]
    assert scalars(out)[f"eval/{first}"][0] == (0, pytest.approx(before[f"before_{first}"], rel=1e-6))  # step 0


@pytest.mark.parametrize("value,expected", [
    ("foo", "--report-to foo: not a Trainer integration; use none, all, or a comma list of"),
    ("", "--report-to (empty): not a Trainer integration"),
])
def test_a_bad_report_to_is_refused_naming_the_flag(tmp_path, value, expected):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--report-to", value], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
