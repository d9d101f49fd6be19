"""evaluation.py: metric functions on hand-made strings; intervals, verdicts, the length-controlled win rate and the KL
on constructed data and tiny models; and full reports on the smoke models."""

import json
import os
import subprocess
import sys

import numpy as np
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


def test_answer_metrics_from_each_prompts_values():
    answers = [{"text": "a b", "new_tokens": 2, "stopped_at_eos": True},
               {"text": "x x x x x", "new_tokens": 5, "stopped_at_eos": False}]
    values = ev.answer_values(answers, [[1, 2], [7, 7, 7, 7, 7]], ["a b", "y"], [2, 1])
    m = ev.whole(ev.answer_metrics, values, 2)
    assert m["eos_rate"] == 0.5 and m["mean_length"] == 3.5 and m["length_gap"] == 2.0
    assert m["repeated_4gram_share"] == pytest.approx(0.25) and m["distinct_2"] == pytest.approx(0.625)
    assert m["rouge_l_f1"] == pytest.approx(0.5) and values["characters"] == [3, 9]
    # the loss of a set of examples is token-weighted: (2 + 10) / (1 + 4), not the mean of 2 and 2.5
    losses = {"loss_sum": [2.0, 10.0, 0.0], "loss_tokens": [1, 4, 0]}  # (the third: a record training drops)
    assert ev.whole(ev.loss_metrics, losses, 3)["response_loss"] == pytest.approx(12 / 5)


def per_prompt(n: int, **columns) -> dict:
    """A model's per-prompt values for compare(): every metric 0 (one response token of loss 0 per example)
    unless given."""
    values = {"loss_sum": [0.0] * n, "loss_tokens": [1] * n, "stopped_at_eos": [0.0] * n, "length": [0] * n,
              "characters": [0] * n, "reference_length": [0] * n, "repeated_4gram_share": [0.0] * n,
              "distinct_2": [0.0] * n, "rouge_l_f1": [0.0] * n}
    return {**values, **{key: list(column) for key, column in columns.items()}}


def test_the_bootstrap_is_seeded_holds_its_estimate_and_narrows_with_more_prompts():
    from tuning.generation import confidence

    gains = np.random.default_rng(3).normal(0.1, 1.0, 50)

    def interval(values, seed=0):
        return confidence.bootstrap(lambda rows: {"gain": values[rows].mean(-1)}, len(values), 1000, seed)["gain"]

    first = interval(gains)
    assert first == interval(gains) and first != interval(gains, seed=1)
    low, high = first["interval"]
    assert first["value"] == pytest.approx(gains.mean()) and low < first["value"] < high
    more = interval(np.tile(gains, 8))  # the same spread of gains, on 8 times the prompts: half as wide, or less
    assert more["value"] == pytest.approx(first["value"])
    assert more["interval"][1] - more["interval"][0] < (high - low) / 2


def test_a_difference_is_better_only_when_its_interval_excludes_zero():
    from tuning.generation.confidence import verdict

    assert verdict([0.01, 0.2], "higher") == "better" and verdict([0.01, 0.2], "lower") == "worse"
    assert verdict([-0.05, 0.2], "higher") == verdict([-0.05, 0.2], "lower") == "no clear difference"
    n = 40
    noise = [0.3 if i % 2 else -0.25 for i in range(n)]  # mean +0.025 on a spread of 0.28: the interval holds 0
    first = per_prompt(n, rouge_l_f1=[0.5] * n, distinct_2=[0.5] * n, loss_sum=[2.0] * n)
    second = per_prompt(n, rouge_l_f1=[0.5 + x for x in noise], distinct_2=[0.9] * (n - 2) + [0.4, 0.4],
                        loss_sum=[2.5 + x for x in noise])
    found = ev.compare(first, second, 500, 0)
    rouge = found["rouge_l_f1"]
    assert rouge["value"] > 0 and rouge["interval"][0] < 0 < rouge["interval"][1]
    assert rouge["verdict"] == "no clear difference"
    assert found["distinct_2"]["verdict"] == "better" and found["response_loss"]["verdict"] == "worse"
    assert found["eos_rate"] == {"value": 0.0, "interval": [0.0, 0.0], "verdict": "no clear difference"}
    report = ev.comparison(first, second, None, "no vocabulary", 500, 0)
    assert report["finetuned_better"]["distinct_2"] and not report["finetuned_better"]["rouge_l_f1"]
    assert not report["finetuned_better"]["response_loss"]


