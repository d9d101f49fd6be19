"""inference.py on conversations: --messages-file (batched, --json) and --chat in the terminal."""

import json
import os
import subprocess
import sys

import pytest

from tuning.cli import UserError
from tuning.data.chat_template import own_chat_template
from tuning.data.conversations import read_conversations_to_answer
from tuning.data.records import DataError
from conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def inference(work, *args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "inference.py"), "--smoke", "--max-new-tokens", "16", *args],
                          cwd=work, env=ENV, capture_output=True, text=True, timeout=300, input=stdin)


def test_conversations_to_answer_take_every_shape_and_keep_a_last_answer_as_the_reference(tmp_path):
    one = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
           {"role": "user", "content": "Again?"}]
    (tmp_path / "one.json").write_text(json.dumps(one))
    assert read_conversations_to_answer(str(tmp_path / "one.json")) == [{"messages": one, "reference": None}]
    lines = [one[:2], {"messages": one}, {"conversations": [{"from": "human", "value": "Hi"}]}]
    (tmp_path / "many.jsonl").write_text("\n".join(map(json.dumps, lines)))
    assert read_conversations_to_answer(str(tmp_path / "many.jsonl")) == [
        {"messages": one[:1], "reference": "Hello."}, {"messages": one, "reference": None},
        {"messages": one[:1], "reference": None}]
    (tmp_path / "bad.jsonl").write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "user",
                                                                                         "content": "Hi"}]))
    with pytest.raises(DataError, match=r"bad.jsonl: record 0 \(line 1\): turns 1 and 2 are both from the user$"):
        read_conversations_to_answer(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="--messages-file nope.json: file not found"):
        read_conversations_to_answer("nope.json")


def test_fit_history_drops_the_oldest_exchanges_and_keeps_the_system_turn(tiny_tokenizer):
    sys.path.insert(0, str(ROOT))
    from tuning.generation.chat import fit_history

    chat = own_chat_template("seed")
    history = [{"role": "system", "content": "Be brief."}]
    for number in range(3):
        history += [{"role": "user", "content": f"question {number}"}, {"role": "assistant", "content": "answer"}]
    history.append({"role": "user", "content": "last question"})
    full = len(tiny_tokenizer.apply_chat_template(history, chat_template=chat, add_generation_prompt=True)["input_ids"])
    kept = history[:1] + history[5:]  # the system turn, the last exchange and the last question
    room = len(tiny_tokenizer.apply_chat_template(kept, chat_template=chat, add_generation_prompt=True)["input_ids"])
    assert fit_history(history, tiny_tokenizer, chat, full) and len(history) == 8
    assert fit_history(history, tiny_tokenizer, chat, room) and history == kept
    assert not fit_history(history, tiny_tokenizer, chat, 3) and history == [kept[0], kept[-1]]


def test_a_message_too_long_for_the_context_leaves_the_history_as_it_was(tiny_tokenizer):
    """add_user_turn: the oldest exchanges go to make room, but a message that can't fit even alone is not sent and
    costs the history nothing (in the terminal chat and on the web page alike)."""
    from types import SimpleNamespace

    from tuning.generation.chat import add_user_turn

    chat = own_chat_template("seed")
    history = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]
    one_turn = len(tiny_tokenizer.apply_chat_template(history[:1], chat_template=chat,
                                                      add_generation_prompt=True)["input_ids"])
    lm = SimpleNamespace(config=SimpleNamespace(n_positions=one_turn + 4, max_position_embeddings=None))
    assert add_user_turn(history, "question", lm, tiny_tokenizer, chat, max_new_tokens=4) == 2
    assert history == [{"role": "user", "content": "question"}]
    history.append({"role": "assistant", "content": "answer"})
    assert add_user_turn(history, "word " * 200, lm, tiny_tokenizer, chat, max_new_tokens=4) is None
    assert history == [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]


def test_messages_file_answers_as_the_prompt_does_and_chat_keeps_each_models_history(smoke_trained):
    work = smoke_trained
    (work / "asked.jsonl").write_text(json.dumps([{"role": "user", "content": "Repeat the word plum 3 times."},
                                                  {"role": "assistant", "content": "plum plum plum"}]) + "\n")
    answered = inference(work, "--messages-file", "asked.jsonl", "--json")
    assert answered.returncode == 0, answered.stderr[-2000:]
    row = json.loads(answered.stdout)
    assert row["reference"] == "plum plum plum" and row["finetuned"]["text"] == "plum plum plum"
    prompted = inference(work, "--prompt", "Repeat the word plum 3 times.", "--json")
    assert json.loads(prompted.stdout)["finetuned"] == row["finetuned"]  # one prompt, one template
    assert json.loads(prompted.stdout)["base"] == row["base"]

    talk = inference(work, "--chat", "--only", "finetuned", stdin="Repeat the word plum 3 times.\n/reset\n"
                     "Repeat the word owl 2 times.\n")
    assert talk.returncode == 0, talk.stderr[-2000:]
    assert talk.stdout.split("you> ")[1:] == [
        "Repeat the word plum 3 times.\n--- finetuned (smoke-run/model)\nplum plum plum\n\n",
        "/reset\n(every history cleared)\n\n",
        "Repeat the word owl 2 times.\n--- finetuned (smoke-run/model)\nowl owl\n\n", "\n"]
    both = inference(work, "--chat", "--prompt", "hi")
    assert both.returncode == 2 and "--prompt and --chat: give one of them" in both.stderr
