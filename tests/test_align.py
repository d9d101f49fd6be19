"""align.py: the tokens DPO and RLOO train on, our evaluation against TRL's own loss, the smoke proof that
both methods move the undecided task toward the preferred style while keeping the other tasks, the
evaluation of aligned against SFT, and the run layer's behaviour."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import datasetup
import model as model_lib
import preferences
import smoke
from conftest import ROOT, shared_path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_align(cwd, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "align.py"), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def load_json(path):
    with open(path) as handle:
        return json.load(handle)


def tiny_policy(tmp_path, tokenizer):
    """A saved tiny GPT-2 with the tokenizer's vocabulary (random weights: enough to check tokens and losses)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=1024,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    return model_lib.load_model(str(tmp_path / "policy"), "pretrained", tokenizer)


def dpo_trainer(tmp_path, tokenizer, pairs):
    from types import SimpleNamespace

    import aligntrainer

    policy = tiny_policy(tmp_path, tokenizer)
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), epochs=1.0, max_steps=2, lr=1e-3, warmup_ratio=0.0,
                           eval_steps=10, save_steps=10, logging_steps=1, seed=0, beta=0.1, method="dpo",
                           batch_size=len(pairs))
    config = aligntrainer.trl_config(args, torch.device("cpu"), "fp32")
    tokens, _ = preferences.tokenize_pairs(pairs, tokenizer, "seed", 1024)
    from datasets import Dataset

    data = {"train": Dataset.from_list(tokens), "validation": Dataset.from_list(tokens)}
    return aligntrainer.build_trainer(args, policy, tokenizer, config, data, None, [], None)


def real_pairs(count=4):
    records = json.loads(shared_path("data", "alpaca_5000.json").read_text())
    chosen = [records[0]] + [r for r in records if r["input"]][: count - 1]
    return chosen, [preferences.parse_pair({**r, "chosen": r["output"], "rejected": "I don't know."}) for r in chosen]


# ---------------------------------------------------------------- the tokens trained on, and the loss
def sequences_of(batch):
    """Each sequence of a PairCollator batch: (its token ids, its completion mask), read back from the layout."""
    out = []
    for i, (row, end) in enumerate(batch["score_index"].tolist()):
        start = end
        while start > 0 and batch["sequence"][row, start - 1] == i:
            start -= 1
        out.append((batch["input_ids"][row, start:end + 1].tolist(),
                    batch["completion"][row, start:end + 1].int().tolist()))
    return out


def test_dpo_trains_on_the_sft_tokens_of_a_real_record(tmp_path, gpt2_tokenizer):
    """The batches TRL's DPOTrainer trains on hold our tokenization (template, answer, EOS), not its own: each
    chosen sequence is SFT's example, and its completion mask is SFT's loss mask (the response and EOS)."""
    tok = model_lib.ready_tokenizer(gpt2_tokenizer)
    records, pairs = real_pairs()
    trainer = dpo_trainer(tmp_path, tok, pairs)
    batch = next(iter(trainer.get_train_dataloader()))
    chosen = sequences_of(batch)[0::2]
    assert batch["num_pairs"] == len(pairs) and "attention_mask" not in batch  # packed rows, no padding mask
    for record in records:
        sft = datasetup.tokenize_example(record, tok, "seed", 1024)
        assert (sft["input_ids"], [int(label != -100) for label in sft["labels"]]) in chosen, record["instruction"]
        assert sft["input_ids"][-1] == tok.eos_token_id


