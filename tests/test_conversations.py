"""Conversations: the formats read, the chat template (exact strings), the labels it marks, and the audit that
stops a run whose labels would teach the wrong thing."""

import gzip
import hashlib
import json
import os
import subprocess
import sys

import pytest

from tuning.data import chat_template, conversations, label_audit, sft
from tuning.data.collate import SFTCollator
from tuning.data.records import DataError, load_records
from tuning.data.templates import format_prompt
from conftest import ROOT, shared_path

TWO_TURNS = [{"role": "user", "content": "List the words: cat owl"}, {"role": "assistant", "content": "cat, owl"},
             {"role": "user", "content": "Now reverse them."}, {"role": "assistant", "content": "owl cat"}]
# A ChatML template with generation markers, as a tokenizer that brings its own template has it.
CHATML = ("{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\n' }}"
          "{%- if message['role'] == 'assistant' -%}{% generation %}{{ message['content'] + eos_token }}"
          "{% endgeneration %}{%- else -%}{{ message['content'] + '<|im_end|>' }}{%- endif -%}{{ '\n' }}"
          "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}")


@pytest.fixture(scope="module")
def render(tiny_tokenizer):
    """The text our chat template makes of a conversation, as plain transformers renders it (EOS: <|endoftext|>)."""
    def rendered(messages, template="seed", add_generation_prompt=False):
        return tiny_tokenizer.apply_chat_template(messages, chat_template=chat_template.own_chat_template(template),
                                                  tokenize=False, add_generation_prompt=add_generation_prompt)
    return rendered


# ---------------------------------------------------------------- the template, as exact strings
def test_a_single_turn_renders_exactly_as_the_seed_and_alpaca_templates(render):
    record = {"instruction": "Name a colour.", "input": "", "output": "Red."}
    one = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]
    assert render(one) == "### Instruction:\nName a colour.\n\n### Response:\nRed.<|endoftext|>"
    for name in ("seed", "alpaca"):
        assert render(one, name) == format_prompt(record, name) + "Red.<|endoftext|>"
        assert render(one[:1], name, True) == format_prompt(record, name)


def test_multi_turn_and_system_prompt_render_exactly(render):
    assert render(TWO_TURNS) == ("### Instruction:\nList the words: cat owl\n\n### Response:\ncat, owl<|endoftext|>"
                                 "### Instruction:\nNow reverse them.\n\n### Response:\nowl cat<|endoftext|>")
    system = [{"role": "system", "content": "Answer briefly."}] + TWO_TURNS[:2]
    assert render(system) == ("Answer briefly.\n\n### Instruction:\nList the words: cat owl\n\n### Response:\n"
                              "cat, owl<|endoftext|>")
    assert render(system, "alpaca").startswith("Answer briefly.\n\n### Instruction:")  # a system turn replaces the preamble


def test_labels_mark_every_assistant_turn_and_its_eos(gpt2_tokenizer):
    own = chat_template.own_chat_template("seed")
    [example] = chat_template.tokenize_conversations([TWO_TURNS], gpt2_tokenizer, own, 512)
    assert label_audit.marked_example(example, gpt2_tokenizer) == (
        "### Instruction:\nList the words: cat owl\n\n### Response:\n[[cat, owl<|endoftext|>]]"
        "### Instruction:\nNow reverse them.\n\n### Response:\n[[owl cat<|endoftext|>]]")
    [last] = chat_template.tokenize_conversations([TWO_TURNS], gpt2_tokenizer, own, 512, "last_assistant")
    assert label_audit.marked_example(last, gpt2_tokenizer) == (
        "### Instruction:\nList the words: cat owl\n\n### Response:\ncat, owl<|endoftext|>"
        "### Instruction:\nNow reverse them.\n\n### Response:\n[[owl cat<|endoftext|>]]")
    assert example["input_ids"] == gpt2_tokenizer.apply_chat_template(TWO_TURNS, chat_template=own)["input_ids"]


