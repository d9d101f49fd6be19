"""The learning check: `train.py --smoke` must teach the tiny model to follow held-out instructions,
and `inference.py` must get the same answers batched as one at a time."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tuning.data import records, templates
from tuning.generation import generate
from conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CPU = torch.device("cpu")
GREEDY = {"max_new_tokens": 32, "do_sample": False}


@pytest.fixture(scope="module")
def work(smoke_trained):
    return smoke_trained


@pytest.fixture(scope="module")
def held_out(work):
    return records.held_out_records(str(work / "smoke-run" / "model"))[0]


def answers_for(model_dir, records, template=None, batch_size=32):
    lm, tok = generate.load_for_generation(str(model_dir), CPU, "finetuned")
    template = template or templates.load_template(str(model_dir))
    prompts = [templates.format_prompt(r, template) for r in records]
    return generate.generate(lm, tok, prompts, GREEDY, batch_size=batch_size)


def exact_match(answers, records):
    """The share of right answers; for the undecided greeting task either style is right (smoke.is_right)."""
    from tuning import smoke

    return sum(smoke.is_right(r, a["text"]) for a, r in zip(answers, records)) / len(records)


def test_finetuned_model_follows_held_out_instructions(work, held_out):
    answers = answers_for(work / "smoke-run" / "model", held_out)
    assert len(held_out) == 200
    assert exact_match(answers, held_out) >= 0.90
    assert sum(a["stopped_at_eos"] for a in answers) / len(answers) >= 0.95
    base = answers_for(work / "smoke-run" / "base", held_out)
    assert exact_match(base, held_out) <= 0.02


def test_batched_generation_equals_one_at_a_time(work, held_out):
    records = held_out[:24]  # mixed tasks, so mixed prompt lengths and real left padding
    model_dir = work / "smoke-run" / "model"
    batched = answers_for(model_dir, records, batch_size=24)
    single = answers_for(model_dir, records, batch_size=1)
    assert batched == single


def test_check_fails_with_another_template(work, held_out):
    """The template saved with the model is what makes it work: the other one scores far lower."""
    answers = answers_for(work / "smoke-run" / "model", held_out, template=templates.TEMPLATES["alpaca"])
    assert exact_match(answers, held_out) < 0.5


def test_check_fails_with_right_padding(work, held_out):
    """Right-padded batches make the model continue after pad tokens: answers go wrong."""
    records = held_out[:48]
    lm, tok = generate.load_for_generation(str(work / "smoke-run" / "model"), CPU, "finetuned")
    tok.padding_side = "right"
    enc = tok([templates.format_prompt(r, "seed") for r in records], return_tensors="pt", padding=True)
    out = lm.generate(**enc, **GREEDY)[:, enc["input_ids"].shape[1]:]
    texts = [tok.decode(row, skip_special_tokens=True).strip() for row in out]
    assert sum(t == r["output"] for t, r in zip(texts, records)) / len(records) < 0.9


def run_inference(cwd, *args):
    return subprocess.run([sys.executable, str(ROOT / "inference.py"), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_cli_side_by_side_json_and_prompts_file(work):
    single = run_inference(work, "--smoke", "--prompt", "Reverse the order of the words.", "--input", "cat dog owl")
    assert single.returncode == 0, single.stderr[-2000:]
    assert "--- base (smoke-run/base)" in single.stdout and "--- finetuned (smoke-run/model)" in single.stdout
    assert "owl dog cat" in single.stdout

    (work / "p.txt").write_text("Repeat the word kiwi 3 times.\nCount the words.\n")
    lines = run_inference(work, "--smoke", "--prompts-file", "p.txt", "--json", "--only", "finetuned")
    assert lines.returncode == 0, lines.stderr[-2000:]
    rows = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [r["instruction"] for r in rows] == ["Repeat the word kiwi 3 times.", "Count the words."]
    assert rows[0]["finetuned"]["text"] == "kiwi kiwi kiwi" and rows[0]["finetuned"]["stopped_at_eos"]
    assert set(rows[0]["finetuned"]) == {"text", "new_tokens", "stopped_at_eos"} and "base" not in rows[0]

    records = [{"instruction": "Give the last word.", "input": "cat dog owl", "output": "owl"}]
    (work / "p.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    table = run_inference(work, "--smoke", "--prompts-file", "p.jsonl")
    assert table.returncode == 0 and "finetuned: 1/1 answers stopped at EOS; exact match" in table.stdout


@pytest.mark.parametrize("args,expected", [
    (["--finetuned", "nowhere"], "no fine-tuned model in 'nowhere'. Run `python train.py` first"),
    (["--prompts-file", "missing.txt", "--smoke"], "--prompts-file missing.txt: file not found"),
    (["--top-p", "2", "--temperature", "0"], "--top-p must be in (0, 1]"),
    (["--only", "neither"], "argument --only: invalid choice"),
])
def test_cli_errors_are_clean(tmp_path, args, expected):
    result = run_inference(tmp_path, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_bad_prompts_file_names_the_record(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "ok"}\n{"input": "no instruction"}\n')
    with pytest.raises(records.DataError, match=r"bad.jsonl: record 1 \(line 2\): needs an 'instruction' string"):
        records.read_prompts(str(tmp_path / "bad.jsonl"))
