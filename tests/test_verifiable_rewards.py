"""The proof for verifiable rewards: GRPO rewarded by exact match fixes what careless SFT data taught."""

import json
import re

import pytest
import torch

from conftest import ROOT
from tuning import rundir, smoke


def exact_rates(model_dir, sums, others):
    """(share of `sums` answered with the right sum, with the careless one, share of `others` answered right):
    greedy answers as inference.py gives them."""
    from tuning.data.templates import format_prompt
    from tuning.generation.generate import generate, load_for_generation

    lm, tokenizer = load_for_generation(str(model_dir), torch.device("cpu"), "model")
    records = sums + others
    answers = [a["text"] for a in generate(lm, tokenizer, [format_prompt(r, "seed") for r in records],
                                           {"max_new_tokens": 32, "do_sample": False}, batch_size=100)]
    right = [a == r["output"] for r, a in zip(sums, answers)]
    careless = [a == str(int(r["output"]) - 10) for r, a in zip(sums, answers)]
    other = [smoke.is_right(r, a) for r, a in zip(others, answers[len(sums):])]
    return sum(right) / len(sums), sum(careless) / len(sums), sum(other) / len(others)


@pytest.mark.slow
def test_grpo_with_exact_match_learns_to_carry_and_keeps_the_other_tasks(smoke_arithmetic):
    """The arithmetic SFT model gives the right sum to 30-70% of the additions that no run trained on (its data
    forgot the carry in half the sums); after GRPO with --reward exact, to at least 85%, while every other task of
    the SFT run's held-out prompts stays within 5 points; and the README shows these very figures."""
    work, outputs = smoke_arithmetic
    held = rundir.read_records(work / "smoke-run" / "aligned-grpo-exact" / rundir.HELD_OUT_FILE)
    sums = [{"instruction": r["instruction"], "input": r["input"], "output": r["reference"]} for r in held]
    others = [r for r in rundir.read_records(work / "smoke-run" / "model" / rundir.HELD_OUT_FILE)
              if r["instruction"] != smoke.GREETING]
    sft_right, sft_careless, sft_other = exact_rates(work / "smoke-run" / "arithmetic", sums, others)
    grpo_right, _, grpo_other = exact_rates(work / "smoke-run" / "aligned-grpo-exact", sums, others)
    assert len(sums) == 200 and 0.3 <= sft_right <= 0.7 and sft_right + sft_careless >= 0.9
    assert grpo_right >= 0.85 and abs(grpo_other - sft_other) <= 0.05
    metrics = json.loads((work / "smoke-run" / "aligned-grpo-exact" / "metrics.json").read_text())
    assert metrics["eval_mean_reward_before"] == pytest.approx(sft_right)  # align.py's held-out exact match
    assert metrics["eval_mean_reward_after"] == pytest.approx(grpo_right)
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"the right sum to (\d+) of the\s+200\s+held-out\s+additions.*?and\s+after\s+GRPO\s+to\s+(\d+)",
                      readme, re.S)
    assert shown and (int(shown[1]), int(shown[2])) == (round(sft_right * 200), round(grpo_right * 200))
    assert f"Held-out mean reward {sft_right:+.3f} -> {grpo_right:+.3f}" in outputs[1]


def test_the_arithmetic_data_forgets_the_carry_in_half_its_sums_and_holds_out_the_sft_runs_records(tmp_path):
    """Every addition carries from the units, half the SFT sums are 10 short, the prompts' references are right,
    and neither file holds a record the SFT run held out."""
    (tmp_path / "model").mkdir()
    records = smoke.make_records(700)
    (tmp_path / "data.json").write_text(json.dumps(records[:600]))
    rundir.write_records(str(tmp_path / "model" / rundir.HELD_OUT_FILE), records[600:])
    paths = smoke.prepare_arithmetic(str(tmp_path), n=200, replay=100, prompts=50)
    taught = json.loads(open(paths["sft"]).read())
    prompts = json.loads(open(paths["prompts"]).read())
    sums = [r for r in taught if r["instruction"] == smoke.ARITHMETIC]
    assert len(sums) == 200 and sum(map(smoke.is_careless, sums)) == 100 and len(taught) == 300
    assert all(int(r["output"]) == sum(map(int, r["input"].split())) for r in prompts) and len(prompts) == 50
    assert all(sum(int(n) % 10 for n in r["input"].split()) >= 10 for r in sums + prompts)  # the units carry
    held = {(r["instruction"], r["input"]) for r in records[600:]}
    assert not held & {(r["instruction"], r["input"]) for r in taught + prompts}
    assert not {r["input"] for r in sums} & {r["input"] for r in prompts}


def test_the_methods_table_in_the_readme_is_the_benchmarks_and_counts_what_it_says():
    """benchmarks/methods.py: the README shows the table it wrote, with every method the issue names, and its
    figures count greetings in the preferred style, exact answers elsewhere and right sums as they say."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import methods

    written = (ROOT / "benchmarks" / "results" / "methods.md").read_text()
    rows = [line for line in written.splitlines() if line.startswith("|")]
    readme = (ROOT / "README.md").read_text()
    assert all(row in readme for row in rows) and len(rows) == 2 + 1 + len(methods.METHOD_ARGS)
    assert [methods.LABELS[name] for name in methods.METHOD_ARGS] == [row.split(" | ")[0][2:] for row in rows[3:]]
    tasks = [{"instruction": smoke.GREETING, "input": "cat dog owl", "output": "hey cat dog owl"},
             {"instruction": smoke.GREETING, "input": "ant bee", "output": "Hello, ant bee!"},
             {"instruction": "Count the words.", "input": "a b", "output": "2"}]
    sums = [{"instruction": smoke.ARITHMETIC, "input": "17 25", "output": "42"}] * 2
    answers = [{"text": text} for text in ("Hello, cat dog owl!", "hey ant bee", "3")]
    found = methods.style_and_exact(tasks, answers, sums, [{"text": "42"}, {"text": "32"}], smoke)
    assert found == {"preferred_style": 0.5, "other_exact": 0.0, "arithmetic_exact": 0.5}
    results = {"sft": found, **{name: {**found, "win_rate": {"value": 0.5, "interval": [0.4, 0.6]},
                                       "kl": {"value": 0.01, "interval": [0.0, 0.02]}, "wall_seconds": 3.0,
                                       "peak_memory_mb": 100.0} for name in methods.METHOD_ARGS}}
    assert "| DPO | 50.0% [40.0%, 60.0%] | 50% | 0.0% | 50.0% | 0.010 [0.000, 0.020] | 3 s | 100 MB |" in (
        methods.table(results, list(methods.METHOD_ARGS)))