def test_a_tokenizers_own_template_is_used_for_conversations_and_ours_for_alpaca_records(gpt2_tokenizer):
    tokenizer = gpt2_tokenizer.__class__.from_pretrained(shared_path("gpt2-tokenizer"))
    tokenizer.chat_template = CHATML
    assert chat_template.chat_template_for(tokenizer, "seed", conversations=True) == CHATML
    assert chat_template.chat_template_for(tokenizer, "seed", conversations=False) == \
        chat_template.own_chat_template("seed")
    [example] = chat_template.tokenize_conversations([TWO_TURNS[:2]], tokenizer, CHATML, 512)
    assert label_audit.marked_example(example, tokenizer) == (
        "<|im_start|>user\nList the words: cat owl<|im_end|>\n<|im_start|>assistant\n[[cat, owl<|endoftext|>]]\n")


def test_a_cut_conversation_keeps_what_fits_and_one_with_nothing_trained_left_is_dropped(gpt2_tokenizer):
    own = chat_template.own_chat_template("seed")
    full = chat_template.tokenize_conversations([TWO_TURNS], gpt2_tokenizer, own, 512)[0]
    first_end = full["spans"][0][1]
    cut = chat_template.tokenize_conversations([TWO_TURNS], gpt2_tokenizer, own, first_end + 3)[0]
    assert cut["truncated"] and cut["spans"] == full["spans"][:1] and cut["length"] == first_end + 3
    none = chat_template.tokenize_conversations([TWO_TURNS], gpt2_tokenizer, own, full["spans"][0][0])[0]
    assert none["length"] == 0


# ---------------------------------------------------------------- the audit
def test_the_audit_passes_right_labels_and_names_each_wrong_kind(gpt2_tokenizer):
    own, eos = chat_template.own_chat_template("seed"), gpt2_tokenizer.eos_token_id
    examples = chat_template.tokenize_conversations([TWO_TURNS, TWO_TURNS[:2]], gpt2_tokenizer, own, 512)
    collator = SFTCollator(eos, "none")  # pad = EOS: our collator masks by position, so the EOS stays
    assert label_audit.audit_labels(examples, eos, collator) == []
    assert label_audit.audit_labels(examples, eos, SFTCollator(eos, "rows")) == []
    # a template whose assistant markers leave the EOS out: the model would never learn to stop
    no_eos = own.replace("{{ message['content'] + eos_token }}{% endgeneration %}",
                         "{{ message['content'] }}{% endgeneration %}{{ eos_token }}")
    unended = chat_template.tokenize_conversations([TWO_TURNS], gpt2_tokenizer, no_eos, 512)
    assert label_audit.audit_labels(unended, eos, collator) == [
        "2 assistant turns do not end with a trained end-of-turn token (id 50256) (example 0, assistant turn 1; "
        "example 0, assistant turn 2): the model would never learn to stop"]
    # a template without markers: nothing is trained
    bare = own.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    empty = chat_template.tokenize_conversations([TWO_TURNS], gpt2_tokenizer, bare, 512)
    assert label_audit.audit_labels(empty, eos, collator)[0].startswith("1 examples have no trained token (e.g. "
                                                                        "example 0)")

    class MasksPadIds(SFTCollator):  # the classic bug: labels = input_ids with every pad id masked
        def __call__(self, features):
            batch = super().__call__(features)
            batch["labels"][batch["input_ids"] == self.pad_id] = -100
            return batch

    assert label_audit.audit_labels(examples, eos, MasksPadIds(eos, "none")) == [
        "the collator keeps 0 of 3 end-of-turn labels in a batch of 2 examples: the pad id masks the end-of-turn "
        "token (id 50256)"]


# ---------------------------------------------------------------- formats and their errors
def write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_messages_sharegpt_and_hh_read_as_the_same_turns(tmp_path):
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello."}]}
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    for name, record, form, turns in (("m.jsonl", {"messages": expected}, "messages", expected),
                                      ("s.jsonl", sharegpt, "sharegpt", expected),
                                      ("h.jsonl", hh, "hh", expected[1:])):
        records, report = conversations.load_training_records(write(tmp_path, name, [record]))
        assert records == [{"messages": turns}] and report["format"] == form
    alpaca = write(tmp_path, "a.jsonl", [{"instruction": "Hi", "input": "", "output": "Hello."}])
    assert conversations.load_training_records(alpaca)[0] == load_records(alpaca)[0]


