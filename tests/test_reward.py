"""reward.py and tuning/models/scoring.py: where the score is read, the pairwise loss, the tokens trained on, the smoke
proof that the reward model learns, the run layer's behaviour, and a few steps on the real HH-RLHF pairs."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tuning.models import packing_checks

from tuning.data import collate

from tuning.data import sft, templates
import families
from tuning.models import loading
from tuning.data import preferences
from tuning.models import scoring
from conftest import ROOT, shared_path
from tuning.preference.reward_trainer import pairwise_loss
from transformers import AutoModelForSequenceClassification

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TEXTS = [("### Instruction:\nName a color.\n\n### Response:\n", "Blue."),
         ("### Instruction:\nGive the last word.\n\n### Input:\ncat dog owl\n\n### Response:\n", "owl"),
         ("### Instruction:\nWrite a short sentence about the sea.\n\n### Response:\n", "The sea is wide and deep."),
         ("### Instruction:\nAdd the numbers.\n\n### Input:\n2 + 3\n\n### Response:\n", "5")]


def run_reward(cwd, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "reward.py"), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def load_json(path):
    with open(path) as handle:
        return json.load(handle)


def tiny_reward_model(tmp_path, family="gpt2"):
    """A tiny reward model from a family's causal LM, with a random (not zero) score head."""
    lm, tok, _ = families.build(family)
    tok = loading.ready_tokenizer(tok, family)
    lm.save_pretrained(tmp_path / family)
    rm = scoring.reward_model_from(str(tmp_path / family))
    torch.manual_seed(1)
    with torch.no_grad():
        rm.score.weight.normal_()
    return rm.eval(), tok


# ---------------------------------------------------------------- where the score is read
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gemma2", "opt", "bloom"])
def test_scores_do_not_change_with_padding_batch_size_or_order(tmp_path, family):
    rm, tok = tiny_reward_model(tmp_path, family)
    sequences = [scoring.answer_ids(tok, p, a) for p, a in TEXTS]
    alone = [scoring.score_ids(rm, [s], tok.pad_token_id)[0] for s in sequences]  # no padding at all
    together = scoring.score_ids(rm, sequences, tok.pad_token_id, batch_size=4)  # right-padded to the longest
    backwards = scoring.score_ids(rm, sequences[::-1], tok.pad_token_id, batch_size=3)[::-1]
    assert len(set(map(len, sequences))) >= 3  # really different lengths, so really padded
    assert together == pytest.approx(alone, abs=1e-5) and backwards == pytest.approx(alone, abs=1e-5)
    same, _, _ = packing_checks.packed_scores_match(rm, sequences, tok.pad_token_id)
    keeps_apart = family not in ("opt", "bloom")  # as for SFT packing (test_families.py)
    assert same == keeps_apart
    if keeps_apart:
        packed = scoring.score_ids(rm, sequences, tok.pad_token_id, batch_size=4, mode="rows")
        assert packed == pytest.approx(alone, abs=1e-5)


def test_the_score_is_read_at_the_answers_last_token_before_the_eos(tmp_path):
    """Ours reads the answer's last token, the one before the EOS (where the SFT model predicts the EOS), not the
    EOS itself. GPT-2's own head with pad = EOS reads the same token of one unpadded row; saved without a pad id,
    Hugging Face's forward reads the last token, so it agrees on prompt + answer without the EOS."""
    rm, tok = tiny_reward_model(tmp_path)
    ids = scoring.answer_ids(tok, *TEXTS[0])
    assert ids[-1] == tok.eos_token_id == tok.pad_token_id
    ours = scoring.score_ids(rm, [ids], tok.pad_token_id)[0]
    with torch.no_grad():
        at_eos = float(rm.score(rm.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]))
        rm.config.pad_token_id = tok.pad_token_id
        hf_pad_eos = rm(input_ids=torch.tensor([ids])).logits.item()
        scoring.without_pad_id(rm)
        hf_no_pad = rm(input_ids=torch.tensor([ids[:-1]])).logits.item()
    assert abs(at_eos - ours) > 1e-3
    assert hf_pad_eos == pytest.approx(ours, abs=1e-5) and hf_no_pad == pytest.approx(ours, abs=1e-5)


