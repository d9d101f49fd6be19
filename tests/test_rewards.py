"""align.py --reward: the verifiable rewards, a user's reward function and its checks, and GRPO trained on them."""

import json
import re
import textwrap
from types import SimpleNamespace

import pytest

from tuning.cli import UserError
from tuning.preference import rewards


def records_column(*records):
    return [json.dumps(record) for record in records]


def test_exact_and_contains_compare_with_the_reference_after_stripping():
    answers, references = [" 42\n", "42.", "The sum is 42", "41"], ["42 "] * 4
    assert rewards.exact(answers, references) == [1.0, 0.0, 0.0, 0.0]
    assert rewards.contains(answers, references) == [1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("spec,weights,expected", [
    ("", "", ["--reward is empty"]),
    ("exact,bleu", "", ["--reward bleu: not one of model, exact, contains, or FILE.py:FUNCTION"]),
    ("exact,exact", "", ["--reward exact,exact: names a reward twice"]),
    ("exact,model", "1", ["--reward-weights 1: 1 weights for the 2 rewards of --reward exact,model"]),
    ("exact", "one", ["--reward-weights one: not a comma list of numbers"]),
    ("exact,mine.py:score", "1,nan", ["--reward-weights 1,nan: every weight must be a finite number"]),
    ("exact,mine.py:score,model", "1,0.5,2", []),
    ("mine.py:2x", "", ["--reward mine.py:2x: not one of"]),
])
def test_reward_settings_are_checked_all_at_once(spec, weights, expected):
    problems = rewards.spec_problems(spec, weights)
    assert len(problems) == len(expected) and all(p.startswith(e) for p, e in zip(problems, expected))


def write(tmp_path, text: str, name: str = "mine.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_a_users_function_gets_prompts_answers_and_the_records_fields(tmp_path):
    path = write(tmp_path, """
        def score(prompts, completions, output, topic, reference, **kwargs):
            return [float(a.strip() == o) + (0.5 if t == "math" else 0.0) + 0 * len(p) + 0 * len(r)
                    for p, a, o, t, r in zip(prompts, completions, output, topic, reference)]
    """)
    [checked] = rewards.build(f"{path}:score")
    got = checked(prompts=["Q1", "Q2"], completions=[" 4", "5"], reference=["4", "4"],
                  record=records_column({"instruction": "2+2", "output": "4", "topic": "math"},
                                        {"instruction": "2+2", "output": "4"}))
    assert got == [1.5, 0.0] and checked.__name__ == "mine.py:score"  # (TRL logs it as rewards/mine.py:score/mean)


def test_conversation_answers_reach_a_function_as_text(tmp_path):
    [checked] = rewards.build("exact")
    turns = [[{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "Red."}]]
    assert checked(prompts=[[], []], completions=turns, reference=["Blue.", "Blue."], record=["{}", "{}"]) == [1.0, 0.0]


@pytest.mark.parametrize("body,expected", [
    ("def score(prompts, completions, **kw):\n    return [1 / 0 for _ in completions]\n",
     r"--reward {path}:score raised ZeroDivisionError: division by zero \({path}, line 2\)"),
    ("def score(prompts, completions, **kw):\n    return [1.0]\n",
     r"--reward {path}:score returned 1 rewards for 2 answers; it must return one per answer"),
    ("def score(prompts, completions, **kw):\n    return [1.0, float('nan')]\n",
     r"--reward {path}:score returned nan for answer 1 to the prompt 'Q2': every reward must be a finite number"),
    ("def score(prompts, completions, **kw):\n    return [1.0, None]\n",
     r"--reward {path}:score returned None for answer 1 to the prompt 'Q2'"),
    ("def score(prompts, completions, **kw):\n    return 1.0\n",
     r"--reward {path}:score returned float, not a list of floats"),
])
def test_a_function_that_fails_stops_the_run_naming_it(tmp_path, body, expected):
    path = write(tmp_path, body)
    [checked] = rewards.build(f"{path}:score")
    with pytest.raises(UserError, match=expected.format(path=re.escape(path))):
        checked(prompts=["Q1", "Q2"], completions=["a", "b"], reference=["a", "b"], record=["{}", "{}"])


def test_numpy_numbers_count_and_a_dataclass_file_imports(tmp_path):
    """What a function of numpy arrays returns is a number; a file imports as an imported module would (a dataclass
    under postponed annotations looks its module up in sys.modules)."""
    path = write(tmp_path, """
        from __future__ import annotations

        from dataclasses import dataclass

        import numpy as np


        @dataclass
        class Rule:
            bonus: float


        def score(prompts, completions, **kwargs):
            return np.ones(len(completions), dtype=np.float32) * Rule(0.5).bonus


        def flags(prompts, completions, **kwargs):
            return np.ones(len(completions), dtype=bool)
    """)
    [checked] = rewards.build(f"{path}:score")
    assert checked(prompts=["Q"], completions=["a"], reference=["a"], record=["{}"]) == [0.5]
    [flags] = rewards.build(f"{path}:flags")
    with pytest.raises(UserError, match=r"returned np.True_ for answer 0 .*must be a number \(an int or a float\)"):
        flags(prompts=["Q"], completions=["a"], reference=["a"], record=["{}"])


def test_a_function_that_cannot_be_loaded_is_named_with_its_file(tmp_path):
    with pytest.raises(UserError, match=r"--reward nowhere.py:score: no file nowhere.py"):
        rewards.load_function("nowhere.py:score")
    broken = write(tmp_path, "def score(:\n    pass\n", "broken.py")
    with pytest.raises(UserError, match=rf"importing {re.escape(broken)} raised SyntaxError: .* line 1\)"):
        rewards.load_function(f"{broken}:score")
    other = write(tmp_path, "import math\n\n\ndef grade(prompts, completions, **kw):\n    return [0.0] * len(completions)\n",
                  "other.py")
    with pytest.raises(UserError, match=rf"{re.escape(other)} has no function score \(it defines grade\)$"):
        rewards.load_function(f"{other}:score")


def test_the_held_out_score_adds_the_rewards_with_their_weights(tmp_path):
    path = write(tmp_path, "def short(prompts, completions, **kw):\n    return [-len(a) for a in completions]\n")
    functions = rewards.build(f"exact,{path}:short")
    scorer = rewards.Scorer(functions, rewards.weights_of(f"exact,{path}:short", "2,0.5"))
    rows = [{"prompt": "Q", "judge_prompt": "Q", "reference": "42", "record": "{}"}] * 2
    assert scorer.score(rows, ["42", "4200"]) == [2.0 - 1.0, 0.0 - 2.0]


def align_args(*argv):
    import align
    from tuning import cli

    return cli.parse_or_exit(cli.build_parser(align), align.validate_args, list(argv))


@pytest.mark.parametrize("argv,expected", [
    (["--method", "grpo"], "--method grpo with --reward model needs --reward-model DIR"),
    (["--method", "grpo", "--reward", "exact", "--reward-model", "rm"],
     "--reward-model: only used when --reward has model (it is exact)"),
    (["--reward", "exact"], "--reward and --reward-weights: only used with --method rloo or grpo"),
    (["--method", "grpo", "--reward", "exact", "--num-generations", "1"], "--num-generations must be >= 2"),
    (["--method", "rloo", "--reward", "exact,model", "--reward-model", "rm", "--reward-weights", "1"],
     "--reward-weights 1: 1 weights for the 2 rewards"),
])
def test_bad_reward_settings_are_refused_naming_the_flag(capsys, argv, expected):
    with pytest.raises(SystemExit) as stop:
        align_args(*argv)
    assert stop.value.code == 2 and expected in capsys.readouterr().err


def test_grpo_with_a_verifiable_reward_needs_no_reward_model(capsys):
    args = align_args("--method", "grpo", "--reward", "exact,contains", "--reward-weights", "1,0.5")
    assert args.reward_model == ""
    with pytest.raises(SystemExit):  # a setting it would ignore
        align_args("--method", "grpo", "--reward", "exact", "--missing-eos-penalty", "2")
    assert "--missing-eos-penalty: only used with --reward model" in capsys.readouterr().err


def prepare(tmp_path, tokenizer, records, reward):
    import align

    data = tmp_path / "records.json"
    data.write_text(json.dumps(records))
    args = SimpleNamespace(method="grpo", reward=reward, dataset=str(data), skip_invalid=False, val_size=2, seed=0,
                           max_length=64, max_new_tokens=4, reward_model="")
    return align.prepare_data(args, tokenizer, "seed", None, lambda *a: None)


def test_references_of_prompt_only_records_and_fields_that_clash_with_the_arguments(tmp_path, gpt2_tokenizer):
    """A number is a reference (as text), an empty one is none; a field named as an argument of the user's function
    is refused before training, naming it, unless it is the record's own reference."""
    from tuning.models import loading

    tok = loading.ready_tokenizer(gpt2_tokenizer)
    solved = [{"prompt": f"{i} + {i} =", "answer": 2 * i} for i in range(6)]
    data, _, _ = prepare(tmp_path, tok, solved, "exact")
    references = list(data["train"]["reference"]) + list(data["validation"]["reference"])
    assert sorted(references) == sorted(str(2 * i) for i in range(6))
    with pytest.raises(UserError, match="6 of the 6 prompts .* have no reference answer"):
        prepare(tmp_path, tok, [{"prompt": f"{i} + {i} =", "answer": ""} for i in range(6)], "exact")
    mine = write(tmp_path, "def score(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    prepare(tmp_path, tok, [{"prompt": f"Q{i}", "reference": f"A{i}"} for i in range(6)], f"exact,{mine}:score")
    with pytest.raises(UserError, match=r"have a field named 'completions', which is also an argument of your reward "
                                        r"function; rename the field"):
        prepare(tmp_path, tok, [{"instruction": f"Q{i}", "output": "A", "completions": 1} for i in range(6)],
                f"{mine}:score")


def test_exact_on_records_without_a_reference_is_refused_before_training(tmp_path, gpt2_tokenizer):
    """Instructions alone have no answer to check: --reward exact says how many and where a reference comes from."""
    import align
    from tuning.models import loading

    data = tmp_path / "instructions.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}."} for i in range(10)]))
    args = SimpleNamespace(method="grpo", reward="exact", dataset=str(data), skip_invalid=False, val_size=2, seed=0,
                           max_length=64, max_new_tokens=4, reward_model="")
    with pytest.raises(UserError, match=r"--reward exact: 10 of the 10 prompts of .*instructions.json have no "
                                        r"reference answer"):
        align.prepare_data(args, loading.ready_tokenizer(gpt2_tokenizer), "seed", None, lambda *a: None)