# Constructed outcomes of the second model, on 40 prompts where its answer is 30 characters longer, then 10 where
# it is 30 shorter. BY_LENGTH: it wins 3 of 4 where longer and 1 of 4 where shorter (2 wins and a tie of 10): 65%
# raw, all of it length. UNRELATED: 70% in both groups: length explains none of it.
LONGER = [30.0] * 40 + [-30.0] * 10
BY_LENGTH = [1.0] * 30 + [0.0] * 10 + [1.0, 1.0, 0.5] + [0.0] * 7
UNRELATED = [1.0] * 28 + [0.0] * 12 + [1.0] * 7 + [0.0] * 3


def test_the_length_controlled_win_rate_takes_out_wins_earned_by_length_alone():
    from tuning.generation import confidence

    assert np.mean(BY_LENGTH) == 0.65 and np.mean(UNRELATED) == 0.7
    assert confidence.length_controlled_win_rate(BY_LENGTH, LONGER) == pytest.approx(0.5, abs=0.01)
    assert confidence.length_controlled_win_rate(UNRELATED, LONGER) == pytest.approx(0.7, abs=0.01)
    # degenerate data: no NaN, the raw win rate, and a reason for the report
    assert confidence.length_controlled_win_rate([1.0] * 5, [3, -2, 0, 7, 1]) == 1.0
    assert confidence.length_controlled_win_rate([0.0] * 5, [3, -2, 0, 7, 1]) == 0.0
    assert confidence.length_controlled_win_rate([1.0, 0.0, 0.5, 1.0], [0] * 4) == 0.625
    assert "every answer won" in confidence.length_control_degenerate(np.ones(3), np.arange(3))
    assert "same on every prompt" in confidence.length_control_degenerate(np.array([1.0, 0.0]), np.zeros(2))
    assert confidence.length_control_degenerate(np.array(BY_LENGTH), np.array(LONGER)) == ""
    # length alone decides every outcome: the MLE's slope is infinite, the penalty on it keeps the fit finite
    separated = confidence.length_controlled_win_rate([1.0] * 8 + [0.0] * 8, list(range(1, 9)) + list(range(-8, 0)))
    assert 0.0 < separated < 1.0


def test_the_report_gives_both_win_rates_with_intervals():
    """65% raw is better than even on 50 prompts; once length is controlled there is no clear difference."""
    scores = {1.0: 1.0, 0.5: 0.0, 0.0: -1.0}  # outcome -> the second model's reward against the first's 0
    first = per_prompt(50, reward=[0.0] * 50, characters=[100] * 50)
    second = per_prompt(50, reward=[scores[x] for x in BY_LENGTH], characters=[100 + d for d in LONGER])
    rates = ev.comparison(first, second, None, "-", 1000, 0)["win_rates"]
    assert rates["raw"]["value"] == 0.65 and rates["raw"]["verdict"] == "better"
    controlled = rates["length_controlled"]
    assert controlled["value"] == pytest.approx(0.5, abs=0.01) and controlled["verdict"] == "no clear difference"
    assert controlled["interval"][0] < 0.5 < controlled["interval"][1]
    assert "AlpacaEval 2.0" in controlled["method"] and "note" not in controlled
    everywhere = ev.comparison(first, per_prompt(50, reward=[1.0] * 50, characters=[140] * 50), None, "-", 200, 0)
    assert everywhere["win_rates"]["raw"] == {"value": 1.0, "interval": [1.0, 1.0], "verdict": "better"}
    assert "every answer won" in everywhere["win_rates"]["length_controlled"]["note"]


def tiny_gpt2(seed: int, vocab: int = 23):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_head=2, n_embd=16, n_positions=64)).eval()


# (prompt ids, answer ids): prompts of different lengths (left-padded in a batch), answers of different lengths
SEQUENCES = [([5, 6, 7, 8, 9], [3, 4, 0]), ([1, 2], [7]), ([9, 9, 9], [2, 2, 2, 2, 0]), ([4], [])]