def test_collator_puts_each_pair_together_and_indexes_each_eos(tiny_tokenizer):
    tok = loading.ready_tokenizer(tiny_tokenizer)
    pairs, _ = preferences.tokenize_pairs([preferences.parse_pair(
        {"instruction": "Give the last word.", "input": "cat dog owl", "chosen": "owl", "rejected": "cat dog"}),
        preferences.parse_pair({"instruction": "Count the words.", "input": "a b", "chosen": "2", "rejected": "3"})],
        tok, "seed", 128)
    for mode in ("none", "rows", "flat"):
        batch = collate.ScoreCollator(tok.pad_token_id, mode)(pairs)
        rows, cols = batch["score_index"].T
        assert batch["num_pairs"] == 2 and len(rows) == 4
        assert batch["input_ids"][rows, cols].tolist() == [tok.eos_token_id] * 4
        lengths = [len(p["prompt_ids"]) + len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids")]
        assert batch["num_real_tokens"] == sum(lengths)
        if mode != "none":  # the position of each scored token is its sequence's last
            assert batch["position_ids"][rows, cols].tolist() == [n - 1 for n in lengths]


def test_pairwise_loss_and_accuracy():
    scores = torch.tensor([2.0, 0.0, -1.0, 1.0])  # chosen, rejected, chosen, rejected: margins 2 and -2
    expected = (torch.nn.functional.softplus(torch.tensor(-2.0)) + torch.nn.functional.softplus(torch.tensor(2.0))) / 2
    assert pairwise_loss(scores).item() == pytest.approx(expected.item())
    assert pairwise_loss(torch.tensor([50.0, -50.0])).item() == pytest.approx(0.0, abs=1e-12)  # no overflow
    stats = scoring.pairwise_stats([2.0, -2.0, 0.0, 1.0])
    assert stats["accuracy"] == pytest.approx(0.625) and stats["mean_margin"] == pytest.approx(0.25)
    assert scoring.pairwise_stats([0.0] * 7) == {"accuracy": 0.5, "loss": pytest.approx(0.6931, abs=1e-4),
                                                 "mean_margin": 0.0}


def test_new_reward_model_prefers_nothing(tmp_path):
    lm, tok, _ = families.build("gpt2")
    lm.save_pretrained(tmp_path / "sft")
    rm = scoring.reward_model_from(str(tmp_path / "sft"))
    assert scoring.score_ids(rm, [scoring.answer_ids(tok, p, a) for p, a in TEXTS], tok.eos_token_id) == [0.0] * 4
    assert torch.equal(rm.transformer.h[0].mlp.c_fc.weight, lm.transformer.h[0].mlp.c_fc.weight)  # the SFT body


def test_a_family_without_a_classification_head_is_refused_cleanly(tmp_path):
    lm, _, _ = families.build("granite")
    lm.save_pretrained(tmp_path / "granite")
    with pytest.raises(loading.UserError, match="as the body of a reward model"):
        scoring.reward_model_from(str(tmp_path / "granite"))


def test_reward_tokens_are_the_sft_tokens_on_a_real_record(gpt2_tokenizer):
    """The chosen answer of an Alpaca-style pair is tokenized exactly as SFT trained on it: template, BOS
    behaviour, answer and EOS; so the reward model scores what the SFT model generates."""
    records = json.loads(shared_path("data", "alpaca_5000.json").read_text())
    tok = loading.ready_tokenizer(gpt2_tokenizer)
    for record in (records[0], next(r for r in records if r["input"])):
        pair = preferences.parse_pair({**record, "chosen": record["output"], "rejected": "No."})
        tokens = preferences.tokenize_pair(pair, tok, "seed", 1024)
        example = sft.tokenize_example(record, tok, "seed", 1024)
        assert tokens["prompt_ids"] + tokens["chosen_ids"] == example["input_ids"]
        assert tokens["chosen_ids"][-1] == tok.eos_token_id
        assert scoring.answer_ids(tok, preferences.pair_prompt(pair, "seed"), record["output"]) == example["input_ids"]


# ---------------------------------------------------------------- the smoke proof, end to end
def test_smoke_reward_model_ranks_held_out_pairs(smoke_reward):
    work, stdout = smoke_reward
    out = work / "smoke-run" / "reward"
    metrics = load_json(out / "metrics.json")
    assert metrics["eval_accuracy_before"] == 0.5 and metrics["eval_loss_before"] == pytest.approx(0.6931, abs=1e-4)
    assert metrics["eval_accuracy_after"] >= 0.95 and metrics["eval_pairs"] == 200
    assert metrics["eval_loss_after"] < 0.2 and metrics["eval_mean_margin_after"] > 1
    assert metrics["train_pairs"] == 3600 and metrics["pairs_per_second"] > 0 and metrics["train_runtime_s"] > 0
    assert (out / "margins.png").stat().st_size > 10_000 and (out / "sft_template.json").exists()
    assert load_json(out / "config.json")["pad_token_id"] is None
    config = load_json(out / "run_config.json")
    assert config["data_report"] == {"read": 2000, "malformed": 0, "empty": 0, "equal": 0, "too_long": 0,
                                     "skipped": [], "formats": {"alpaca": 2000, "prompt": 0, "conversation": 0,
                                                                "dialogue": 0}}
    assert "Held-out pairwise accuracy 50.0% ->" in stdout
    again = run_reward(work, "--smoke")  # a finished run is not run again
    assert again.returncode == 0 and "already holds this finished run" in again.stdout


def test_score_cli_and_function_prefer_the_polite_greeting(smoke_reward):
    from tuning import smoke

    work, _ = smoke_reward
    out = str(work / "smoke-run" / "reward")
    rm, tok, template = scoring.load_reward_model(out)
    names = "cat dog owl"
    prompt = templates.format_prompt({"instruction": smoke.GREETING, "input": names}, template)
    polite, casual = (form.format(names=names) for form in smoke.STYLES.values())
    scores = scoring.score_texts(rm, tok, [prompt, prompt], [polite, casual])
    assert scores[0] > scores[1]
    shown = run_reward(work, "--smoke", "--score", "--prompt", smoke.GREETING, "--input", names, "--answer", polite)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"{scores[0]:+9.4f}  answer: {polite!r}" in shown.stdout
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()  # Hugging Face's own forward, no score_index
    with torch.no_grad():
        assert float(hf(torch.tensor([scoring.answer_ids(tok, prompt, polite)[:-1]])).logits[0, 0]) == pytest.approx(
            scores[0], abs=1e-5)
    pairs = work / "pairs-to-score.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in smoke.make_pairs(20, seed=5)))
    ranked = run_reward(work, "--smoke", "--score", "--prompts-file", str(pairs))
    assert ranked.returncode == 0 and "chosen scored above rejected in" in ranked.stdout
    assert int(ranked.stdout.split("chosen scored above rejected in ")[1].split("/")[0]) >= 18


def start_reward_until(work, args, checkpoint):
    """reward.py started in the background, once checkpoint-N of its output dir is complete."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "reward.py"), *args], cwd=work, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = work / "rm-resume" / f"checkpoint-{checkpoint}" / "trainer_state.json"
    for _ in range(2400):
        if state.exists() or proc.poll() is not None:
            break
        subprocess.run(["sleep", "0.05"])
    assert proc.poll() is None, f"the run ended before {state} appeared: {proc.stdout.read()[-3000:]}"
    return proc


def test_reward_run_resumes_after_sigterm_and_kill_9_and_refuses_another_run(smoke_reward):
    work, _ = smoke_reward
    args = ["--smoke", "--epochs", "1", "--save-steps", "10", "--output-dir", "rm-resume"]
    proc = start_reward_until(work, args, 10)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output[-3000:]
    assert "Run the same command to continue" in output
    other = run_reward(work, *args, "--lr", "1e-4")
    assert other.returncode == 2 and "holds a different run" in other.stderr and "lr: 0.001 there" in other.stderr
    proc = start_reward_until(work, args, 30)
    proc.kill()  # kill -9: no handler runs, the lock goes with the process
    proc.communicate(timeout=60)
    resumed = run_reward(work, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from rm-resume/checkpoint-" in resumed.stdout
    metrics = load_json(work / "rm-resume" / "metrics.json")
    assert metrics["global_step"] == 57 and metrics["train_pairs"] == 1800  # the whole run, all three sessions


@pytest.mark.parametrize("args,expected", [
    (["--score", "--prompt", "x"], "--score needs --answer (with --prompt) or --prompts-file"),
    (["--prompt", "x", "--answer", "y"], "--prompt, --answer: only used with --score"),
    ([], "--model distilgpt2-alpaca: no SFT model there. Run `python train.py` first"),
    (["--model", ".", "--output-dir", "."], "is the SFT model's directory"),
    (["--batch-size", "0", "--lr", "0"], "--batch-size must be >= 1"),
    (["--model", "./no-sft", "--dataset", "pairs.json"], "no such directory"),
    (["--score", "--prompt", "x", "--answer", "y", "--output-dir", "nothing"], "--output-dir nothing: no reward model"),
])
def test_bad_settings_are_refused_naming_the_flag(tmp_path, args, expected):
    result = run_reward(tmp_path, *args)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_no_run_overwrites_another_scripts_output_or_outgrows_the_model(smoke_reward):
    work, _ = smoke_reward
    sft = work / "smoke-run" / "model"
    same = run_reward(work, "--smoke", "--output-dir", str(sft), "--no-resume")
    assert same.returncode == 2 and "is the SFT model's directory" in same.stderr
    train = subprocess.run([sys.executable, str(ROOT / "train.py"), "--smoke", "--output-dir", "smoke-run/reward",
                            "--no-resume"], cwd=work, env=ENV, capture_output=True, text=True, timeout=300)
    assert train.returncode == 2 and "holds a run of reward.py" in train.stderr
    assert (sft / "config.json").exists() and (work / "smoke-run" / "reward" / "metrics.json").exists()
    long = run_reward(work, "--smoke", "--max-length", "1000", "--output-dir", "rm-long")
    assert long.returncode == 2 and "--max-length 1000 is more than the 256 positions" in long.stderr
    not_rm = run_reward(work, "--score", "--prompt", "x", "--answer", "y", "--output-dir", str(sft))
    assert not_rm.returncode == 2 and "causal language model (GPT2LMHeadModel), such as the SFT model" in not_rm.stderr


def test_smoke_reward_needs_the_smoke_sft_model_first(tmp_path):
    result = run_reward(tmp_path, "--smoke")
    assert result.returncode == 2 and "run `python train.py --smoke` first" in result.stderr


# ---------------------------------------------------------------- the real HH-RLHF pairs
def test_hh_rlhf_dialogues_through_sft_reward_model_and_dpo_on_distilgpt2s_architecture(tmp_path):
    """The real HH-RLHF file end to end on DistilGPT2's architecture, a few steps each: train.py on its chosen
    dialogues (multi-turn conversations), then reward.py and align.py's DPO on its pairs, read as multi-turn
    conversations in the SFT model's chat template. (RLOO on conversations: test_align.py, through TRL's own
    training step; the file's malformed records: test_preferences.py.)"""
    data = str(shared_path("data", "hh-rlhf-harmless-base-test.jsonl.gz"))
    sft = subprocess.run([sys.executable, str(ROOT / "train.py"), "--init", "scratch", "--model",
                          str(shared_path("distilgpt2-config")), "--dataset", data, "--skip-invalid", "--max-steps", "2",
                          "--batch-size", "2", "--grad-accum", "1", "--val-size", "8", "--output-dir", "sft"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert sft.returncode == 0, sft.stderr[-3000:]
    assert "Labels: all assistant turns and their end-of-turn token" in sft.stdout
    sft_dir = tmp_path / "sft"  # trained on conversations: our chat template, saved
    result = run_reward(tmp_path, "--model", str(sft_dir), "--dataset", data, "--output-dir", "rm",
                        "--skip-invalid", "--max-steps", "2", "--batch-size", "2", "--val-size", "8",
                        "--precision", "fp32", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("Pairs: 2312 read from" in result.stdout and "left out: 9 malformed (--skip-invalid), 4 with an empty answer"
            in result.stdout and "longer than --max-length 512" in result.stdout)
    metrics = load_json(tmp_path / "rm" / "metrics.json")
    assert metrics["global_step"] == 2 and metrics["eval_pairs"] == 8 and metrics["eval_accuracy_before"] == 0.5
    report = load_json(tmp_path / "rm" / "run_config.json")["data_report"]
    assert report["malformed"] == 9 and report["empty"] == 4 and 0 < report["too_long"] < 100
    # The multi-turn dialogues were rendered with the SFT model's chat template, which the reward model keeps.
    from tuning.data.chat_template import own_chat_template
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "rm").chat_template
    assert saved == own_chat_template("seed")
    talk = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]
    (tmp_path / "talk.jsonl").write_text(json.dumps({"messages": talk}) + "\n")
    scored = run_reward(tmp_path, "--score", "--output-dir", "rm", "--prompts-file", "talk.jsonl")
    assert scored.returncode == 0 and "prompt: 'Name a color.'" in scored.stdout and "answer: 'Blue.'" in scored.stdout

    aligned = subprocess.run([sys.executable, str(ROOT / "align.py"), "--model", str(sft_dir), "--dataset", data,
                              "--skip-invalid", "--precision", "fp32", "--batch-size", "2", "--max-steps", "2",
                              "--val-size", "4", "--output-dir", "dpo"], cwd=tmp_path, env=ENV, capture_output=True,
                             text=True, timeout=600)
    assert aligned.returncode == 0, aligned.stderr[-3000:]
    assert load_json(tmp_path / "dpo" / "metrics.json")["global_step"] == 2
    assert load_json(tmp_path / "dpo" / "run_config.json")["data_report"]["malformed"] == 9
    assert AutoTokenizer.from_pretrained(tmp_path / "dpo").chat_template == own_chat_template("seed")


def test_torchrun_two_cpu_processes_score_every_held_out_pair_once(smoke_reward):
    work, _ = smoke_reward
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(ROOT / "reward.py"), "--smoke", "--max-steps", "3", "--output-dir", "rm-ddp"],
                            cwd=work, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = load_json(work / "rm-ddp" / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["global_step"] == 3
    assert metrics["eval_pairs"] == 200 and metrics["train_pairs"] == 3 * 32 * 2  # both processes counted


def test_help_lists_every_setting():
    from tuning import cli
    import reward

    result = run_reward(ROOT, "--help")
    assert result.returncode == 0
    for name, _, help_text in cli.constant_specs(reward):
        assert cli.flag_name(name) in result.stdout, name
    assert len(cli.constant_specs(reward)) == 33
