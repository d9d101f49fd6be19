"""A new user's journey through the README (issue 27): what stopped, misled or left them guessing, each checked
the way they met it."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from test_train import ENV, load_json, run_train, workdir  # noqa: F401  (fixture)


def run(cwd, script, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_skip_invalid_says_what_it_dropped_and_keeps_it_in_the_run_config(workdir):
    """5 malformed records and an empty output: train.py names them, as reward.py and align.py do, and
    run_config.json keeps every one."""
    records = json.loads((workdir / "smoke-run" / "data.json").read_text())[:60]
    bad = [7, {"instruction": "x"}, {"instruction": 3, "output": "y"}, "text", {"output": "z"}]
    path = workdir / "dirty.json"
    path.write_text(json.dumps(records + bad + [{"instruction": "Say.", "output": "  "}]))
    out = workdir / "dirty-run"
    result = run_train(workdir, "--dataset", str(path), "--model", "smoke-run/base", "--max-steps", "1", "--val-size",
                       "6", "--skip-invalid", "--max-length", "128", "--precision", "fp32", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"Records: 66 read from {path}; left out: 5 malformed (--skip-invalid), 1 with an empty instruction or "
            "output") in result.stdout
    assert f"  skipped {path}: record 60: is an int, not an object" in result.stdout
    report = load_json(out / "run_config.json")["data_report"]
    assert report["read"] == 66 and report["malformed"] == 5 and report["empty"] == 1 and len(report["skipped"]) == 5


def test_a_reward_model_is_refused_where_a_chat_model_goes(smoke_reward):
    work, _ = smoke_reward
    for args in (["--finetuned", "smoke-run/reward", "--prompt", "Hi."], ["--base", "smoke-run/reward", "--smoke"]):
        result = run(work, "inference.py", *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert ("smoke-run/reward holds a reward model (GPT2ForSequenceClassification, reward.py's output), not a "
                "causal language model") in result.stderr and "LOAD REPORT" not in result.stderr + result.stdout
    result = run(work, "evaluation.py", "--finetuned", "smoke-run/reward", "--only", "finetuned")
    assert result.returncode == 2 and "holds a reward model" in result.stderr


def test_the_base_is_the_model_the_run_started_from(smoke_trained):
    """No --base: the model in the fine-tuned run's run_config.json, not the Hub's distilgpt2."""
    result = run(smoke_trained, "inference.py", "--finetuned", "smoke-run/model", "--prompt", "Count the words.",
                 "--input", "a b c", "--max-new-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    smoke = run(smoke_trained, "inference.py", "--smoke", "--prompt", "Count the words.", "--input", "a b c",
                "--max-new-tokens", "4", "--json")
    assert json.loads(result.stdout)["base"] == json.loads(smoke.stdout)["base"]  # smoke-run/base's answer


def test_only_settings_become_flags_and_no_prefix_stands_for_another_flag():
    import evaluation
    from tuning import cli

    parser = cli.build_parser(evaluation)
    assert "--reward" not in parser._option_string_actions and "--stage-labels" not in parser._option_string_actions
    with pytest.raises(SystemExit):
        parser.parse_args(["--reward", "smoke-run/reward"])  # not --reward-model: refused, not guessed
    assert parser.parse_args(["--reward-model", "rm"]).reward_model == "rm"


def test_an_empty_prompt_is_refused_with_smoke_too(smoke_trained):
    result = run(smoke_trained, "inference.py", "--smoke", "--prompt", "")
    assert result.returncode == 2 and "--prompt is empty" in result.stderr


def test_a_reward_adapter_as_finetuned_gets_no_offline_hint(smoke_reward):
    work, _ = smoke_reward
    made = run(work, "reward.py", "--smoke", "--lora", "--max-steps", "2", "--eval-steps", "1000", "--output-dir",
               "rm-lora-journey")
    assert made.returncode == 0 and (work / "rm-lora-journey" / "adapter_config.json").exists(), made.stderr[-2000:]
    result = run(work, "inference.py", "--finetuned", "rm-lora-journey", "--prompt", "Hi.")
    assert result.returncode == 2 and "holds a reward model's LoRA adapter" in result.stderr
    assert "Offline?" not in result.stderr


def test_the_report_colours_the_second_model_by_better():
    """report.png: the fine-tuned (aligned) bar is green where it is better, red where it is not."""
    import evaluation

    report = {"base": {}, "finetuned": {}, "finetuned_better": {"rouge_l_f1": False, "eos_rate": True}}
    assert evaluation.bar_colors(report, "rouge_l_f1") == ["tab:gray", "tab:red"]
    assert evaluation.bar_colors(report, "eos_rate") == ["tab:gray", "tab:green"]
    assert evaluation.bar_colors({"finetuned": {}}, "eos_rate") == ["tab:green"]
