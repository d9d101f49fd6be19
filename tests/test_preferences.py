"""tuning/data/preferences.py: the three pair formats, record errors, dropped pairs, split, tokens, and the real HH-RLHF file."""

import gzip
import json
import re

import pytest

from tuning.data import records, templates
import families
from tuning.data import preferences as pf
from conftest import shared_path

ALPACA = {"instruction": "Name a color.", "chosen": "Blue.", "rejected": "Seven."}
ALPACA_IN = {"instruction": "Add the numbers.", "input": "2 + 3", "chosen": "5", "rejected": "23"}
EXPLICIT = {"prompt": "Q: What is 2 + 2?\nA:", "chosen": " 4", "rejected": " 5"}
TURNS = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: Name a color.\n\nAssistant:"
HH = {"chosen": TURNS + " Blue.", "rejected": TURNS + " I won't."}


def write(tmp_path, name, text):
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return str(path)


def jsonl(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


# ---------------------------------------------------------------- the three formats (exact strings)
def test_alpaca_style_keeps_instruction_and_uses_the_template():
    pair = pf.parse_pair(ALPACA)
    assert pair == {"instruction": "Name a color.", "input": "", "prompt": None, "chosen": "Blue.",
                    "rejected": "Seven."}
    assert pf.pair_prompt(pair, "seed") == "### Instruction:\nName a color.\n\n### Response:\n"
    assert pf.pair_prompt(pf.parse_pair(ALPACA_IN), templates.TEMPLATES["alpaca"]) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 + 3\n\n### Response:\n")


def test_explicit_prompt_is_verbatim_whatever_the_template():
    pair = pf.parse_pair(EXPLICIT)
    assert pair == {"instruction": None, "input": None, "prompt": "Q: What is 2 + 2?\nA:", "chosen": " 4",
                    "rejected": " 5"}
    assert pf.pair_prompt(pair, "seed") == pf.pair_prompt(pair, "alpaca") == "Q: What is 2 + 2?\nA:"


def test_hh_dialogue_prompt_ends_at_the_last_assistant_turn():
    pair = pf.parse_pair(HH)
    assert pair["prompt"] == ("\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?"
                              "\n\nHuman: Name a color.\n\nAssistant:")
    assert (pair["chosen"], pair["rejected"]) == (" Blue.", " I won't.")
    assert pair["instruction"] is None and pf.pair_prompt(pair, "alpaca") == pair["prompt"]


def test_hh_answers_may_share_their_first_words():
    pair = pf.parse_pair({"chosen": TURNS + " Blue, like the sky.", "rejected": TURNS + " Blue, like a bruise."})
    assert pair["prompt"] == TURNS and pair["chosen"] == " Blue, like the sky."


def test_formats_are_detected_per_record(tmp_path):
    pairs, report = pf.load_pairs(write(tmp_path, "d.jsonl", jsonl(ALPACA, EXPLICIT, HH, ALPACA_IN)))
    assert [p["prompt"] is None for p in pairs] == [True, False, False, True]
    assert report["formats"] == {"alpaca": 2, "prompt": 1, "dialogue": 1}


def test_placeholder_input_becomes_empty(tmp_path):
    pairs, report = pf.load_pairs(write(tmp_path, "d.json", json.dumps([dict(ALPACA, input="<noinput>")])))
    assert pairs[0]["input"] == "" and report["placeholder_inputs"] == 1


# ---------------------------------------------------------------- reading
def test_jsonl_gz_reads_like_jsonl(tmp_path):
    text = jsonl(ALPACA, HH)
    assert pf.load_pairs(write(tmp_path, "d.jsonl.gz", text))[0] == pf.load_pairs(write(tmp_path, "d.jsonl", text))[0]
    assert pf.read_raw(write(tmp_path, "e.jsonl.gz", text))[1][0].endswith("e.jsonl.gz: record 1 (line 2)")


@pytest.mark.parametrize("content,expected", [(b"not gzip", "BadGzipFile"),
                                              (gzip.compress(b"{}\n" * 50)[:20], "EOFError")])
def test_damaged_gzip_is_a_data_error(tmp_path, content, expected):
    (tmp_path / "d.jsonl.gz").write_bytes(content)
    with pytest.raises(pf.DataError, match=f"d.jsonl.gz: could not be read \\({expected}"):
        pf.load_pairs(str(tmp_path / "d.jsonl.gz"))


def test_hub_id_goes_through_datasets(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: [HH, {"chosen": "x", "rejected": "y"}])
    with pytest.raises(pf.DataError, match="Anthropic/hh-rlhf: record 1: field 'chosen' has no"):
        pf.load_pairs("Anthropic/hh-rlhf")

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(pf.DataError, match="could not load dataset 'Anthropic/hh-rlhf' .*Offline\\?"):
        pf.load_pairs("Anthropic/hh-rlhf")


# ---------------------------------------------------------------- malformed records
OTHER = "\n\nHuman: Hi.\n\nAssistant:"


@pytest.mark.parametrize("name,text,expected", [
    ("d.jsonl", jsonl(HH) + "\n" + jsonl({"chosen": TURNS + " Blue.", "rejected": OTHER + " No."}),
     ("d.jsonl: record 1 (line 3): fields 'chosen' and 'rejected' do not share the dialogue up to their last "
      "'\\n\\nAssistant:' ('chosen' has 2 Assistant turns, 'rejected' 1)")),
    ("d.jsonl.gz", jsonl(HH, HH, {"chosen": TURNS + " Blue.", "rejected": TURNS.replace("color", "number") + " 7"}),
     ("d.jsonl.gz: record 2 (line 3): fields 'chosen' and 'rejected' do not share the dialogue up to their last "
      "'\\n\\nAssistant:' (they differ from character 69 on)")),
    ("d.json", json.dumps([HH, {"chosen": TURNS + " Blue.", "rejected": "Red."}]),
     "d.json: record 1: field 'rejected' has no '\\n\\nAssistant:' turn"),
    ("d.json", json.dumps([{"instruction": "a", "rejected": "b"}]), "d.json: record 0: field 'chosen' is missing"),
    ("d.json", json.dumps([{"prompt": "p", "chosen": 3, "rejected": "b"}]),
     "d.json: record 0: field 'chosen' is an int, not a string"),
    ("d.json", json.dumps([{"prompt": ["p"], "chosen": "a", "rejected": "b"}]), "record 0: field 'prompt' is a list"),
    ("d.json", json.dumps([dict(ALPACA, input=5)]), "d.json: record 0: field 'input' is an int, not a string"),
    ("d.json", json.dumps([dict(ALPACA, prompt="p")]), "record 0: has both a 'prompt' and an 'instruction' field"),
    ("d.json", json.dumps([ALPACA, 7]), "d.json: record 1: is an int, not an object"),
    ("d.jsonl", jsonl(ALPACA) + '{"chosen": \n', "d.jsonl: record 1 (line 2): malformed JSON"),
])
def test_malformed_records_name_file_record_line_and_field(tmp_path, name, text, expected):
    with pytest.raises(pf.DataError, match=re.escape(expected) + ".*use --skip-invalid to drop such records"):
        pf.load_pairs(write(tmp_path, name, text))


def test_skip_invalid_drops_and_reports(tmp_path):
    bad = {"chosen": TURNS + " Blue.", "rejected": OTHER + " No."}
    path = write(tmp_path, "d.jsonl", jsonl(HH, bad, EXPLICIT) + "[1]\n")
    pairs, report = pf.load_pairs(path, skip_invalid=True)
    assert pairs == [pf.parse_pair(HH), pf.parse_pair(EXPLICIT)]
    assert report["read"] == 4 and len(report["skipped"]) == 2
    assert "record 1 (line 2): fields 'chosen' and 'rejected' do not share" in report["skipped"][0]
    assert report["skipped"][1].endswith("record 3 (line 4): is a list, not an object")


# ---------------------------------------------------------------- dropped pairs
def test_empty_and_equal_pairs_are_dropped_counted_and_named(tmp_path):
    data = [ALPACA, dict(ALPACA, chosen="  "), {"chosen": TURNS, "rejected": TURNS + " No."},
            dict(EXPLICIT, prompt=""), dict(ALPACA, instruction="\n"), dict(ALPACA, rejected="Blue."),
            {"prompt": "p", "chosen": "x ", "rejected": "x"}, EXPLICIT]
    pairs, report = pf.load_pairs(write(tmp_path, "d.json", json.dumps(data)))
    assert pairs == [pf.parse_pair(ALPACA), pf.parse_pair(EXPLICIT)]
    assert report["empty_dropped"] == [1, 2, 3, 4] and report["equal_dropped"] == [5, 6]
    assert report["empty_details"][1].endswith("d.json: record 2: empty 'chosen'")
    assert report["empty_details"][2].endswith("record 3: empty 'prompt'")
    assert report["empty_details"][3].endswith("record 4: empty 'instruction'")
    assert report["equal_details"][0].endswith("record 5: 'chosen' and 'rejected' are the same answer")


def test_nothing_usable_is_an_error(tmp_path):
    with pytest.raises(pf.DataError, match=r"no usable pairs \(2 read, 0 invalid, 1 empty, 1 with equal answers: "
                                           r"record 0: empty 'chosen'; record 1: 'chosen' and 'rejected' are the same"):
        pf.load_pairs(write(tmp_path, "d.json", json.dumps([dict(ALPACA, chosen=""), dict(ALPACA, chosen="Seven.")])))


# ---------------------------------------------------------------- split
def test_split_is_datasetups_deterministic_split():
    assert pf.split_records is records.split_records, "reused, not copied"
    pairs = [dict(EXPLICIT, prompt=str(i)) for i in range(50)]
    train, val = pf.split_records(pairs, 0.1, seed=3)
    assert (train, val) == pf.split_records(pairs, 0.1, seed=3)
    assert len(val) == 5 and len(train) == 45 and {p["prompt"] for p in train}.isdisjoint(p["prompt"] for p in val)
    assert pf.split_records(pairs, 0.1, seed=4)[1] != val


# ---------------------------------------------------------------- tokens
@pytest.mark.parametrize("family,bos", [("llama", True), ("gpt2", False)])
def test_prompt_is_encode_prompt_and_answers_end_with_eos(family, bos):
    tok = families.tokenizer(family)
    for pair, template in ((pf.parse_pair(HH), "seed"), (pf.parse_pair(ALPACA_IN), "alpaca")):
        ids = pf.tokenize_pair(pair, tok, template, 512)
        prompt = pf.pair_prompt(pair, template)
        assert ids["prompt_ids"] == pf.encode_prompt(tok, prompt)
        assert (ids["prompt_ids"][0] == tok.bos_token_id) == bos
        assert ids["prompt_ids"][bos:] == tok(prompt, add_special_tokens=False)["input_ids"]
        for answer in ("chosen", "rejected"):
            assert ids[f"{answer}_ids"] == tok(pair[answer], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_real_gpt2_tokens_decode_to_the_exact_texts(gpt2_tokenizer):
    ids = pf.tokenize_pair(pf.parse_pair(HH), gpt2_tokenizer, "seed", 512)
    assert gpt2_tokenizer.decode(ids["prompt_ids"]) == TURNS
    assert gpt2_tokenizer.decode(ids["chosen_ids"]) == " Blue.<|endoftext|>"
    assert gpt2_tokenizer.decode(ids["rejected_ids"]) == " I won't.<|endoftext|>"


def test_fit_is_prompt_plus_longer_answer_plus_eos():
    assert pf.build_pair([1, 2], [3], [4, 5], 9, 5) == {"prompt_ids": [1, 2], "chosen_ids": [3, 9],
                                                        "rejected_ids": [4, 5, 9]}
    assert pf.build_pair([1, 2], [3], [4, 5], 9, 4) is None, "the longer answer + EOS must fit, not be cut"
    assert pf.build_pair([1, 2], [4, 5], [3], 9, 4) is None


def test_too_long_pairs_are_reported_not_cut():
    tok = families.tokenizer("llama")
    long = dict(EXPLICIT, rejected=" 5" * 200)
    pairs = [pf.parse_pair(p) for p in (HH, long, ALPACA, long)]
    whole = [pf.tokenize_pair(p, tok, "seed", 10**6) for p in pairs]
    needed = [len(t["prompt_ids"]) + max(len(t["chosen_ids"]), len(t["rejected_ids"])) for t in whole]
    limit = max(needed[0], needed[2])  # the short pairs fit exactly, the long ones do not
    assert needed[1] > limit and pf.tokenize_pair(pairs[1], tok, "seed", limit) is None
    tokenized, report = pf.tokenize_pairs(pairs, tok, "seed", limit)
    assert report["too_long_dropped"] == [1, 3] and report["tokenized"] == 2 and report["fit_share"] == 0.5
    assert tokenized == [whole[0], whole[2]], "kept pairs are whole, with their EOS"
    assert pf.tokenize_pairs(pairs, tok, "seed", limit - 1)[1]["tokenized"] == 1


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_tokenization_matches_single(family):
    tok = families.tokenizer(family)
    pairs = [pf.parse_pair(p) for p in (HH, ALPACA, ALPACA_IN, EXPLICIT)]
    tokenized, report = pf.tokenize_pairs(pairs, tok, "alpaca", 512)
    assert tokenized == [pf.tokenize_pair(p, tok, "alpaca", 512) for p in pairs] and report["too_long_dropped"] == []


# ---------------------------------------------------------------- the real HH-RLHF file (skips without ../shared)
def test_real_hh_rlhf_pairs(gpt2_tokenizer):
    path = str(shared_path("data", "hh-rlhf-harmless-base-test.jsonl.gz"))
    with pytest.raises(pf.DataError, match=re.escape("record 1254 (line 1255): fields 'chosen' and 'rejected' do not "
                                                     "share the dialogue")):
        pf.load_pairs(path)
    pairs, report = pf.load_pairs(path, skip_invalid=True)
    # Five pairs whose last Assistant turn is not shared: in four the chosen dialogue has one turn more,
    # in record 1950 the rejected one has. (../shared/README.md says 4: it misses 1950.)
    assert report["read"] == 2312
    assert [int(re.search(r"record (\d+)", s).group(1)) for s in report["skipped"]] == [1254, 1688, 1950, 1952, 2036]
    assert report["empty_dropped"] == [86, 516, 925, 1103] and report["equal_dropped"] == []
    assert len(pairs) == report["formats"]["dialogue"] == 2303
    assert all(p["prompt"].startswith("\n\nHuman:") and p["prompt"].endswith("\n\nAssistant:") for p in pairs)
    tokenized, fit = pf.tokenize_pairs(pairs, gpt2_tokenizer, "seed", 512)
    assert fit["tokenized"] == 2225 and len(fit["too_long_dropped"]) == 78
    assert round(fit["fit_share"], 3) == 0.966, "../shared/README.md: 96.6% fit in 512 tokens"
    assert all(len(t["prompt_ids"]) + max(len(t["chosen_ids"]), len(t["rejected_ids"])) <= 512 for t in tokenized)
    assert all(t["chosen_ids"][-1] == t["rejected_ids"][-1] == gpt2_tokenizer.eos_token_id for t in tokenized)