def test_kl_is_zero_for_a_model_against_itself_and_the_same_in_any_batch():
    first, second = tiny_gpt2(0), tiny_gpt2(1)
    sums, counts = ev.kl_per_prompt(first, first, SEQUENCES, 0, 3)
    assert sums == [0.0] * 4 and counts == [3, 1, 5, 0]
    assert ev.kl_per_prompt(first, tiny_gpt2(0), SEQUENCES, 0, 3)[0] == [0.0] * 4  # the same weights, loaded again
    apart, _ = ev.kl_per_prompt(first, second, SEQUENCES, 0, 3)
    assert all(kl > 0 for kl in apart[:3]) and apart[3] == 0.0
    # each row alone, no padding: the same KL, so the padded rows' positions were counted from their first token
    alone = [ev.kl_per_prompt(first, second, [sequence], 0, 1)[0][0] for sequence in SEQUENCES]
    assert apart == pytest.approx(alone, rel=1e-5)
    # the other way round is another divergence: KL is not symmetric
    assert ev.kl_per_prompt(second, first, SEQUENCES, 0, 3)[0] != pytest.approx(apart, rel=1e-3)


class Bigram:
    """A stub language model whose next-token logits are a row of `table` picked by the current token: its KL to
    another is computable by hand, step by step."""

    device = "cpu"

    def __init__(self, table):
        self.table = table

    def __call__(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids][:, -logits_to_keep:])


def test_kl_equals_the_hand_computed_one():
    import math

    import torch

    # two tokens: the second model says 50/50 after token 0 and 90/10 after token 1; the first 25/75 after both
    second = Bigram(torch.tensor([[0.0, 0.0], [math.log(9), 0.0]]))
    first = Bigram(torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]]))
    kl_after_0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_after_1 = 0.9 * math.log(0.9 / 0.25) + 0.1 * math.log(0.1 / 0.75)
    # prompt [0, 1], answer [0, 1, 1]: predicted after 1, 0, 1; prompt [1], answer [0]: after 1 (left-padded)
    sums, counts = ev.kl_per_prompt(first, second, [([0, 1], [0, 1, 1]), ([1], [0])], 0, 2)
    assert counts == [3, 1]
    assert sums == pytest.approx([2 * kl_after_1 + kl_after_0, kl_after_1], rel=1e-6)
    found = ev.drift(sums, counts, per_prompt(2, length=[2, 1]), per_prompt(2, length=[3, 1]), 200, 0)
    assert found["kl"]["value"] == pytest.approx((3 * kl_after_1 + kl_after_0) / 4, rel=1e-6)  # per token
    assert found["kl"]["tokens"] == 4 and found["length_change"]["value"] == 0.5


def test_kl_needs_one_vocabulary(tiny_tokenizer):
    from tuning import smoke

    other = smoke.build_tokenizer(["an other tokenizer, trained on other words"] * 3, vocab_size=280)
    model = tiny_gpt2(0, vocab=len(tiny_tokenizer))
    assert ev.vocabulary_mismatch((model, tiny_tokenizer), (model, tiny_tokenizer)) == ""
    assert "different vocabularies" in ev.vocabulary_mismatch((model, tiny_tokenizer), (model, other))
    wider = tiny_gpt2(0, vocab=len(tiny_tokenizer) + 8)
    assert "output layers differ" in ev.vocabulary_mismatch((model, tiny_tokenizer), (wider, tiny_tokenizer))


def compared_report(**overrides) -> dict:
    """A report as main() writes it, of two models on 50 prompts (a reward model judged; the KL measured)."""
    scores = {1.0: 1.0, 0.5: 0.0, 0.0: -1.0}
    first = per_prompt(50, reward=[0.0] * 50, characters=[100] * 50, length=[20] * 50, rouge_l_f1=[0.5] * 50)
    second = per_prompt(50, reward=[scores[x] for x in BY_LENGTH], characters=[100 + d for d in LONGER],
                        length=[26] * 40 + [14] * 10, rouge_l_f1=[0.6] * 50)
    report = {"base_model": "smoke-run/model", "finetuned_model": "smoke-run/aligned-dpo", "dataset": "d.json",
              "seed": 42, "val_size": 50, "max_new_tokens": 32, "reference_mean_length": 20.0,
              "reward_model": "smoke-run/reward", "labels": ev.STAGE_LABELS}
    for role, values in (("base", first), ("finetuned", second)):
        report[role] = {**ev.whole(ev.loss_metrics, values, 50), **ev.whole(ev.answer_metrics, values, 50),
                        "perplexity_examples": 50, "generations": 50, "per_prompt": values}
    kl = ([0.02 * n for n in second["length"]], second["length"])
    return {**report, **ev.comparison(first, second, kl, "", 1000, 0), **overrides}