@pytest.mark.parametrize("turns, problem", [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}],
     "turn 2 (assistant): its content is empty"),
    ([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello."}],
     "turn 2 of 'messages': field 'role' is 'bot'; expected 'system', 'user', 'assistant'"),
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes"}],
     "turns 1 and 2 are both from the user"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "?"}],
     "ends with a user turn (turn 3), not an assistant's: nothing to learn after it"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 7}],
     "turn 2 of 'messages': field 'content' is an int, not a string"),
    ([{"role": "assistant", "content": "Hello."}], "turn 1 is from the assistant; the dialogue starts with a user turn"),
    ([], "has no turns"),
])
def test_a_bad_conversation_is_named_by_file_record_turn_and_field(tmp_path, turns, problem):
    good = {"messages": TWO_TURNS}
    path = write(tmp_path, "chat.jsonl", [good, {"messages": turns}])
    with pytest.raises(DataError) as err:
        conversations.load_training_records(path)
    assert str(err.value) == f"{path}: record 1 (line 2): {problem} (use --skip-invalid to drop such records)"
    records, report = conversations.load_training_records(path, skip_invalid=True)
    assert len(records) == 1 and report["skipped"] == [f"{path}: record 1 (line 2): {problem}"]


def test_an_unknown_format_says_which_fields_it_expected(tmp_path):
    path = write(tmp_path, "odd.jsonl", [{"question": "Hi", "answer": "Hello."}])
    with pytest.raises(DataError, match=r"record 0 \(line 1\): can't tell the data format from its fields "
                                        r"\('question', 'answer'\); expected 'messages', 'conversations', "
                                        r"'instruction' or 'chosen' \(or set --format\)"):
        conversations.load_training_records(path)


