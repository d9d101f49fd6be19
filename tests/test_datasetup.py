"""datasetup.py: templates, loss mask, EOS, truncation, record errors, split and CLI."""

import json
import subprocess
import sys

import pytest

from tuning.data import sft, templates
from tuning.data.records import DataError, is_placeholder_input, load_records, split_records
from conftest import ROOT, shared_path

REC = {"instruction": "Name a color.", "input": "", "output": "Blue."}
REC_IN = {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"}


# ---------------------------------------------------------------- templates (exact strings)
def test_seed_template_exact():
    assert templates.format_prompt(REC, "seed") == "### Instruction:\nName a color.\n\n### Response:\n"
    assert templates.format_prompt(REC_IN, "seed") == (
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 + 3\n\n### Response:\n")


def test_alpaca_template_exact():
    assert templates.format_prompt(REC, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.\n\n### Response:\n")
    assert templates.format_prompt(REC_IN, "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 + 3\n\n### Response:\n")


def test_missing_input_uses_no_input_form():
    assert templates.format_prompt({"instruction": "Hi", "output": "x"}) == "### Instruction:\nHi\n\n### Response:\n"


@pytest.mark.parametrize("text", ["No input", "Noinput", "<no input>", "< noinput >", "<Noinput>.", "NO INPUT.",
                                  "  <No Input>  "])
def test_placeholder_inputs_are_empty(tmp_path, text):
    assert is_placeholder_input(text)
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "input": text, "output": "hi"}]))
    records, report = load_records(str(path))
    assert records[0]["input"] == "" and report["placeholder_inputs"] == 1
    assert templates.format_prompt(records[0]) == "### Instruction:\nSay hi.\n\n### Response:\n"


@pytest.mark.parametrize("text", ["No input needed here", "input", "Know input", "N/A"])
def test_real_inputs_are_not_placeholders(text):
    assert not is_placeholder_input(text)


# ---------------------------------------------------------------- tokens and labels
def check_example(example, tokenizer, record, template="seed"):
    prompt_ids = templates.encode_prompt(tokenizer, templates.format_prompt(record, template))
    n = len(prompt_ids)
    assert example["input_ids"][:n] == prompt_ids, "the prompt must come first, whole"
    assert example["labels"][:n] == [sft.IGNORE_INDEX] * n, "every prompt token is masked"
    assert example["labels"][n:] == example["input_ids"][n:], "every response token carries loss"
    assert example["prompt_length"] == n
    return n


def test_labels_mask_prompt_and_end_with_eos(tiny_tokenizer):
    for record in (REC, REC_IN):
        ex = sft.tokenize_example(record, tiny_tokenizer, "seed", 128)
        n = check_example(ex, tiny_tokenizer, record)
        eos = tiny_tokenizer.eos_token_id
        assert ex["input_ids"][-1] == eos and ex["labels"][-1] == eos
        response = tiny_tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        assert ex["input_ids"][n:-1] == response
        assert not ex["truncated"]


def test_train_on_prompt_keeps_prompt_labels(tiny_tokenizer):
    ex = sft.tokenize_example(REC_IN, tiny_tokenizer, "seed", 128, train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]


def test_truncation_cuts_response_and_drops_eos(tiny_tokenizer):
    record = {"instruction": "Repeat.", "input": "", "output": " ".join(["apple"] * 50)}
    n_prompt = len(templates.encode_prompt(tiny_tokenizer, templates.format_prompt(record)))
    ex = sft.tokenize_example(record, tiny_tokenizer, "seed", n_prompt + 5)
    check_example(ex, tiny_tokenizer, record)
    assert len(ex["input_ids"]) == n_prompt + 5 and ex["truncated"]
    assert tiny_tokenizer.eos_token_id not in ex["input_ids"][n_prompt:]
    assert sft.tokenize_example(record, tiny_tokenizer, "seed", n_prompt) is None, "no room left: dropped"


def test_eos_kept_only_when_response_and_eos_fit():
    assert sft.build_example([1, 2], [3, 4], 9, 5)["input_ids"] == [1, 2, 3, 4, 9]
    cut = sft.build_example([1, 2], [3, 4], 9, 4)
    assert cut["input_ids"] == [1, 2, 3, 4] and cut["truncated"]


def test_batched_tokenization_matches_single(tiny_tokenizer):
    records = [REC, REC_IN, {"instruction": "Long", "input": "", "output": "x " * 200}]
    batched = sft.tokenize_records(records, tiny_tokenizer, "alpaca", 80)
    for row, record in zip(batched, records):
        single = sft.tokenize_example(record, tiny_tokenizer, "alpaca", 80)
        assert row["input_ids"] == single["input_ids"] and row["labels"] == single["labels"]


def test_too_long_prompts_are_dropped_and_counted(tiny_tokenizer, tmp_path):
    records = [REC, {"instruction": "word " * 100, "input": "", "output": "ok"}] * 3
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    limit = len(templates.encode_prompt(tiny_tokenizer, templates.format_prompt(REC))) + 10
    dsd, report = sft.prepare_datasets(str(path), tiny_tokenizer, "seed", limit, val_size=1, seed=0)
    kept = len(dsd["train"]) + len(dsd["validation"])
    assert kept == 3 and report["records_per_split"]["train"] + 1 == 6