def test_report_md_shows_the_intervals_verdicts_and_methods(tmp_path):
    report = compared_report()
    ev.write_markdown(str(tmp_path / "report.md"), report, [])
    markdown = (tmp_path / "report.md").read_text()
    assert "| metric | better | SFT | aligned | aligned - SFT (95% interval) | aligned better? |" in markdown
    assert "| ROUGE-L F1 | higher | 0.5 | 0.6 | +0.1 [+0.1, +0.1] | better |" in markdown
    assert "| stops at EOS | higher | 0 | 0 | +0 [+0, +0] | no clear difference |" in markdown
    assert "| mean answer length (tokens) | - | 20.0 | 23.6 | +3.6 [+2.16, +4.8] | reference: 20.0 |" in markdown
    assert "95% percentile bootstrap interval" in markdown and "1000 times (seed 0)" in markdown
    assert "**Win rate of the aligned model over the SFT: 65.0%** of 50 prompts (95% interval 52.0% to 78.0%: " \
           "better;" in markdown
    assert "**Length-controlled win rate: 50.0%**" in markdown and "AlpacaEval 2.0" in markdown
    assert "no clear difference): whether the win survives" in markdown
    assert "**KL(aligned ‖ SFT): 0.02 nats per token** (95% interval 0.02 to 0.02)" in markdown
    assert "1180 tokens" in markdown
    ev.plot_report(str(tmp_path / "report.png"), report)
    assert (tmp_path / "report.png").stat().st_size > 10000
    assert ev.bar_colors(report, "rouge_l_f1") == ["tab:blue", "tab:green"]
    assert ev.bar_colors(report, "eos_rate") == ["tab:blue", "tab:gray"]

    unmeasured = compared_report(kl=None, length_change=None, kl_not_measured="the tokenizers differ")
    ev.write_markdown(str(tmp_path / "other.md"), unmeasured, [])
    markdown = (tmp_path / "other.md").read_text()
    assert "**KL(aligned ‖ SFT): not measured**, nor the change in answer length in tokens: the tokenizers " \
           "differ." in markdown
    assert "| mean answer length (tokens) | - | 20.0 | 23.6 | not measured | reference: 20.0 |" in markdown


def test_smoke_report_shows_fine_tuning_wins_everywhere(smoke_trained):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "evaluation.py"), "--smoke", "--num-generations", "60",
                             "--max-new-tokens", "40"], cwd=smoke_trained, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = smoke_trained / "smoke-run" / "model" / "eval"
    report = json.loads((out / "report.json").read_text())
    assert report["finetuned"]["generations"] == 60 and report["finetuned"]["perplexity_examples"] == 200
    assert all(report["finetuned_better"].values()), report["differences"]  # every interval clear of zero
    assert report["finetuned"]["rouge_l_f1"] > 0.9 and report["finetuned"]["eos_rate"] > 0.95
    assert report["kl"]["value"] > 0 and report["kl"]["interval"][0] > 0 and report["length_change"]["value"] < 0
    assert len(report["finetuned"]["per_prompt"]["rouge_l_f1"]) == 60
    markdown = (out / "report.md").read_text()
    assert "| ROUGE-L F1 | higher |" in markdown and "## Samples" in markdown and "**reference:**" in markdown
    assert "95% percentile bootstrap" in markdown and "**KL(fine-tuned ‖ base): " in markdown
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
    assert report["win_rates"]["raw"] == {"value": 0.5, "interval": [0.5, 0.5], "verdict": "no clear difference"}
    assert "same on every prompt" in report["win_rates"]["length_controlled"]["note"]  # (every answer the same)
    assert report["kl"]["value"] == 0.0 and report["length_change"]["value"] == 0.0
    assert {found["verdict"] for found in report["differences"].values()} == {"no clear difference"}


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
