"""evaluation.py: metric functions on hand-made strings, and a full report on the smoke model."""

import json
import os
import subprocess
import sys

import pytest

import evaluation as ev
from conftest import ROOT


def test_repeated_4gram_share():
    assert ev.repeated_ngram_share("a b c d e f".split()) == 0.0
    # "a b c d" x3: 9 four-grams, of which 4 are distinct -> 5 of 9 repeat
    assert ev.repeated_ngram_share("a b c d a b c d a b c d".split()) == pytest.approx(5 / 9)
    assert ev.repeated_ngram_share(["x"] * 8) == pytest.approx(4 / 5)
    assert ev.repeated_ngram_share("a b c".split()) == 0.0


def test_distinct_2():
    assert ev.distinct_n("the cat sat".split()) == 1.0
    assert ev.distinct_n("a a a a a".split()) == pytest.approx(1 / 4)
    assert ev.distinct_n("a b a b".split()) == pytest.approx(2 / 3)
    assert ev.distinct_n(["one"]) == 1.0


def test_lcs_and_rouge_l():
    assert ev.lcs_length("a b c d e".split(), "a c e".split()) == 3
    assert ev.rouge_l_f1("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert ev.rouge_l_f1("", "anything") == 0.0 and ev.rouge_l_f1("x y", "a b") == 0.0
    # LCS "the cat the mat" = 4; P = 4/6, R = 4/5 -> F1 = 8/11
    assert ev.rouge_l_f1("the cat sat on the mat", "The cat saw the mat") == pytest.approx(8 / 11)


def test_generation_metrics_and_comparison():
    answers = [{"text": "a b", "new_tokens": 2, "stopped_at_eos": True},
               {"text": "x x x x x", "new_tokens": 5, "stopped_at_eos": False}]
    m = ev.generation_metrics(answers, [[1, 2], [7, 7, 7, 7, 7]], ["a b", "y"], [2, 1])
    assert m["eos_rate"] == 0.5 and m["mean_length"] == 3.5 and m["length_gap"] == 2.0
    assert m["repeated_4gram_share"] == pytest.approx(0.25) and m["distinct_2"] == pytest.approx(0.625)
    assert m["rouge_l_f1"] == pytest.approx(0.5)
    better = ev.compare({**m, "response_loss": 2.0, "response_perplexity": 7.4},
                        {**m, "response_loss": 1.0, "response_perplexity": 2.7, "eos_rate": 1.0})
    assert better["response_loss"] and better["eos_rate"] and not better["distinct_2"]


def test_smoke_report_shows_fine_tuning_wins_everywhere(smoke_trained):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "evaluation.py"), "--smoke", "--num-generations", "60",
                             "--max-new-tokens", "40"], cwd=smoke_trained, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = smoke_trained / "smoke-run" / "model" / "eval"
    report = json.loads((out / "report.json").read_text())
    assert report["finetuned"]["generations"] == 60 and report["finetuned"]["perplexity_examples"] == 200
    assert all(report["finetuned_better"].values()), report["finetuned_better"]
    assert report["finetuned"]["rouge_l_f1"] > 0.9 and report["finetuned"]["eos_rate"] > 0.95
    markdown = (out / "report.md").read_text()
    assert "| ROUGE-L F1 | higher |" in markdown and "## Samples" in markdown and "**reference:**" in markdown
    assert (out / "report.png").stat().st_size > 10000
    assert "Generating (finetuned)" in result.stderr  # the progress bar


def test_win_rate_counts_ties_half():
    assert ev.win_rate([2.0, 1.0, 0.0, -1.0], [1.0, 1.0, 3.0, -2.0]) == pytest.approx(0.625)


def test_identical_answers_are_scored_once_so_they_tie(monkeypatch):
    """A judge whose scores wobble with the batch (as GPU kernels do with shapes) still ties identical answers:
    each distinct (prompt, answer) text is scored once."""
    from tuning.models import scoring

    calls = []

    def score_texts(model, tokenizer, prompts, answers, batch_size, cut=False, chat_template=None):
        calls.append(len(answers))
        return [len(answer) + 1e-8 * len(calls) * i for i, answer in enumerate(answers)]

    monkeypatch.setattr(scoring, "score_texts", score_texts)
    records = [{"instruction": f"Say {word}.", "input": ""} for word in ("a", "b", "c")]
    same = [{"raw_text": text} for text in (" yes", " no", " maybe")]
    scores = ev.rewards((None, None, "seed"), records, {"base": same, "finetuned": [dict(a) for a in same]}, 2)
    assert calls == [3] and scores["base"] == scores["finetuned"]
    assert ev.win_rate(scores["finetuned"], scores["base"]) == 0.5


def test_a_model_against_itself_wins_exactly_half(smoke_reward):
    work, _ = smoke_reward
    result = subprocess.run([sys.executable, str(ROOT / "evaluation.py"), "--base", "smoke-run/model", "--finetuned",
                             "smoke-run/model", "--num-generations", "30", "--max-new-tokens", "16", "--limit", "8",
                             "--batch-size", "7", "--reward-model", "smoke-run/reward", "--output-dir", "eval-self"],
                            cwd=work, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((work / "eval-self" / "report.json").read_text())
    assert report["win_rate"] == 0.5 and report["base"]["mean_reward"] == report["finetuned"]["mean_reward"]


def test_reward_model_judges_the_smoke_models(smoke_reward):
    work, _ = smoke_reward
    result = subprocess.run([sys.executable, str(ROOT / "evaluation.py"), "--smoke", "--num-generations", "40",
                             "--max-new-tokens", "24", "--limit", "20", "--reward-model", "smoke-run/reward",
                             "--output-dir", "eval-rm"], cwd=work, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((work / "eval-rm" / "report.json").read_text())
    assert report["reward_model"] == "smoke-run/reward" and report["win_rate"] > 0.6  # 80% when measured
    assert report["finetuned"]["mean_reward"] > report["base"]["mean_reward"]
    assert report["finetuned_better"]["mean_reward"]
    markdown = (work / "eval-rm" / "report.md").read_text()
    assert "| mean reward (reward model) | higher |" in markdown and "AlpacaFarm's simulated preference" in markdown


def test_missing_run_is_a_clean_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "evaluation.py"), "--finetuned", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Run `python train.py` first" in result.stderr
    assert "Traceback" not in result.stderr