def test_packed_answer_log_probs_equal_padded_ones(tmp_path, gpt2_tokenizer):
    """Packing changes the layout, not the numbers: each answer's log-prob is the same padded, in packed rows,
    in one flat row, and alone."""
    import pairlogps

    tok = model_lib.ready_tokenizer(gpt2_tokenizer)
    _, pairs = real_pairs()
    tokens, _ = preferences.tokenize_pairs(pairs, tok, "seed", 1024)
    model = pairlogps.enable_sequence_logps(tiny_policy(tmp_path, tok)).eval()
    with torch.no_grad():
        logps = {mode: model(**pairlogps.model_inputs(pairlogps.PairCollator(tok.pad_token_id, mode)(tokens))).logits
                 for mode in ("none", "rows", "flat")}
        alone = torch.cat([model(**pairlogps.model_inputs(pairlogps.PairCollator(tok.pad_token_id, "rows")([p]))).logits
                           for p in tokens])
    for mode in ("rows", "flat"):
        torch.testing.assert_close(logps[mode], logps["none"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(alone, logps["none"], rtol=1e-5, atol=1e-4)
    assert pairlogps.packed_logps_match(model, tokens, tok.pad_token_id)[0]


def test_dpo_loss_equals_trls_loss_on_the_same_pairs(tmp_path, gpt2_tokenizer):
    """Our DPO loss, on packed pairs, equals TRL's own (its padded batches, its fused output layer) on identical
    pairs and reference log-probs; the held-out evaluation reports the same loss, and exactly ln 2 with 50%
    accuracy before training (the policy is the reference)."""
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tok = model_lib.ready_tokenizer(gpt2_tokenizer)
    _, pairs = real_pairs()
    trainer = dpo_trainer(tmp_path, tok, pairs)
    before = trainer.evaluate(metric_key_prefix="before")
    assert before["before_accuracy"] == 0.5 and before["before_loss"] == pytest.approx(math.log(2), abs=1e-12)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    ours = trainer.evaluate()
    examples = [trainer.eval_dataset[i] for i in range(len(pairs))]  # with the precomputed reference log-probs
    with torch.no_grad():
        packed = float(trainer.compute_loss(trainer.model, trainer.data_collator(examples)))
        theirs = float(DPOTrainer._compute_loss(trainer, trainer.model, DataCollatorForPreference(tok.pad_token_id)(
            examples), False))
    assert packed == pytest.approx(theirs, rel=1e-4) and ours["eval_loss"] == pytest.approx(theirs, rel=1e-4)
    assert theirs != pytest.approx(math.log(2), rel=1e-3)


def test_rloo_encodes_prompts_as_inference_does(tmp_path, gpt2_tokenizer):
    from types import SimpleNamespace

    from datasets import Dataset

    import aligntrainer
    from templates import format_prompt

    tok = model_lib.ready_tokenizer(gpt2_tokenizer)
    records, _ = real_pairs(2)
    prompts = [format_prompt(r, "seed") for r in records]
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), epochs=1.0, max_steps=1, lr=1e-5, warmup_ratio=0.0,
                           eval_steps=10, save_steps=10, logging_steps=1, seed=0, beta=0.0, method="rloo",
                           batch_size=2, num_generations=2, max_new_tokens=4, temperature=1.0)
    config = aligntrainer.trl_config(args, torch.device("cpu"), "fp32")
    data = Dataset.from_list([{"prompt": p, "judge_prompt": p} for p in prompts])

    def judge(completions=(), **kwargs):
        return [0.0] * len(completions)

    judge.score = lambda records, answers: [0.0] * len(answers)
    trainer = aligntrainer.build_trainer(args, tiny_policy(tmp_path, tok), tok, config,
                                         {"train": data, "validation": data}, judge, [], None)
    ids, _, _ = trainer._tokenize_prompts(prompts)
    for record, prompt_ids in zip(records, ids):
        sft = datasetup.tokenize_example(record, tok, "seed", 1024)
        assert prompt_ids == [t for t, label in zip(sft["input_ids"], sft["labels"]) if label == -100]


def test_a_nan_in_dpo_stops_the_run_before_the_optimizer_step(tmp_path, gpt2_tokenizer):
    from trainer import NonFiniteLoss

    _, pairs = real_pairs()
    trainer = dpo_trainer(tmp_path, model_lib.ready_tokenizer(gpt2_tokenizer), pairs)
    with torch.no_grad():
        trainer.model.transformer.h[0].mlp.c_fc.bias[0] = float("nan")  # after the reference pass
    with pytest.raises(NonFiniteLoss, match=r"became nan at step 1"):
        trainer.train()
    assert trainer.state.global_step == 0


# ---------------------------------------------------------------- the smoke proof, end to end
def answers_to_held_out(model_dir, held_out):
    """(polite greetings, greetings, right answers to the other tasks, other prompts) of greedy answers."""
    from inference import generate, load_for_generation
    from templates import format_prompt

    lm, tokenizer = load_for_generation(str(model_dir), torch.device("cpu"), "model")
    answers = generate(lm, tokenizer, [format_prompt(r, "seed") for r in held_out],
                       {"max_new_tokens": 32, "do_sample": False}, batch_size=50)
    greet = [a["text"] for r, a in zip(held_out, answers) if r["instruction"] == smoke.GREETING]
    other = [(r, a["text"]) for r, a in zip(held_out, answers) if r["instruction"] != smoke.GREETING]
    polite = sum(text == smoke.STYLES["polite"].format(names=r["input"]) for r, text in
                 ((r, a["text"]) for r, a in zip(held_out, answers) if r["instruction"] == smoke.GREETING))
    return polite, len(greet), sum(smoke.is_right(r, text) for r, text in other), len(other)