def test_grpo_trains_on_the_exact_reward_and_reports_its_rate(tmp_path, gpt2_tokenizer):
    """A GRPO step on real records rewarded by exact match: TRL logs the reward under its name, and the held-out
    evaluation scores greedy answers with the same reward (here 0: random weights never give the reference)."""
    from test_align import real_pairs, rloo_trainer
    from tuning.models import loading

    records, _ = real_pairs(2)
    trainer, prompts = rloo_trainer(tmp_path, loading.ready_tokenizer(gpt2_tokenizer), records, method="grpo",
                                    reward="exact")
    assert type(trainer).__name__ == "AlignGRPOTrainer" and trainer.reward_func_names == ["exact"]
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert "rewards/exact/mean" in logged and trainer.state.global_step == 1
    metrics = trainer.evaluate()
    assert metrics["eval_mean_reward"] == 0.0 and len(metrics["eval_rewards"]) == 2
    greedy = trainer.greedy_answers([{"prompt": p} for p in prompts])[0]["raw_text"]  # the reference, for prompt 0
    trainer.eval_dataset = trainer.eval_dataset.map(
        lambda row, i: {"reference": greedy if i == 0 else row["reference"]}, with_indices=True)
    assert trainer.evaluate()["eval_rewards"] == [1.0, 0.0]
