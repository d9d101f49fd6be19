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
    body = run(work, "reward.py", "--model", "smoke-run/reward", "--dataset", "smoke-run/pairs.json", "--output-dir",
               "rm-of-rm")  # its trained head would silently be replaced by a new one
    assert body.returncode == 2 and "--model smoke-run/reward holds a reward model" in body.stderr


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


def test_the_report_colours_the_second_model_by_its_verdict():
    """report.png: the fine-tuned (aligned) bar is green where it is better, red where it is worse, grey where its
    interval can't tell; the first model's bar, and a model reported alone, blue."""
    import evaluation

    report = {"base": {}, "finetuned": {}, "differences": {
        "rouge_l_f1": {"verdict": "worse"}, "eos_rate": {"verdict": "better"},
        "distinct_2": {"verdict": "no clear difference"}}}
    assert evaluation.bar_colors(report, "rouge_l_f1") == ["tab:blue", "tab:red"]
    assert evaluation.bar_colors(report, "eos_rate") == ["tab:blue", "tab:green"]
    assert evaluation.bar_colors(report, "distinct_2") == ["tab:blue", "tab:gray"]
    assert evaluation.bar_colors({"finetuned": {}}, "eos_rate") == ["tab:blue"]


def test_help_shows_each_default_once():
    """A setting's comment that names its default gave "(default: ...) (default: False)" in --help."""
    import re

    for script in ("datasetup.py", "model.py", "train.py", "reward.py", "align.py", "inference.py", "evaluation.py"):
        text = " ".join(run(ROOT, script, "--help").stdout.split())
        options = re.split(r" (?=--[a-z])", text)
        assert not [option for option in options if option.count("(default:") > 1], script


def test_an_unreachable_hub_switches_to_offline_at_once(monkeypatch, capsys):
    """No network: one quick connection attempt, then only copies already downloaded are used (datasets and
    huggingface_hub would retry for most of a minute first)."""
    import time

    import datasets.config
    import huggingface_hub.constants

    from tuning.models import loading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens there
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    started = time.perf_counter()
    loading.offline_unless_hub_reachable(["./a-local-dir", "tatsu-lab/alpaca"])
    assert time.perf_counter() - started < loading.HUB_PROBE_SECONDS + 1
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert "can't be reached, so only copies already downloaded are used" in capsys.readouterr().out
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    loading.offline_unless_hub_reachable(["./a-local-dir", "smoke-run/model.json"])  # nothing on the Hub: no probe
    assert not huggingface_hub.constants.HF_HUB_OFFLINE


def test_max_length_follows_the_models_positions(workdir):
    """A model with 256 positions: the default --max-length (512) is lowered to 256 with a note, and a run with
    an example longer than that trains (before, it died at the first one, inside the position embedding); an
    explicit --max-length above the positions is refused at start, naming both."""
    records = json.loads((workdir / "smoke-run" / "data.json").read_text())[:40]
    records[0] = {**records[0], "output": " ".join(["word"] * 400)}  # longer than the model's 256 positions
    path = workdir / "long.json"
    path.write_text(json.dumps(records))
    args = ["--model", "smoke-run/base", "--dataset", str(path), "--max-steps", "1", "--val-size", "4",
            "--precision", "fp32"]
    result = run_train(workdir, *args, "--output-dir", str(workdir / "long-run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: --max-length lowered from 512 to 256, the 256 positions of smoke-run/base" in result.stdout
    assert load_json(workdir / "long-run" / "run_config.json")["max_length"] == 256
    refused = run_train(workdir, *args, "--max-length", "300", "--output-dir", str(workdir / "long-run-2"))
    assert refused.returncode == 2 and ("--max-length 300 is more than the 256 positions of smoke-run/base; use "
                                        "--max-length 256 or less") in refused.stderr


def test_the_reward_judged_evaluation_checks_its_judge_first_and_fits_long_answers(smoke_reward):
    """A --reward-model that is no reward model is said before anything is generated; the base model's noise,
    longer than the reward model's context once decoded and encoded again, is cut to fit as align.py cuts it
    (before, the run ended with an error after both models had generated)."""
    work, _ = smoke_reward
    wrong = run(work, "evaluation.py", "--smoke", "--reward-model", "smoke-run/model", "--limit", "4")
    assert wrong.returncode == 2 and "not a reward model" in wrong.stderr and "Generating" not in wrong.stderr
    long = run(work, "evaluation.py", "--smoke", "--reward-model", "smoke-run/reward", "--num-generations", "8",
               "--limit", "4", "--output-dir", "eval-long")  # (--max-new-tokens 128: base answers of 400 tokens)
    assert long.returncode == 0, long.stderr[-2000:]
    assert "Token indices sequence length" not in long.stderr


def test_a_run_refused_at_start_leaves_no_empty_output_dir(workdir):
    result = run_train(workdir, "--model", "smoke-run/base", "--dataset", "nope.json", "--output-dir", "never-made")
    assert result.returncode == 2 and "nope.json: file not found" in result.stderr
    assert not (workdir / "never-made").exists()