@pytest.mark.parametrize("method", ["dpo", "rloo"])
def test_smoke_alignment_prefers_the_polite_style_and_keeps_the_other_tasks(smoke_aligned, method):
    work, outputs = smoke_aligned
    held_out, _ = datasetup.held_out_records(str(work / "smoke-run" / "model"))
    sft = answers_to_held_out(work / "smoke-run" / "model", held_out)
    aligned = answers_to_held_out(work / "smoke-run" / f"aligned-{method}", held_out)
    assert sft[1] == aligned[1] >= 30 and sft[0] <= 0.7 * sft[1]  # undecided before: about half polite
    assert aligned[0] >= 0.9 * aligned[1], (method, sft, aligned)
    assert aligned[2] / aligned[3] >= sft[2] / sft[3] - 0.05, (method, sft, aligned)
    metrics = load_json(work / "smoke-run" / f"aligned-{method}" / "metrics.json")
    assert metrics["train_runtime_s"] < 180 and metrics["global_step"] == smoke.ALIGN_SETTINGS[method]["max_steps"]
    if method == "dpo":
        assert metrics["eval_accuracy_before"] == 0.5 and metrics["eval_mean_margin_before"] == 0
        assert metrics["eval_accuracy_after"] >= 0.9 and metrics["pairs_per_second"] > 0
        assert "Held-out preference accuracy 50.0% -> " in outputs[method]
    else:
        assert metrics["eval_mean_reward_after"] > metrics["eval_mean_reward_before"]
        assert metrics["eval_kl_before"] == pytest.approx(0, abs=1e-6) and metrics["eval_kl_after"] >= 0
        assert 0 < metrics["generation_share"] < 1 and metrics["seconds_per_step"] > 0
    for name in ("config.json", "model.safetensors", "sft_template.json", "before_after.png", "tokenizer.json"):
        assert (work / "smoke-run" / f"aligned-{method}" / name).exists(), name


@pytest.mark.parametrize("method", ["dpo", "rloo"])
def test_evaluation_of_aligned_against_sft_judged_by_the_reward_model(smoke_aligned, method):
    work, _ = smoke_aligned
    result = subprocess.run([sys.executable, str(ROOT / "evaluation.py"), "--base", "smoke-run/model", "--finetuned",
                             f"smoke-run/aligned-{method}", "--reward-model", "smoke-run/reward", "--num-generations",
                             "200", "--max-new-tokens", "32"], cwd=work, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = load_json(work / "smoke-run" / f"aligned-{method}" / "eval" / "report.json")
    assert report["win_rate"] > 0.5 and report["finetuned"]["mean_reward"] > report["base"]["mean_reward"]
    assert report["dataset"] == "smoke-run/data.json"  # the SFT run's held-out instructions
    markdown = (work / "smoke-run" / f"aligned-{method}" / "eval" / "report.md").read_text()
    assert "| metric | better | SFT | aligned | aligned better? |" in markdown
    assert "Win rate of the aligned model over the SFT" in markdown


def test_inference_compares_sft_and_aligned_side_by_side(smoke_aligned):
    work, _ = smoke_aligned
    result = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--base", "smoke-run/model", "--finetuned",
                             "smoke-run/aligned-dpo", "--prompt", smoke.GREETING, "--input", "cat dog owl"], cwd=work,
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Hello, cat dog owl!" in result.stdout