# ---------------------------------------------------------------- record errors
def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name,text,expected", [
    ("d.json", '[{"instruction": "a", "output": "b"},', "d.json: malformed JSON at line 1"),
    ("d.json", '{"instruction": "a"}', "d.json: expected a JSON list of records"),
    ("d.json", '[{"instruction": "a", "output": "b"}, 7]', "d.json: record 1: is an int, not an object"),
    ("d.json", '[{"instruction": "a"}]', "d.json: record 0: field 'output' is missing"),
    ("d.json", '[{"instruction": 3, "output": "b"}]', "d.json: record 0: field 'instruction' is an int, not a string"),
    ("d.json", '[{"instruction": "a", "input": 5, "output": "b"}]', "record 0: field 'input' is an int"),
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n',
     "d.jsonl: record 1 (line 3): field 'output' is missing"),
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n', "d.jsonl: record 1 (line 2): malformed JSON"),
])
def test_invalid_records_name_file_record_and_field(tmp_path, name, text, expected):
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_records(write(tmp_path, name, text))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.json: file not found"):
        load_records(str(tmp_path / "nope.json"))


def test_skip_invalid_drops_and_reports(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"instruction": "a", "output": "b"}\n[1]\n{"output": "c"}\n{bad\n')
    records, report = load_records(path, skip_invalid=True)
    assert records == [{"instruction": "a", "input": "", "output": "b"}]
    assert len(report["skipped"]) == 3
    assert "record 2 (line 3): field 'instruction' is missing" in report["skipped"][1]


def test_empty_records_dropped_and_counted(tmp_path):
    data = [REC, {"instruction": "  ", "output": "x"}, {"instruction": "x", "input": "", "output": "\n"}, REC_IN]
    records, report = load_records(write(tmp_path, "d.json", json.dumps(data)))
    assert len(records) == 2 and report["empty_dropped"] == [1, 2]


def test_nothing_usable_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no usable records"):
        load_records(write(tmp_path, "d.json", json.dumps([{"instruction": "", "output": "x"}])))


def test_extra_fields_ignored(tmp_path):
    records, _ = load_records(write(tmp_path, "d.json", json.dumps([dict(REC, id=3, text="zz")])))
    assert records == [REC]


# ---------------------------------------------------------------- split
def test_split_is_deterministic_and_disjoint():
    records = [{"instruction": str(i), "input": "", "output": "x"} for i in range(100)]
    train, val = split_records(records, 0.1, seed=3)
    assert (train, val) == split_records(records, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in val)
    assert split_records(records, 0.1, seed=4)[1] != val
    assert len(split_records(records, 7, seed=3)[1]) == 7


def test_split_needs_training_records():
    with pytest.raises(DataError, match="leaves no training records"):
        split_records([REC, REC_IN], 2)


# ---------------------------------------------------------------- CLI
def run_cli(*args):
    return subprocess.run([sys.executable, "datasetup.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_bad_record_exits_2_without_traceback(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    result = run_cli("--dataset", write(tmp_path, "bad.jsonl", '{"instruction": "a"}\n'),
                     "--tokenizer", str(tmp_path / "tok"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "bad.jsonl: record 0 (line 1): field 'output' is missing" in result.stderr


def test_cli_bad_flag_values_name_the_flag():
    result = run_cli("--template", "chatml")
    assert result.returncode == 2 and "--template" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("--val-size", "1.5", "--max-length", "1")
    assert result.returncode == 2 and "--val-size" in result.stderr and "--max-length" in result.stderr


def test_cli_summary_and_save(tmp_path, tiny_tokenizer):
    from tuning import smoke
    from datasets import load_from_disk

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    data = write(tmp_path, "d.json", json.dumps(smoke.make_records(60) + [{"instruction": "x", "output": ""}]))
    result = run_cli("--dataset", data, "--tokenizer", str(tmp_path / "tok"), "--val-size", "10",
                     "--save", str(tmp_path / "saved"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Records read: 61" in out and "Dropped 1 records with an empty" in out and "indices [60]" in out
    assert "p50" in out and "share of tokens carrying loss" in out and "--- example 1" in out
    saved = load_from_disk(str(tmp_path / "saved"))
    assert len(saved["train"]) == 50 and len(saved["validation"]) == 10


# ---------------------------------------------------------------- the real data (skips without ../shared)
def test_real_alpaca_records(gpt2_tokenizer):
    path = shared_path("data", "alpaca_5000.json")
    records, report = load_records(str(path))
    assert report["read"] == 5000 and report["empty_dropped"] == [2335, 4658]
    assert 45 <= report["placeholder_inputs"] <= 60
    assert not any(is_placeholder_input(r["input"]) and r["input"] for r in records)
    tokenized = sft.tokenize_records(records, gpt2_tokenizer, "alpaca", 512)
    eos = gpt2_tokenizer.eos_token_id
    assert len(tokenized) == len(records)
    for row, record in zip(tokenized, records):
        n = row["prompt_length"]
        assert row["labels"][:n] == [sft.IGNORE_INDEX] * n and row["labels"][n:] == row["input_ids"][n:]
        assert len(row["input_ids"]) <= 512
        assert (row["input_ids"][-1] == eos) != row["truncated"]
    assert gpt2_tokenizer.decode(tokenized[0]["input_ids"]).startswith(templates.format_prompt(records[0], "alpaca"))