def test_real_hh_dialogues_read_as_multi_turn_conversations():
    path = str(shared_path("data", "hh-rlhf-harmless-base-test.jsonl.gz"))
    records, report = conversations.load_training_records(path, skip_invalid=True)
    with gzip.open(path, "rt") as handle:
        first = json.loads(handle.readline())["chosen"]
    assert records[0]["messages"][0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert records[0]["messages"][1]["content"] == "Are you looking for practical joke ideas?"
    assert len(records[0]["messages"]) == first.count("\n\nHuman:") + first.count("\n\nAssistant:")
    assert report["format"] == "hh" and report["read"] == 2312 and len(records) + len(report["skipped"]) == 2312
    assert sum(len(r["messages"]) > 2 for r in records) > 1000  # most are multi-turn


# ---------------------------------------------------------------- Alpaca unchanged
def test_alpaca_records_give_the_same_tokens_and_labels_as_before_conversations(gpt2_tokenizer):
    """sha256 of the input_ids and labels of 500 real records at --max-length 256, from the code before."""
    records, _ = load_records(str(shared_path("data", "alpaca_5000.json")))
    before = {"seed": "1c44148e66a86af1fe0d13daf0ccb9e5340a091035b2f716bc05f56ee8167d98",
              "alpaca": "0bb126f1eb7c577f15cc4e8a2bd1966ed9fdd368bc23eed3f7844b754aa71687"}
    for name, digest in before.items():
        data = sft.tokenize_records(records[:500], gpt2_tokenizer, name, 256)
        ids = json.dumps([list(data["input_ids"]), list(data["labels"])]).encode()
        assert hashlib.sha256(ids).hexdigest() == digest, name


# ---------------------------------------------------------------- the smoke proof that history is used
def test_the_smoke_chat_model_answers_the_second_turn_from_the_first(smoke_trained, smoke_chat):
    """`train.py --smoke --format messages`: on held-out two-turn conversations ("List the words: ..." then "Now
    reverse them."), the second answer is exactly right >= 90% of the time with its history, and (nearly) never
    without it: the words to reverse are only in the history."""
    import torch

    from tuning import rundir, smoke
    from tuning.generation.generate import generate, load_for_generation

    assert "Labels: all assistant turns and their end-of-turn token" in smoke_chat and "smoke-run/chat/" in smoke_chat
    model_dir = str(smoke_trained / "smoke-run" / "chat")
    held_out = [r["messages"] for r in rundir.read_records(str(smoke_trained / "smoke-run" / "chat" / "held_out.jsonl"))]
    two = [talk for talk in held_out if len(talk) == 4 and talk[2]["content"] == smoke.TWO_TURN[1]]
    assert len(two) >= 50 and len(two) < len(held_out), "held-out two-turn conversations, among one-turn tasks"
    lm, tokenizer = load_for_generation(model_dir, torch.device("cpu"), "finetuned")
    greedy = {"max_new_tokens": 24, "do_sample": False}
    with_history = generate(lm, tokenizer, [talk[:3] for talk in two], greedy, batch_size=32)
    alone = generate(lm, tokenizer, [talk[2:3] for talk in two], greedy, batch_size=32)
    right = lambda answers: sum(a["text"] == talk[3]["content"] for a, talk in zip(answers, two)) / len(two)  # noqa: E731
    assert right(with_history) >= 0.9, right(with_history)
    assert right(alone) <= 0.05, right(alone)
    counts = [round(right(answers) * len(two)) for answers in (with_history, alone)]
    said = (f"On its {len(two)} held-out two-turn conversations the second answer is exactly right {counts[0]} times "
            f"with its history, and {'never' if not counts[1] else f'{counts[1]} times'} without it")
    assert said in " ".join((ROOT / "README.md").read_text().split()), "the README's figures"


# ---------------------------------------------------------------- train.py on conversations
def test_train_py_learns_conversations_audits_them_and_saves_the_template_plain_transformers_uses(
        smoke_trained, tmp_path):
    """The saved model answers through plain transformers (AutoTokenizer, pipeline("text-generation") given
    messages) exactly as `inference.py --messages-file` answers."""
    from transformers import AutoTokenizer, pipeline

    path = write(tmp_path, "chat.jsonl", [{"messages": TWO_TURNS}] * 40)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    sft = str(smoke_trained / "smoke-run" / "model")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", sft, "--dataset", path,
                             "--max-steps", "2", "--val-size", "4", "--output-dir", str(tmp_path / "chat")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("Labels: all assistant turns and their end-of-turn token ('<|endoftext|>'); checked on every example. "
            "Example 0 of train, trained tokens in [[ ]]:\n  ### Instruction:\n  List the words: cat owl\n  \n"
            "  ### Response:\n  [[cat, owl<|endoftext|>]]### Instruction:\n") in result.stdout
    saved = AutoTokenizer.from_pretrained(tmp_path / "chat")
    assert saved.apply_chat_template(TWO_TURNS[:3], tokenize=False, add_generation_prompt=True) == (
        "### Instruction:\nList the words: cat owl\n\n### Response:\ncat, owl<|endoftext|>"
        "### Instruction:\nNow reverse them.\n\n### Response:\n")
    assert json.loads((tmp_path / "chat" / "run_config.json").read_text())["train_on"] == "all_assistant"

    asked = [[{"role": "user", "content": "Repeat the word plum 3 times."}], TWO_TURNS[:3]]
    (tmp_path / "asked.jsonl").write_text("\n".join(json.dumps(m) for m in asked) + "\n")
    ours = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--finetuned", str(tmp_path / "chat"),
                           "--only", "finetuned", "--messages-file", str(tmp_path / "asked.jsonl"), "--json",
                           "--max-new-tokens", "16"], env=env, capture_output=True, text=True, timeout=300)
    assert ours.returncode == 0, ours.stderr[-3000:]
    answers = [json.loads(line)["finetuned"]["text"] for line in ours.stdout.splitlines()]
    generator = pipeline("text-generation", model=str(tmp_path / "chat"), device="cpu")
    theirs = [generator(messages, max_new_tokens=16, do_sample=False)[0]["generated_text"][-1]
              for messages in asked]
    assert [turn["role"] for turn in theirs] == ["assistant", "assistant"]
    assert answers == [turn["content"].strip() for turn in theirs] and answers[0] == "plum plum plum"

    # evaluation.py answers each held-out conversation's last assistant turn, its history rendered as in training
    # (the split rebuilt from the data with --dataset: the very same held-out conversations)
    report = subprocess.run([sys.executable, str(ROOT / "evaluation.py"), "--finetuned", str(tmp_path / "chat"),
                             "--base", sft, "--num-generations", "2", "--max-new-tokens", "8", "--dataset", path],
                            env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "attention_mask" not in report.stderr  # (transformers' padding check misfired on unpadded batches)
    written = json.loads((tmp_path / "chat" / "eval" / "report.json").read_text())
    assert written["finetuned"]["generations"] == 2 and written["finetuned"]["perplexity_examples"] == 4
    assert written["samples"][0]["instruction"] == "Now reverse them." and written["samples"][0]["reference"] == \
        "owl cat" and written["samples"][0]["input"] == "user: List the words: cat owl\nassistant: cat, owl"


def test_train_py_refuses_train_on_for_alpaca_records(smoke_trained, tmp_path):
    path = write(tmp_path, "a.jsonl", [{"instruction": "Hi", "input": "", "output": "Hello."}] * 10)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(smoke_trained / "smoke-run" / "base"),
                             "--dataset", path, "--train-on", "last_assistant", "--output-dir", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "--train-on applies to conversations" in result.stderr, result.stderr[-2000:]


def test_train_py_refuses_a_tokenizer_template_without_generation_markers(smoke_trained, tmp_path):
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    tokenizer = AutoTokenizer.from_pretrained(smoke_trained / "smoke-run" / "base")
    tokenizer.chat_template = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    tokenizer.save_pretrained(model)
    for name in os.listdir(smoke_trained / "smoke-run" / "base"):
        if name.endswith((".json", ".safetensors")) and not (model / name).exists():
            os.symlink(smoke_trained / "smoke-run" / "base" / name, model / name)
    path = write(tmp_path, "chat.jsonl", [{"messages": TWO_TURNS}] * 10)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(model), "--dataset", path,
                             "--output-dir", str(tmp_path / "never")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "has no {% generation %} markers" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "qwen2"])