# ---------------------------------------------------------------- the run layer
def start_align_until(work, args, output_dir, checkpoint):
    proc = subprocess.Popen([sys.executable, str(ROOT / "align.py"), *args], cwd=work, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = work / output_dir / f"checkpoint-{checkpoint}" / "trainer_state.json"
    for _ in range(2400):
        if state.exists() or proc.poll() is not None:
            break
        subprocess.run(["sleep", "0.05"])
    assert proc.poll() is None, f"the run ended before {state} appeared: {proc.stdout.read()[-3000:]}"
    return proc


def test_dpo_run_resumes_after_sigterm_and_kill_9_and_refuses_another_run(smoke_aligned):
    work, _ = smoke_aligned
    args = ["--smoke", "--max-steps", "60", "--save-steps", "20", "--output-dir", "dpo-resume"]
    proc = start_align_until(work, args, "dpo-resume", 20)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143 and "Run the same command to continue" in output, output[-3000:]
    other = run_align(work, *args, "--beta", "0.5")
    assert other.returncode == 2 and "holds a different run" in other.stderr
    proc = start_align_until(work, args, "dpo-resume", 40)
    proc.kill()  # kill -9: no handler runs
    proc.communicate(timeout=60)
    resumed = run_align(work, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from dpo-resume/checkpoint-" in resumed.stdout
    metrics = load_json(work / "dpo-resume" / "metrics.json")
    per_epoch = math.ceil(1800 / 32)  # 1800 training pairs, the last batch of an epoch short
    assert metrics["global_step"] == 60 and metrics["train_pairs"] == 1800 + (60 - per_epoch) * 32
    assert metrics["eval_accuracy_before"] == 0.5  # kept from the first session


def test_no_run_overwrites_another_scripts_output(smoke_aligned):
    work, _ = smoke_aligned
    same = run_align(work, "--smoke", "--output-dir", "smoke-run/model")
    assert same.returncode == 2 and "is the --model directory" in same.stderr
    into_rm = run_align(work, "--smoke", "--output-dir", "smoke-run/reward", "--no-resume")
    assert into_rm.returncode == 2 and "holds a run of reward.py" in into_rm.stderr
    assert (work / "smoke-run" / "reward" / "metrics.json").exists()
    not_rm = run_align(work, "--smoke", "--method", "rloo", "--model", "smoke-run/model")
    assert not_rm.returncode == 2 and "--smoke brings its own models and data" in not_rm.stderr
    wrong = run_align(work, "--model", "smoke-run/model", "--dataset", "smoke-run/pairs.json", "--method", "rloo",
                      "--reward-model", "smoke-run/model", "--output-dir", "x")
    assert wrong.returncode == 2 and "not a reward model" in wrong.stderr and "Traceback" not in wrong.stderr
    long = run_align(work, "--smoke", "--max-length", "1000", "--output-dir", "too-long")
    assert long.returncode == 2 and "--max-length (1000) is more than the 256 positions" in long.stderr


def test_torchrun_two_cpu_processes_count_every_pair_and_prompt_once(smoke_aligned):
    work, _ = smoke_aligned
    for method, count in (("dpo", "train_pairs"), ("rloo", "train_completions")):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 str(ROOT / "align.py"), "--smoke", "--method", method, "--max-steps", "3",
                                 "--output-dir", f"ddp-{method}"], cwd=work, env=ENV, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = load_json(work / f"ddp-{method}" / "metrics.json")
        assert metrics["world_size"] == 2 and metrics["global_step"] == 3
        assert metrics[count] == 3 * 32 * 2  # both processes counted: 32 pairs, or 8 prompts x 4 answers, each
        if method == "dpo":  # the reference pass and the evaluation shard the pairs alike: margins exactly 0 before
            assert metrics["eval_pairs"] == 200 and metrics["eval_accuracy_before"] == 0.5
        else:
            assert metrics["eval_prompts"] == 200 and metrics["eval_kl_before"] == 0


@pytest.mark.parametrize("args,expected", [
    ([], "--model distilgpt2-alpaca: no SFT model there. Run `python train.py` first"),
    (["--method", "rloo"], "--method rloo needs --reward-model DIR"),
    (["--reward-model", "rm"], "--reward-model: only used with --method rloo"),
    (["--method", "rloo", "--reward-model", "rm", "--num-generations", "1", "--temperature", "0"],
     "--num-generations must be >= 2"),
    (["--batch-size", "0", "--lr", "0", "--beta", "-2"], "--lr must be > 0, or -1"),
    (["--smoke"], "run `python train.py --smoke` first"),
])
def test_bad_settings_are_refused_naming_the_flag(tmp_path, args, expected):
    result = run_align(tmp_path, *args)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_help_lists_every_setting():
    import align
    import cli

    result = run_align(ROOT, "--help")
    assert result.returncode == 0
    for name, _, _ in cli.constant_specs(align):
        assert cli.flag_name(name) in result.stdout, name
    assert len(cli.constant_specs(align)) == 26
