"""Constitutional AI (constitution.py): the constitution file and its errors, the feedback model's option
probabilities and soft labels, the resumable stages, the soft-label reward loss, and the smoke proof that no human
preference is needed: the SFT model labels its own greetings, and both stages make it polite."""

import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, shared_path
from tuning import smoke
from tuning.cli import UserError
from tuning.data import principles as cai
from tuning.data.records import DataError
from tuning.generation import feedback

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PRINCIPLE = {"name": "p", "critique": "Critique {answer} to {prompt}", "revision": "Revise {answer} after {critique}",
             "comparison": "Which? (A) {answer_a} (B) {answer_b}"}


def run_cai(cwd, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "constitution.py"), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def cai_main(*argv):
    """constitution.py in this process (no interpreter start-up): its flags parsed and checked, then main()."""
    import constitution
    from tuning import cli

    parser = cli.build_parser(constitution)
    args = cli.parse_or_exit(parser, constitution.validate_args, list(argv))
    try:
        constitution.main(args, cli.explicit_dests(parser, list(argv)))
    finally:  # the output dir's lock, held for the process's life when run as a script
        for handle in filter(None, constitution._lock):
            handle.close()
        constitution._lock.clear()


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


# ---------------------------------------------------------------- the constitution file
def test_the_shipped_constitutions_are_valid():
    harmless = cai.read_constitution(str(ROOT / "constitutions" / "harmless.json"))
    assert len(harmless) >= 4 and len({p["name"] for p in harmless}) == len(harmless)
    assert [p["name"] for p in cai.read_constitution(smoke.CONSTITUTION_FILE)] == ["polite"]


@pytest.mark.parametrize("change, message", [
    ({"revision": None}, "principle 0 ('p'): field 'revision' is missing"),
    ({"critique": "Critique the answer."}, "principle 0 ('p'): field 'critique' has no {answer} placeholder"),
    ({"revision": "Revise {answer}."}, "field 'revision' has no {critique} placeholder"),
    ({"comparison": "(A) {answer_a} (B) {answer_b} {answer}"}, "field 'comparison' has an unknown placeholder {answer}"),
    ({"critique": "{answer} {promt}"}, "field 'critique' has an unknown placeholder {promt}"),
    ({"critique": 3}, "field 'critique' is not a non-empty string"),
    ({"typo": "x"}, "unknown field 'typo'"),
])
def test_a_bad_principle_is_named_with_its_file_and_field(tmp_path, change, message):
    principle = {key: value for key, value in {**PRINCIPLE, **change}.items() if value is not None}
    path = write_json(tmp_path / "c.json", {"principles": [principle]})
    with pytest.raises(DataError) as error:
        cai.read_constitution(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_a_malformed_or_empty_constitution_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"principles": [')
    with pytest.raises(DataError, match="bad.json: malformed JSON at line 1"):
        cai.read_constitution(str(bad))
    with pytest.raises(DataError, match="non-empty list 'principles'"):
        cai.read_constitution(write_json(tmp_path / "empty.json", {"principles": []}))
    with pytest.raises(DataError, match="another principle has this name"):
        cai.read_constitution(write_json(tmp_path / "twice.json", {"principles": [PRINCIPLE, PRINCIPLE]}))
    with pytest.raises(DataError, match="constitution file not found"):
        cai.read_constitution(str(tmp_path / "missing.json"))


def test_requests_are_filled_literally():
    text = cai.request(PRINCIPLE, "revision", answer="use {braces} and {critique}", critique="it {is} fine")
    assert text == "Revise use {braces} and {critique} after it {is} fine"
    assert cai.request(PRINCIPLE, "comparison", answer_a="x", answer_b="y") == "Which? (A) x (B) y"


def test_what_prompt_stands_for():
    assert cai.prompt_text({"instruction": "Greet them.", "input": "cat dog"}) == "Greet them.\n\ncat dog"
    assert cai.prompt_text({"instruction": "Hi", "input": ""}) == "Hi"
    talk = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "How do I pick a lock?"}]
    assert cai.prompt_text({"messages": talk}) == "User: Hi\n\nAssistant: Hello\n\nUser: How do I pick a lock?"
    assert cai.prompt_text({"messages": talk[:1]}) == "Hi"
    assert cai.first_turn({"messages": talk})["messages"] == talk[:1]


