"""tuning/data/preferences.py: the pair formats (text and conversations), record errors, dropped pairs, split, tokens
(conversations as SFT renders them), and the real HH-RLHF file."""

import gzip
import json
import re

import pytest

from tuning.data import chat_template, records, templates
import families
from tuning.data import preferences as pf
from conftest import shared_path

ALPACA = {"instruction": "Name a color.", "chosen": "Blue.", "rejected": "Seven."}
ALPACA_IN = {"instruction": "Add the numbers.", "input": "2 + 3", "chosen": "5", "rejected": "23"}
EXPLICIT = {"prompt": "Q: What is 2 + 2?\nA:", "chosen": " 4", "rejected": " 5"}
TURNS = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: Name a color.\n\nAssistant:"
HH = {"chosen": TURNS + " Blue.", "rejected": TURNS + " I won't."}
MESSAGES = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Name a color."}]
TRL = {"prompt": MESSAGES, "chosen": [{"role": "assistant", "content": "Blue."}],
       "rejected": [{"role": "assistant", "content": "I won't."}]}
IMPLICIT = {"chosen": MESSAGES + TRL["chosen"], "rejected": MESSAGES + TRL["rejected"]}
# The two turns before the answers, in our chat template for the seed template (a single-turn conversation
# renders as the seed template renders the instruction).
RENDERED = ("### Instruction:\nHi there.\n\n### Response:\nHello! How can I help?<|endoftext|>"
            "### Instruction:\nName a color.\n\n### Response:\n")


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
    assert pair == {"instruction": "Name a color.", "input": "", "prompt": None, "messages": None, "chosen": "Blue.",
                    "rejected": "Seven."}
    assert pf.pair_prompt(pair, "seed") == "### Instruction:\nName a color.\n\n### Response:\n"
    assert pf.pair_prompt(pf.parse_pair(ALPACA_IN), templates.TEMPLATES["alpaca"]) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 + 3\n\n### Response:\n")


def test_explicit_prompt_is_verbatim_whatever_the_template():
    pair = pf.parse_pair(EXPLICIT)
    assert pair == {"instruction": None, "input": None, "prompt": "Q: What is 2 + 2?\nA:", "messages": None,
                    "chosen": " 4", "rejected": " 5"}
    assert pf.pair_prompt(pair, "seed") == pf.pair_prompt(pair, "alpaca") == "Q: What is 2 + 2?\nA:"


def test_hh_dialogue_is_read_as_turns_up_to_the_last_assistant_turn():
    pair = pf.parse_pair(HH)
    assert pair == {"instruction": None, "input": None, "prompt": None, "messages": MESSAGES, "chosen": "Blue.",
                    "rejected": "I won't."}
    assert pf.pair_prompt(pair, "alpaca") == MESSAGES


@pytest.mark.parametrize("record", [TRL, IMPLICIT], ids=["trl-prompt", "trl-implicit"])
def test_trl_conversational_pairs_read_as_the_hh_dialogue(record):
    assert pf.parse_pair(record) == pf.parse_pair(HH)


def test_hh_answers_may_share_their_first_words():
    pair = pf.parse_pair({"chosen": TURNS + " Blue, like the sky.", "rejected": TURNS + " Blue, like a bruise."})
    assert pair["messages"] == MESSAGES and pair["chosen"] == "Blue, like the sky."


def test_formats_are_detected_per_record(tmp_path):
    pairs, report = pf.load_pairs(write(tmp_path, "d.jsonl", jsonl(ALPACA, EXPLICIT, HH, ALPACA_IN, TRL)))
    assert [p["prompt"] is None for p in pairs] == [True, False, True, True, True]
    assert report["formats"] == {"alpaca": 2, "prompt": 1, "conversation": 1, "dialogue": 1}


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

    monkeypatch.setattr(datasets, "load_dataset", lambda name, split, data_dir=None: [HH, {"chosen": "x", "rejected": "y"}])
    with pytest.raises(pf.DataError, match="Anthropic/hh-rlhf: record 1: field 'chosen' does not start with"):
        pf.load_pairs("Anthropic/hh-rlhf")

    def offline(name, split, data_dir=None):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(pf.DataError, match="could not load dataset 'Anthropic/hh-rlhf' .*Offline\\?"):
        pf.load_pairs("Anthropic/hh-rlhf")