def test_a_single_turn_conversation_gives_the_alpaca_paths_text_bos_included(family):
    """Our template on each family's tokenizer (BOS where the tokenizer adds one: OPT, Llama) renders a one-turn
    conversation as the Alpaca path formats the same record: BOS, prompt, answer and EOS. Byte-level BPEs
    (GPT-2, OPT, Qwen2) split it into the very same tokens; a SentencePiece-style one (Llama) tokenizes the
    text whole, as apply_chat_template does at inference too, so its word-start marks may differ."""
    import families

    tokenizer = families.tokenizer(family)
    record = {"instruction": "Repeat the word plum 3 times.", "input": "", "output": "plum plum plum"}
    own = chat_template.own_chat_template("seed", tokenizer)
    messages = [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": record["output"]}]
    [example] = chat_template.tokenize_conversations([messages], tokenizer, own, 512)
    alpaca = sft.tokenize_example(record, tokenizer, "seed", 512)
    bos = tokenizer.bos_token if alpaca["input_ids"][0] == tokenizer.bos_token_id else ""
    assert tokenizer.apply_chat_template(messages, chat_template=own, tokenize=False) == (
        bos + format_prompt(record) + record["output"] + tokenizer.eos_token)
    assert example["input_ids"][:1] == alpaca["input_ids"][:1] and example["input_ids"][-1] == tokenizer.eos_token_id
    if family != "llama":
        assert example["input_ids"] == alpaca["input_ids"] and example["labels"] == alpaca["labels"]


# ---------------------------------------------------------------- the review's cases
def test_our_saved_template_is_rebuilt_from_template_and_a_foreign_one_asks_in_its_own_format(gpt2_tokenizer):
    tokenizer = gpt2_tokenizer.__class__.from_pretrained(shared_path("gpt2-tokenizer"))
    tokenizer.chat_template = chat_template.own_chat_template("seed", tokenizer)  # saved by an earlier run here
    assert chat_template.chat_template_for(tokenizer, "alpaca", conversations=True) == \
        chat_template.own_chat_template("alpaca", tokenizer)
    record = {"instruction": "Name a colour.", "input": "warm ones"}
    assert chat_template.prompt_of(record, "seed", tokenizer.chat_template, tokenizer) == format_prompt(record)
    assert chat_template.prompt_of(record, "seed", CHATML, tokenizer) == [
        {"role": "user", "content": "Name a colour.\n\nwarm ones"}]


def test_assistant_turns_lose_leading_whitespace_that_would_merge_with_the_templates_newline(tmp_path, gpt2_tokenizer):
    path = write(tmp_path, "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "\n\n  Sure"}]}])
    [record], _ = conversations.load_training_records(path)
    assert record["messages"][1]["content"] == "Sure"
    own = chat_template.own_chat_template("seed")
    [example] = chat_template.tokenize_conversations([record["messages"]], gpt2_tokenizer, own, 512)
    prompt = chat_template.chat_prompt_ids(gpt2_tokenizer, record["messages"][:1], own)
    assert example["input_ids"][:len(prompt)] == prompt and example["spans"][0][0] == len(prompt)


def test_files_of_the_other_kind_are_pointed_to_the_right_flag(tmp_path):
    from tuning.cli import UserError
    from tuning.data.records import read_prompts

    (tmp_path / "one.json").write_text(json.dumps({"messages": TWO_TURNS}))
    with pytest.raises(UserError, match="holds one object; give a conversation as a list of turns"):
        conversations.read_conversations_to_answer(str(tmp_path / "one.json"))
    alpaca = write(tmp_path, "a.jsonl", [{"instruction": "Hi", "input": ""}])
    with pytest.raises(UserError, match=f"holds instruction records, not conversations; use --prompts-file {alpaca}"):
        conversations.read_conversations_to_answer(alpaca)
    chat = write(tmp_path, "c.jsonl", [{"messages": TWO_TURNS}])
    with pytest.raises(UserError, match=f"holds conversations; use --messages-file {chat}"):
        read_prompts(chat)
    system_only = write(tmp_path, "s.jsonl", [[{"role": "system", "content": "Be brief."}]])
    with pytest.raises(DataError, match="has only a system turn: no user turn to answer"):
        conversations.read_conversations_to_answer(system_only)


def test_the_web_page_offers_no_conversation_as_a_single_prompt_example(tmp_path):
    from tuning import rundir
    from tuning.generation import web

    rundir.write_json(str(tmp_path / rundir.RUN_CONFIG_FILE), {"dataset": "c.jsonl", "seed": 1, "val_size": 1})
    rundir.write_records(str(tmp_path / rundir.HELD_OUT_FILE), [{"messages": TWO_TURNS}])
    assert web.example_records(str(tmp_path)) == []


def test_datasetup_runs_train_pys_checks_on_conversations(tmp_path, gpt2_tokenizer):
    tokenizer = gpt2_tokenizer.__class__.from_pretrained(shared_path("gpt2-tokenizer"))
    tokenizer.chat_template = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    tokenizer.save_pretrained(tmp_path / "tok")
    path = write(tmp_path, "c.jsonl", [{"messages": TWO_TURNS}] * 10)
    result = subprocess.run([sys.executable, str(ROOT / "datasetup.py"), "--dataset", path, "--tokenizer",
                             str(tmp_path / "tok")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "has no {% generation %} markers" in result.stderr, result.stderr[-2000:]