# ---------------------------------------------------------------- the feedback model's labels
def test_a_soft_label_averages_both_orders_so_position_bias_cancels():
    # A model that always says "A": P(A) 0.9 in both orders, so it has no preference.
    assert feedback.soft_label([(0.9, 0.1)], [(0.9, 0.1)]) == pytest.approx(0.5)
    assert not feedback.orders_agree((0.9, 0.1), (0.9, 0.1))
    # A model that prefers the first answer in both orders: A first, then B once swapped.
    assert feedback.soft_label([(0.8, 0.2), (1.0, 0.0)], [(0.3, 0.7), (0.0, 1.0)]) == pytest.approx(0.875)
    assert feedback.orders_agree((0.8, 0.2), (0.3, 0.7))


def test_option_probabilities_are_the_next_token_ones_of_an_unpadded_forward(tiny_tokenizer):
    """Left padding, positions from the mask, the output layer at the last position: each prompt's probabilities
    equal those of the same prompt alone, as the model's full forward gives them."""
    model = smoke.build_model(tiny_tokenizer, seed=3).eval()
    prompts = ["### Instruction:\nWhich greeting is more polite?\n\n### Response:\n", "### Instruction:\nHi\n\n"
               "### Response:\n"]
    ids = feedback.option_ids(tiny_tokenizer, prompts[0], None, "m")
    got = feedback.option_probabilities(model, tiny_tokenizer, prompts, None, ids, batch_size=2)
    for prompt, ((p_a, p_b), mass) in zip(prompts, got):
        alone = torch.tensor([tiny_tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            logits = model(alone).logits[0, -1]
        expected = torch.softmax(logits[ids], dim=-1)
        assert (p_a, p_b) == pytest.approx(expected.tolist(), abs=1e-5) and p_a + p_b == pytest.approx(1.0)
        assert mass == pytest.approx(torch.softmax(logits, dim=-1)[ids].sum().item(), abs=1e-6)


def test_a_tokenizer_that_cannot_tell_the_letters_apart_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "hi": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    with pytest.raises(UserError, match="--feedback-model words: its tokenizer starts the replies A and B with the "
                                        "same token"):
        feedback.option_ids(tokenizer, "hi", None, "words")


# ---------------------------------------------------------------- the script, on tiny models
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tiny_tokenizer):
    """Two tiny random GPT-2 dirs (a policy, and a feedback model with a context of 64 positions), a prompts file
    and a constitution."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("cai")
    for name, positions in (("policy", 256), ("short", 64)):
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=len(tiny_tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=positions,
                            bos_token_id=tiny_tokenizer.eos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
        GPT2LMHeadModel(config).save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
    records = smoke.make_records(14, seed=5)
    write_json(root / "prompts.json", records)
    write_json(root / "c.json", {"principles": [PRINCIPLE, {**PRINCIPLE, "name": "q"}]})
    return root


def cai_args(root, *more):
    return ["--model", str(root / "policy"), "--prompts", str(root / "prompts.json"), "--constitution",
            str(root / "c.json"), "--max-new-tokens", "6", "--batch-size", "4", "--device", "cpu", *more]


def test_revise_writes_sft_records_and_resumes_where_it_stopped(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    cai_main(*cai_args(tiny_dirs, "--output-dir", str(out), "--revisions", "2"))
    done = read_jsonl(out / "revisions.jsonl")
    assert len(done) == 14 and all(set(r) >= {"instruction", "input", "output", "initial", "critiques"} for r in done)
    assert all(len(r["critiques"]) == 2 and r["critiques"][0]["principle"] in ("p", "q") for r in done)
    summary = json.loads((out / "revise_summary.json").read_text())
    assert summary["prompts"] == 14 and summary["rounds"] == 28
    # Killed mid-write: five whole lines and a cut one. The same command goes on after the five.
    lines = (out / "revisions.jsonl").read_text().splitlines(keepends=True)
    (out / "revisions.jsonl").write_text("".join(lines[:5]) + lines[5][:20])
    capsys.readouterr()
    cai_main(*cai_args(tiny_dirs, "--output-dir", str(out), "--revisions", "2"))
    assert "Going on after the 4 prompts done" in capsys.readouterr().out  # whole batches of 4: the cut one redone
    assert read_jsonl(out / "revisions.jsonl") == done  # greedy, principles drawn per prompt: the same records
    changed = run_cai(tmp_path, *cai_args(tiny_dirs, "--output-dir", str(out), "--revisions", "1"))
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1
    assert "holds a --stage revise run with other settings (revisions: 2 there, 1 now)" in changed.stderr
    # train.py reads the revisions as they are.
    from tuning.data.conversations import load_training_records

    records, _ = load_training_records(str(out / "revisions.jsonl"), "auto", False)
    assert len(records) == sum(bool(r["output"].strip()) and bool(r["instruction"].strip()) for r in done)


def test_an_interrupted_label_run_goes_on_with_the_records_an_unbroken_one_writes(tiny_dirs, tmp_path, capsys):
    """Sampled answers: the batch a kill cut is redone whole, with its own seed, so the records are the same."""
    cai_main(*cai_args(tiny_dirs, "--stage", "label", "--output-dir", str(tmp_path / "clean")))
    lines = (tmp_path / "clean" / "labels.jsonl").read_text().splitlines(keepends=True)
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("label_config.json",):
        (cut / name).write_text((tmp_path / "clean" / name).read_text())
    (cut / "labels.jsonl").write_text("".join(lines[:6]) + lines[6][:15])  # a batch and a half, and a cut line
    capsys.readouterr()
    cai_main(*cai_args(tiny_dirs, "--stage", "label", "--output-dir", str(cut)))
    assert "Going on after the 4 prompts done" in capsys.readouterr().out
    assert (cut / "labels.jsonl").read_text() == "".join(lines)


def test_instructions_without_outputs_and_repeated_prompts(tiny_dirs, tmp_path, capsys):
    prompts = write_json(tmp_path / "asks.json", [{"instruction": "Greet them.", "input": "cat dog owl"},
                                                  {"instruction": "Greet them.", "input": "cat dog owl"},
                                                  {"instruction": "Count the words.", "input": "a b"},
                                                  {"instruction": " ", "input": ""}])
    cai_main(*cai_args(tiny_dirs, "--prompts", prompts, "--output-dir", str(tmp_path / "o")))
    assert f"Prompts: 2 from {prompts}; left out: 1 empty, 1 repeated" in capsys.readouterr().out
    assert [r["instruction"] for r in read_jsonl(tmp_path / "o" / "revisions.jsonl")] == ["Greet them.",
                                                                                          "Count the words."]


def test_label_writes_pairs_reward_and_align_read_with_a_feedback_model_of_another_tokenizer(tiny_dirs, tmp_path,
                                                                                            gpt2_tokenizer):
    """The policy has the smoke tokenizer, the feedback model GPT-2's: answers pass between them as text."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tuning.data.preferences import load_pairs

    judge = tmp_path / "judge"
    config = GPT2Config(vocab_size=len(gpt2_tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=512)
    GPT2LMHeadModel(config).save_pretrained(judge)
    gpt2_tokenizer.save_pretrained(judge)
    out = tmp_path / "out"
    cai_main(*cai_args(tiny_dirs, "--stage", "label", "--feedback-model", str(judge), "--output-dir", str(out),
                       "--min-confidence", "0.5"))
    labels = read_jsonl(out / "labels.jsonl")
    asked = [r for r in labels if "not_asked" not in r]
    assert len(labels) == 14 and asked
    for record in asked:
        assert 0.5 <= record["label"] <= 1 and sorted(record["principles"]) == ["p", "q"]
        assert len(record["probabilities"]) == 4 and all(p["A"] + p["B"] == pytest.approx(1) for p in
                                                         record["probabilities"])
    summary = json.loads((out / "label_summary.json").read_text())
    assert summary["labelled"] == len(asked) and summary["kept"] == len(read_jsonl(out / "pairs.jsonl"))
    assert (out / "labels.png").stat().st_size > 10_000
    pairs, _ = load_pairs(str(out / "pairs.jsonl"))
    assert [pair["label"] for pair in pairs] == [r["label"] for r in asked if r["chosen"] != r["rejected"]]


def test_bad_input_gets_one_line_naming_the_file_and_field(tiny_dirs, tmp_path):
    bad = write_json(tmp_path / "bad.json", {"principles": [{**PRINCIPLE, "critique": "Critique it."}]})
    result = run_cai(tmp_path, *cai_args(tiny_dirs, "--constitution", bad, "--output-dir", str(tmp_path / "o")))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"{bad}: principle 0 ('p'): field 'critique' has no {{answer}} placeholder" in result.stderr
    # A prompt too long for the feedback model's 64 positions (the second; the first fits).
    long = write_json(tmp_path / "long.json", [{"instruction": "Count the words.", "input": "cat", "output": "1"},
                                               {"instruction": "Count the words.", "input": "cat dog " * 20,
                                                "output": "40"}])
    with pytest.raises(UserError) as error:
        cai_main(*cai_args(tiny_dirs, "--feedback-model", str(tiny_dirs / "short"), "--prompts", long,
                           "--output-dir", str(tmp_path / "o"), "--max-new-tokens", "2"))
    assert f"{long}: prompt 1, field 'instruction': principle 'p' asks it in a critique request of" in str(error.value)
    assert "positions of the feedback model" in str(error.value) and "\n" not in str(error.value)
    # A feedback model whose tokenizer is not its own: more tokens than its embeddings.
    mismatched = tmp_path / "mismatched"
    from transformers import AutoTokenizer

    from tuning.models.loading import load_model

    load_model(str(tiny_dirs / "short")).save_pretrained(mismatched)
    AutoTokenizer.from_pretrained(shared_path("gpt2-tokenizer")).save_pretrained(mismatched)
    with pytest.raises(UserError, match=f"--feedback-model {mismatched}: its tokenizer has 50257 tokens but "
                                        "config.json's vocab_size is"):
        cai_main(*cai_args(tiny_dirs, "--feedback-model", str(mismatched), "--output-dir", str(tmp_path / "o")))
    result = run_cai(tmp_path, "--min-confidence", "0.4", "--revisions", "0")
    assert result.returncode == 2 and "--revisions must be >= 1" in result.stderr and "--min-confidence" in \
        result.stderr


# ---------------------------------------------------------------- soft labels in reward.py
def test_the_soft_label_loss_is_the_cross_entropy_against_the_label():
    from tuning.preference.reward_trainer import pairwise_loss

    scores = torch.tensor([[2.0], [0.5], [0.0], [1.0]])  # margins +1.5 and -1
    hard = pairwise_loss(scores)
    assert pairwise_loss(scores, torch.tensor([1.0, 1.0])).item() == pytest.approx(hard.item())
    soft = pairwise_loss(scores, torch.tensor([0.8, 0.5]))
    m = torch.tensor([1.5, -1.0])
    expected = -(0.8 * torch.nn.functional.logsigmoid(m[0]) + 0.2 * torch.nn.functional.logsigmoid(-m[0])
                 + 0.5 * torch.nn.functional.logsigmoid(m[1]) + 0.5 * torch.nn.functional.logsigmoid(-m[1])) / 2
    assert soft.item() == pytest.approx(expected.item())


def test_soft_labels_reach_the_batch_and_unlabelled_pairs_are_refused(tmp_path, tiny_tokenizer):
    from tuning.data import collate, preferences

    pairs = [{"instruction": f"Greet them {i}.", "chosen": "Hello!", "rejected": "hey", "label": 0.5 + i / 40}
             for i in range(20)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    data, _, _ = preferences.prepare_pairs(str(path), False, 4, 0, tiny_tokenizer, "seed", 64, lambda *a: None,
                                           targets=True)
    batch = collate.ScoreCollator(tiny_tokenizer.eos_token_id, "rows")(list(data["train"])[:3])
    labels = {p["instruction"]: p["label"] for p in pairs}
    assert batch["targets"].tolist() == pytest.approx([row["target"] for row in list(data["train"])[:3]])
    assert set(round(t, 6) for t in batch["targets"].tolist()) <= set(round(v, 6) for v in labels.values())
    path.write_text("".join(json.dumps({k: v for k, v in p.items() if k != "label" or i % 2}) + "\n"
                            for i, p in enumerate(pairs)))
    with pytest.raises(DataError, match="--soft-labels needs a probability in each pair's 'label' field; 10 of 20 "
                                        "usable pairs do not: usable pair 0 has no 'label' field"):
        preferences.prepare_pairs(str(path), False, 4, 0, tiny_tokenizer, "seed", 64, lambda *a: None, targets=True)
    path.write_text("".join(json.dumps({**p, "label": "yes"}) + "\n" for p in pairs))
    with pytest.raises(DataError, match="usable pair 0 has a 'label' of 'yes', not a probability in"):
        preferences.prepare_pairs(str(path), False, 4, 0, tiny_tokenizer, "seed", 64, lambda *a: None, targets=True)
    preferences.prepare_pairs(str(path), False, 4, 0, tiny_tokenizer, "seed", 64, lambda *a: None)  # (unused: fine)


# ---------------------------------------------------------------- real data, real architecture
def test_both_stages_run_on_hh_red_team_prompts_with_distilgpt2s_architecture(distilgpt2_sft, tmp_path):
    """Random weights, so the text is noise, but every step runs: HH's first human turns, the default
    constitution, DistilGPT2's tokenizer and context."""
    hh = shared_path("data", "hh-rlhf-harmless-base-test.jsonl.gz")
    base = ["--model", str(distilgpt2_sft), "--prompts", str(hh), "--num-prompts", "3", "--max-new-tokens", "4",
            "--output-dir", str(tmp_path / "cai"), "--skip-invalid", "--device", "cpu"]
    revise = run_cai(tmp_path, *base)
    assert revise.returncode == 0, revise.stderr[-3000:]
    first = json.loads(gzip.open(hh, "rt").readline())["chosen"].split("\n\nAssistant:")[0].split("Human: ", 1)[1]
    records = read_jsonl(tmp_path / "cai" / "revisions.jsonl")
    assert len(records) == 3 and records[0]["messages"][0] == {"role": "user", "content": first.strip()}
    assert [turn["role"] for turn in records[0]["messages"]] == ["user", "assistant"]
    label = run_cai(tmp_path, *base, "--stage", "label", "--principles-per-pair", "2")
    assert label.returncode == 0, label.stderr[-3000:]
    assert len(read_jsonl(tmp_path / "cai" / "labels.jsonl")) == 3


# ---------------------------------------------------------------- the smoke proof
def polite_share(model_dir, records):
    from tuning.data.templates import format_prompt
    from tuning.generation.generate import generate, load_for_generation

    lm, tokenizer = load_for_generation(str(model_dir), torch.device("cpu"), "model")
    answers = generate(lm, tokenizer, [format_prompt(r, "seed") for r in records],
                       {"max_new_tokens": 24, "do_sample": False}, batch_size=100)
    return sum(smoke.style(a["text"]) == "polite" for a in answers) / len(records)


def other_tasks_right(model_dir, held_out):
    from tuning.data.templates import format_prompt
    from tuning.generation.generate import generate, load_for_generation

    other = [r for r in held_out if r["instruction"] != smoke.GREETING]
    lm, tokenizer = load_for_generation(str(model_dir), torch.device("cpu"), "model")
    answers = generate(lm, tokenizer, [format_prompt(r, "seed") for r in other],
                       {"max_new_tokens": 32, "do_sample": False}, batch_size=100)
    return sum(smoke.is_right(r, a["text"]) for r, a in zip(other, answers)) / len(other)


@pytest.mark.slow
def test_the_smoke_model_becomes_polite_from_its_own_feedback(smoke_constitution, smoke_reward):
    """No human preference: the SFT model critiques, revises and labels its own greetings. Its labels agree with
    the true style, and both SL-CAI (revisions) and RL-CAI (DPO on its labels) make it polite, keeping the rest."""
    from tuning.data.records import held_out_records

    work, _ = smoke_constitution
    run = work / "smoke-run"
    labels = read_jsonl(run / "constitution" / "labels.jsonl")
    decided = [r for r in labels if "not_asked" not in r and {smoke.style(r["chosen"]), smoke.style(r["rejected"])}
               == {"polite", "casual"}]
    agree = sum(smoke.style(r["chosen"]) == "polite" for r in decided) / len(decided)
    assert len(decided) >= 150 and agree >= 0.95, (len(decided), agree)
    fresh = smoke.fresh_greetings(str(run))
    sft, sl, rl = (polite_share(run / name, fresh) for name in ("model", "sl-cai", "rl-cai"))
    assert 0.3 <= sft <= 0.7 and sl >= 0.8 and rl >= 0.9, (sft, sl, rl)
    text = " ".join((ROOT / "README.md").read_text().split())  # the README's figures are these
    assert (f"the SFT model answers {round(sft * 200)} politely, the SL-CAI model {round(sl * 200)} and the RL-CAI "
            f"model {round(rl * 200)}; of the {len(decided)} labelled pairs whose answers differ in style, the SFT "
            f"model's own labels chose the polite one {round(agree * len(decided))} times") in text
    held_out, _ = held_out_records(str(run / "model"))
    before = other_tasks_right(run / "model", held_out)
    for name in ("sl-cai", "rl-cai"):
        assert other_tasks_right(run / name, held_out) >= before - 0.05, name
    # The README's evaluation of the constitution-tuned model against the SFT one, judged by the reward model.
    result = subprocess.run([sys.executable, str(ROOT / "evaluation.py"), "--base", "smoke-run/model", "--finetuned",
                             "smoke-run/rl-cai", "--reward-model", "smoke-run/reward"], cwd=work, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "rl-cai" / "eval" / "report.json").read_text())
    assert report["win_rate"] > 0.5 and report["finetuned"]["mean_reward"] > report["base"]["mean_reward"]


def test_the_default_prompts_are_a_hub_datasets_folder(monkeypatch):
    """"Anthropic/hh-rlhf:harmless-base" loads the dataset's harmless-base folder (its red-team dialogues)."""
    import datasets

    from tuning.data.records import read_raw

    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: asked.append((a, k)) or [{"chosen": "x"}])
    import constitution

    assert read_raw(constitution.PROMPTS) == [(f"{constitution.PROMPTS}: record 0", {"chosen": "x"})]
    assert asked == [(("Anthropic/hh-rlhf",), {"data_dir": "harmless-base", "split": "train"})]
    read_raw("tatsu-lab/alpaca")
    assert asked[-1] == (("tatsu-lab/alpaca",), {"data_dir": None, "split": "train"})