# ---------------------------------------------------------------- malformed records
OTHER = "\n\nHuman: Hi.\n\nAssistant:"


@pytest.mark.parametrize("name,text,expected", [
    ("d.jsonl", jsonl(HH) + "\n" + jsonl({"chosen": TURNS + " Blue.", "rejected": OTHER + " No."}),
     ("d.jsonl: record 1 (line 3): fields 'chosen' and 'rejected' do not share the dialogue up to their last "
      "Assistant turn ('chosen' has 2 Assistant turns, 'rejected' 1)")),
    ("d.jsonl.gz", jsonl(HH, HH, {"chosen": TURNS + " Blue.", "rejected": TURNS.replace("color", "number") + " 7"}),
     ("d.jsonl.gz: record 2 (line 3): fields 'chosen' and 'rejected' do not share the dialogue up to their last "
      "Assistant turn (they differ at turn 3)")),
    ("d.json", json.dumps([HH, {"chosen": TURNS + " Blue.", "rejected": "Red."}]),
     "d.json: record 1: field 'rejected' does not start with a '\\n\\nHuman:' turn"),
    ("d.json", json.dumps([{"chosen": TURNS + " Blue.\n\nHuman: And?", "rejected": TURNS + " Red."}]),
     "d.json: record 0: field 'chosen' does not end with an Assistant turn"),
    ("d.json", json.dumps([{"chosen": TURNS.replace("Human: Name", "Assistant: Name") + " Blue.",
                            "rejected": TURNS.replace("Human: Name", "Assistant: Name") + " Red."}]),
     "d.json: record 0: the dialogue before the answers: turns 2 and 3 are both from the assistant"),
    ("d.json", json.dumps([dict(TRL, chosen=[{"role": "user", "content": "Blue."}])]),
     "d.json: record 0: field 'chosen' must hold one assistant turn, the answer to 'prompt' (it has user)"),
    ("d.json", json.dumps([dict(TRL, prompt=MESSAGES[:2])]),
     "d.json: record 0: field 'prompt' ends with an assistant turn; the answers reply to a user turn"),
    ("d.json", json.dumps([dict(TRL, prompt=[{"role": "bot", "content": "x"}])]),
     "d.json: record 0: turn 1 of 'prompt': field 'role' is 'bot'; expected 'system', 'user', 'assistant'"),
    ("d.json", json.dumps([dict(TRL, prompt=[{"role": "user", "content": ""}])]),
     "d.json: record 0: field 'prompt': turn 1 (user): its content is empty"),
    ("d.json", json.dumps([dict(IMPLICIT, rejected=MESSAGES[:1] + TRL["rejected"])]),
     "do not share the dialogue up to their last assistant turn ('chosen' has 2 assistant turns, 'rejected' 1)"),
    ("d.json", json.dumps([{"instruction": "a", "rejected": "b"}]), "d.json: record 0: field 'chosen' is missing"),
    ("d.json", json.dumps([{"prompt": "p", "chosen": 3, "rejected": "b"}]),
     "d.json: record 0: field 'chosen' is an int, not a string"),
    ("d.json", json.dumps([{"prompt": ["p"], "chosen": "a", "rejected": "b"}]),
     "record 0: field 'chosen' is a str, not a list of turns"),
    ("d.json", json.dumps([dict(ALPACA, input=5)]), "d.json: record 0: field 'input' is an int, not a string"),
    ("d.json", json.dumps([dict(ALPACA, prompt="p")]), "record 0: has both a 'prompt' (or message lists) and an 'instruction'"),
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
def test_text_prompt_is_encode_prompt_and_answers_end_with_eos(family, bos):
    tok = families.tokenizer(family)
    for pair, template in ((pf.parse_pair(EXPLICIT), "seed"), (pf.parse_pair(ALPACA_IN), "alpaca")):
        ids = pf.tokenize_pair(pair, tok, template, 512)
        prompt = pf.pair_prompt(pair, template)
        assert ids["prompt_ids"] == templates.encode_prompt(tok, prompt)
        assert (ids["prompt_ids"][0] == tok.bos_token_id) == bos
        assert ids["prompt_ids"][bos:] == tok(prompt, add_special_tokens=False)["input_ids"]
        for answer in ("chosen", "rejected"):
            assert ids[f"{answer}_ids"] == tok(pair[answer], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_conversation_pair_is_the_sft_example_of_its_dialogue(family):
    """A multi-turn pair's prompt + answer are exactly the ids SFT trains on for the same dialogue (our chat
    template, its BOS where the tokenizer adds one), and the answer its trained tokens, EOS included."""
    tok = families.tokenizer(family)
    chat = chat_template.own_chat_template("seed", tok)
    ids = pf.tokenize_pair(pf.parse_pair(HH), tok, "seed", 512, chat)
    for answer in ("Blue.", "I won't."):
        key = "chosen_ids" if answer == "Blue." else "rejected_ids"
        [example] = chat_template.tokenize_conversations([MESSAGES + [{"role": "assistant", "content": answer}]], tok,
                                                         chat, 512, train_on="last_assistant")
        assert ids["prompt_ids"] + ids[key] == example["input_ids"]
        assert [label for label in example["labels"] if label != -100] == ids[key]
    assert ids["prompt_ids"] == chat_template.chat_prompt_ids(tok, MESSAGES, chat)


def test_real_gpt2_tokens_decode_to_the_exact_texts(gpt2_tokenizer):
    ids = pf.tokenize_pair(pf.parse_pair(HH), gpt2_tokenizer, "seed", 512)
    assert gpt2_tokenizer.decode(ids["prompt_ids"]) == RENDERED
    assert gpt2_tokenizer.decode(ids["chosen_ids"]) == "Blue.<|endoftext|>"
    assert gpt2_tokenizer.decode(ids["rejected_ids"]) == "I won't.<|endoftext|>"
    single = pf.tokenize_pair(pf.parse_pair({"prompt": [MESSAGES[2]], **{k: TRL[k] for k in ("chosen", "rejected")}}),
                              gpt2_tokenizer, "seed", 512)
    assert single == pf.tokenize_pair(pf.parse_pair(ALPACA), gpt2_tokenizer, "seed", 512) | {
        "rejected_ids": single["rejected_ids"]}, "one user turn: the same ids as the instruction in the seed template"


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_a_tokenizers_own_template_closes_answers_with_its_end_of_turn(gpt2_tokenizer):
    """With a tokenizer's own (ChatML-like) template, the prompt is its render and each answer ends with its
    end-of-turn text, as the whole rendered dialogue has it; Alpaca pairs are asked as one user turn."""
    tok = gpt2_tokenizer
    ids = pf.tokenize_pair(pf.parse_pair(TRL), tok, "seed", 512, CHATML)
    whole = tok.apply_chat_template(MESSAGES + TRL["chosen"], chat_template=CHATML, tokenize=False)
    assert tok.decode(ids["prompt_ids"] + ids["chosen_ids"]) == whole
    assert tok.decode(ids["chosen_ids"]) == "Blue.<|im_end|>\n"
    alpaca = pf.tokenize_pair(pf.parse_pair(ALPACA), tok, "seed", 512, CHATML)
    assert tok.decode(alpaca["prompt_ids"]) == "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"
    assert pf.tokenize_pairs([pf.parse_pair(p) for p in (TRL, ALPACA, EXPLICIT)], tok, "seed", 512, CHATML)[0] == [
        ids, alpaca, pf.tokenize_pair(pf.parse_pair(EXPLICIT), tok, "seed", 512, CHATML)]


def test_fit_is_prompt_plus_longer_answer_plus_eos():
    assert pf.build_pair([1, 2], [3], [4, 5], [9], 5) == {"prompt_ids": [1, 2], "chosen_ids": [3, 9],
                                                          "rejected_ids": [4, 5, 9]}
    assert pf.build_pair([1, 2], [3], [4, 5], [9], 4) is None, "the longer answer + EOS must fit, not be cut"
    assert pf.build_pair([1, 2], [4, 5], [3], [9], 4) is None
    assert pf.build_pair([1], [3], [4], [8, 9], 4)["chosen_ids"] == [3, 8, 9], "an end-of-turn of two tokens"


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
    pairs = [pf.parse_pair(p) for p in (HH, ALPACA, ALPACA_IN, EXPLICIT, TRL)]
    tokenized, report = pf.tokenize_pairs(pairs, tok, "alpaca", 512)
    assert tokenized == [pf.tokenize_pair(p, tok, "alpaca", 512) for p in pairs] and report["too_long_dropped"] == []


# ---------------------------------------------------------------- the real HH-RLHF file (skips without ../shared)
def test_real_hh_rlhf_pairs(gpt2_tokenizer):
    path = str(shared_path("data", "hh-rlhf-harmless-base-test.jsonl.gz"))
    with pytest.raises(pf.DataError, match=re.escape("record 667 (line 668): the dialogue before the answers: turns 4 "
                                                     "and 5 are both from the assistant")):
        pf.load_pairs(path)
    pairs, report = pf.load_pairs(path, skip_invalid=True)
    # Five pairs whose last Assistant turn is not shared (in four the chosen dialogue has one turn more, in record
    # 1950 the rejected one has; ../shared/README.md says 4: it misses 1950), and four with two Assistant turns in
    # a row, which no chat template can render as a dialogue.
    assert report["read"] == 2312
    assert [int(re.search(r"record (\d+)", s).group(1)) for s in report["skipped"]] == [
        667, 763, 1254, 1319, 1688, 1849, 1950, 1952, 2036]
    assert "record 1254 (line 1255): fields 'chosen' and 'rejected' do not share the dialogue up to their last " \
           "Assistant turn ('chosen' has 3 Assistant turns, 'rejected' 2)" in report["skipped"][2]
    assert report["empty_dropped"] == [86, 516, 925, 1103] and report["equal_dropped"] == []
    assert len(pairs) == report["formats"]["dialogue"] == 2299
    assert sum(len(p["messages"]) > 1 for p in pairs) == 1641, "most are multi-turn"
    assert all(p["messages"][-1]["role"] == "user" for p in pairs)
    tokenized, fit = pf.tokenize_pairs(pairs, gpt2_tokenizer, "seed", 512)
    assert fit["tokenized"] == 2214 and len(fit["too_long_dropped"]) == 85
    assert round(fit["fit_share"], 3) == 0.963, "in our chat template (HH's own turn markers: 96.6%, ../shared/README)"
    assert all(len(t["prompt_ids"]) + max(len(t["chosen_ids"]), len(t["rejected_ids"])) <= 512 for t in tokenized)
    assert all(t["chosen_ids"][-1] == t["rejected_ids"][-1] == gpt2_tokenizer.eos_token_id for t in tokenized)
    assert gpt2_tokenizer.decode(tokenized[0]["prompt_ids"]).startswith("### Instruction:\n")


# ---------------------------------------------------------------- prompts for online RL
def test_rl_prompts_from_conversations_pairs_and_records_are_the_turn_to_answer(tmp_path):
    """RLOO's prompts: a conversation file's turns up to its last user turn, a pair's prompt (its turns, for a
    conversational pair), an Alpaca record's instruction; and a set that mixes conversations with text prompts is
    refused, since one Arrow column can't hold both."""
    talks = write(tmp_path, "chat.jsonl", jsonl({"messages": MESSAGES + TRL["chosen"]}))
    [talk] = pf.load_prompts(talks)[0]
    assert {key: talk[key] for key in pf.PROMPT_FIELDS} == {"instruction": None, "input": None, "prompt": None,
                                                            "messages": MESSAGES}
    assert talk["reference"] == TRL["chosen"][-1]["content"]  # (for a verifiable reward: the turn it answers)
    pairs = write(tmp_path, "pairs.jsonl", jsonl(TRL, HH))
    assert [p["messages"] for p in pf.load_prompts(pairs)[0]] == [MESSAGES, MESSAGES]
    assert [p["reference"] for p in pf.load_prompts(pairs)[0]] == [p["chosen"] for p in pf.load_pairs(pairs)[0]]
    alpaca = write(tmp_path, "a.json", json.dumps([{"instruction": "Name a color.", "input": "", "output": "Blue.",
                                                    "topic": "art"}]))
    [record] = pf.load_prompts(alpaca)[0]
    assert record["instruction"] == "Name a color." and record["reference"] == "Blue."
    assert record["columns"]["topic"] == "art"  # a user's reward function gets the record's own fields
    bare = write(tmp_path, "bare.json", json.dumps([{"instruction": "Name a color."}]))
    assert pf.load_prompts(bare)[0][0]["reference"] is None and "output" not in pf.load_prompts(bare)[0][0]["columns"]
    tok = families.tokenizer("gpt2")
    mixed = write(tmp_path, "mixed.jsonl", jsonl(*([TRL, EXPLICIT] * 4)))
    with pytest.raises(pf.DataError, match="mixes conversations and text prompts"):
        pf.prepare_prompts(mixed, False, 2, 0, tok, "seed", tok, "seed", 512, say=lambda *a: None)
    data, _, _ = pf.prepare_prompts(write(tmp_path, "t.jsonl", jsonl(*[TRL] * 4)), False, 2, 0, tok, "seed", tok,
                                    "seed", 512, say=lambda *a: None)
    assert data["train"][0]["prompt"] == data["train"][0]["judge_prompt"] == MESSAGES
    # TRL's prompt-only records: a text verbatim, or turns (tidied as SFT tidies them), with named errors.
    untidy = [dict(turn, content="  " + turn["content"]) if turn["role"] == "assistant" else turn for turn in MESSAGES]
    only = write(tmp_path, "only.jsonl", jsonl({"prompt": untidy}, {"prompt": "Q: 2 + 2?\nA:"}, {"prompt": ""}))
    prompts, report = pf.load_prompts(only)
    assert [p["messages"] for p in prompts] == [MESSAGES, None] and prompts[1]["prompt"] == "Q: 2 + 2?\nA:"
    solved = write(tmp_path, "solved.jsonl", jsonl({"prompt": "Q: 2 + 2?\nA:", "solution": "4"}))
    assert pf.load_prompts(solved)[0][0]["reference"] == "4"
    assert report["empty_dropped"] == [2]
    with pytest.raises(pf.DataError, match=re.escape("bad.jsonl: record 1 (line 2): field 'prompt' ends with an "
                                                     "assistant turn; the answers reply to a user turn")):
        pf.load_prompts(write(tmp_path, "bad.jsonl", jsonl({"prompt": "x"}, {"prompt": MESSAGES[:2]})))


def test_a_conversational_pairs_earlier_turns_are_tidied_as_sft_tidies_them():
    untidy = [dict(turn, content="\n " + turn["content"]) if turn["role"] == "assistant" else turn for turn in MESSAGES]
    assert pf.parse_pair(dict(TRL, prompt=untidy)) == pf.parse_pair(TRL)


def test_a_cut_answer_keeps_its_whole_end_of_turn():
    from tuning.models.scoring import within_context

    assert within_context([1, 2, 3, 4, 8, 9], 5, end=2) == [1, 2, 3, 8, 9]
    assert within_context([1, 2, 3, 4, 9], 4) == [1, 2, 3, 9] and within_context([1, 9], 4) == [1, 9]
