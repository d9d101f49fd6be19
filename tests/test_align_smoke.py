"""align.py end to end on the smoke preset: both methods move the undecided task toward the preferred style
while keeping the other tasks, the evaluation of aligned against SFT, and the run layer's behaviour."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from tuning.data import records
from tuning import smoke
from conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_align(cwd, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "align.py"), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def load_json(path):
    with open(path) as handle:
        return json.load(handle)


# ---------------------------------------------------------------- the smoke proof, end to end
def answers_to_held_out(model_dir, held_out):
    """(polite greetings, greetings, right answers to the other tasks, other prompts) of greedy answers."""
    from tuning.generation.generate import generate, load_for_generation
    from tuning.data.templates import format_prompt

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
    held_out, _ = records.held_out_records(str(work / "smoke-run" / "model"))
    sft = answers_to_held_out(work / "smoke-run" / "model", held_out)
    aligned = answers_to_held_out(work / "smoke-run" / f"aligned-{method}", held_out)
    assert sft[1] == aligned[1] >= 20 and sft[0] <= 0.7 * sft[1]  # undecided before: about half polite
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
        assert metrics["eval_kl_before"] == 0 and metrics["eval_kl_after"] > 0
        assert metrics["eval_truncated_before"] <= 0.1 and metrics["eval_truncated_after"] <= 0.1
        assert "cut at --max-new-tokens); KL to the SFT model" in outputs[method]
        assert 0 < metrics["generation_share"] < 1 and metrics["seconds_per_step"] > 0
        assert set(metrics["phase_seconds"]) == {"sampling", "rewards", "reference", "update"}
        assert sum(metrics["phase_seconds"].values()) <= metrics["train_runtime_s"]
        assert metrics["generation_share"] == metrics["phase_shares"]["sampling"]
        assert metrics["generated_tokens_per_second"] > 0 and "\nTime in the steps: " in outputs[method]
    config = load_json(work / "smoke-run" / f"aligned-{method}" / "run_config.json")
    assert config["sft_model"] == str(work / "smoke-run" / "model")  # absolute: found from any working dir
    for name in ("config.json", "model.safetensors", "sft_template.json", "before_after.png", "tokenizer.json"):
        assert (work / "smoke-run" / f"aligned-{method}" / name).exists(), name


@pytest.mark.parametrize("method", ["dpo", "rloo"])
def test_evaluation_of_aligned_against_sft_judged_by_the_reward_model(smoke_aligned, method):
    """The report compares the two stages; --base defaults to the SFT model the aligned one started from."""
    work, _ = smoke_aligned
    base = ["--base", "smoke-run/model"] if method == "rloo" else []
    result = subprocess.run([sys.executable, str(ROOT / "evaluation.py"), *base, "--finetuned",
                             f"smoke-run/aligned-{method}", "--reward-model", "smoke-run/reward", "--num-generations",
                             "200", "--max-new-tokens", "32"], cwd=work, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = load_json(work / "smoke-run" / f"aligned-{method}" / "eval" / "report.json")
    assert report["win_rate"] > 0.5 and report["finetuned"]["mean_reward"] > report["base"]["mean_reward"]
    assert os.path.realpath(os.path.join(work, report["base_model"])) == str(work / "smoke-run" / "model")
    assert report["dataset"] == "smoke-run/data.json"  # the SFT run's held-out instructions
    markdown = (work / "smoke-run" / f"aligned-{method}" / "eval" / "report.md").read_text()
    assert "| metric | better | SFT | aligned | aligned - SFT (95% interval) | aligned better? |" in markdown
    assert "Win rate of the aligned model over the SFT" in markdown


def test_an_aligned_model_against_another_base_is_not_labelled_sft(smoke_aligned):
    work, _ = smoke_aligned
    result = subprocess.run([sys.executable, str(ROOT / "evaluation.py"), "--base", "smoke-run/base", "--finetuned",
                             "smoke-run/aligned-dpo", "--num-generations", "8", "--limit", "8", "--max-new-tokens", "8",
                             "--output-dir", "eval-vs-base"], cwd=work, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "labels" not in load_json(work / "eval-vs-base" / "report.json")
    assert "| metric | better | base | fine-tuned |" in (work / "eval-vs-base" / "report.md").read_text()


def test_an_aligned_runs_split_is_its_sft_models_also_rebuilt_from_the_data(smoke_aligned):
    work, _ = smoke_aligned
    saved, _ = records.held_out_records(str(work / "smoke-run" / "aligned-dpo"))
    rebuilt, config = records.held_out_records(str(work / "smoke-run" / "aligned-dpo"),
                                                 str(work / "smoke-run" / "data.json"))
    assert rebuilt == saved == records.held_out_records(str(work / "smoke-run" / "model"))[0]
    assert config["command"].startswith("python train.py")


def test_the_judge_scores_answers_as_decoded_and_penalizes_cut_ones(smoke_aligned):
    """RLOO's reward: the reward model's score of the answer exactly as decoded (HH answers keep their leading
    space), minus --missing-eos-penalty for an answer that has no stop token (cut at --max-new-tokens)."""
    from tuning.preference import align_trainers
    from tuning.models.scoring import score_texts

    work, _ = smoke_aligned
    judge = align_trainers.Judge(str(work / "smoke-run" / "reward"), torch.device("cpu"), missing_eos_penalty=1.5)
    eos = judge.stop_ids = [judge.tokenizer.eos_token_id]
    prompt = smoke.GREETING + "\n\ncat dog owl"
    answers = [" Hello, cat dog owl!", " Hello, cat dog owl!"]
    plain = score_texts(judge.model, judge.tokenizer, [prompt] * 2, answers)
    assert plain != score_texts(judge.model, judge.tokenizer, [prompt] * 2, [a.strip() for a in answers])
    rewards = judge(completions=answers, judge_prompt=[prompt] * 2, completion_ids=[[10, *eos], [10, 11]])
    assert rewards == pytest.approx([plain[0], plain[1] - 1.5], rel=1e-5)  # (shared prompt: fp32 rounding apart)


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


def refused_here(work, monkeypatch, capsys, *argv) -> str:
    """align.py run in this process (no interpreter start-up) as its __main__ runs it, refused: its one line."""
    import align
    from tuning.runs import runner

    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["align.py", *argv])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            runner.run_script(align, align.validate_args, align.run)
    finally:
        signal.signal(signal.SIGTERM, handler)  # (run_script's, until training starts)
        for handle in filter(None, runner._locks):  # the output dirs' locks, held for the process's life in a script
            handle.close()
        runner._locks.clear()
        runner._made.clear()
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in error, error[-3000:]
    return error


def test_no_run_overwrites_another_scripts_output(smoke_aligned, monkeypatch, capsys):
    work, _ = smoke_aligned
    refused = lambda *argv: refused_here(work, monkeypatch, capsys, *argv)  # noqa: E731
    assert "is the --model directory" in refused("--smoke", "--output-dir", "smoke-run/model")
    assert "holds a run of reward.py" in refused("--smoke", "--output-dir", "smoke-run/reward", "--no-resume")
    assert (work / "smoke-run" / "reward" / "metrics.json").exists()
    assert "--smoke brings its own models and data" in refused("--smoke", "--method", "rloo", "--reward-model",
                                                               "smoke-run/model")
    assert "name the new run's --output-dir" in refused("--smoke", "--method", "rloo", "--dataset",
                                                        "smoke-run/pairs.json")
    assert "--model smoke-run/reward is a reward model" in refused("--model", "smoke-run/reward", "--dataset",
                                                                   "smoke-run/pairs.json", "--output-dir", "x")
    assert "not a reward model" in refused("--model", "smoke-run/model", "--dataset", "smoke-run/pairs.json", "--method",
                                           "rloo", "--reward-model", "smoke-run/model", "--output-dir", "x")
    assert "--max-length 1000 is more than the 256 positions" in refused("--smoke", "--max-length", "1000",
                                                                         "--output-dir", "too-long")
    assert ("--max-length 240 + --max-new-tokens 24 is more than the 256 positions of smoke-run/model; use "
            "--max-length 232 or less") in refused("--smoke", "--method", "rloo", "--max-length", "240",
                                                    "--output-dir", "too-long")


def test_torchrun_two_cpu_processes_count_every_pair_and_prompt_once(smoke_aligned):
    work, _ = smoke_aligned
    for method, count in (("dpo", "train_pairs"), ("rloo", "train_completions"), ("grpo", "train_completions")):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 str(ROOT / "align.py"), "--smoke", "--method", method, "--max-steps", "3",
                                 "--val-size", "16", "--output-dir", f"ddp-{method}"], cwd=work, env=ENV,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = load_json(work / f"ddp-{method}" / "metrics.json")
        assert metrics["world_size"] == 2 and metrics["global_step"] == 3
        assert metrics[count] == 3 * 32 * 2  # both processes counted: 32 pairs, or 8 prompts x 4 answers, each
        if method == "dpo":  # the reference pass and the evaluation shard the pairs alike: margins exactly 0 before
            assert metrics["eval_pairs"] == 16 and metrics["eval_accuracy_before"] == 0.5
        else:
            assert metrics["eval_prompts"] == 16 and metrics["eval_kl_before"] == 0


@pytest.mark.parametrize("args,expected", [
    ([], "--model distilgpt2-alpaca: no SFT model there. Run `python train.py` first"),
    (["--method", "rloo"], "--method rloo with --reward model needs --reward-model DIR"),
    (["--reward-model", "rm"], "--reward-model: only used with --method rloo"),
    (["--method", "rloo", "--reward-model", "rm", "--num-generations", "1", "--temperature", "0"],
     "--num-generations must be >= 2"),
    (["--batch-size", "0", "--lr", "0", "--beta", "-2"], "--lr must be > 0, or -1"),
    (["--missing-eos-penalty", "-1"], "--missing-eos-penalty must be >= 0 (got -1)"),
    (["--smoke"], "run `python train.py --smoke` first"),
    (["--vllm"], "--vllm: only used with --method rloo or grpo"),
    (["--method", "grpo", "--reward", "exact", "--vllm"],
     "--vllm needs a CUDA GPU (this run's device is cpu) and the vllm package (pip install vllm); leave --vllm out"),
])
def test_bad_settings_are_refused_naming_the_flag(tmp_path, monkeypatch, capsys, args, expected):
    assert expected in refused_here(tmp_path, monkeypatch, capsys, *args)


def test_help_lists_every_setting():
    import align
    from tuning import cli

    result = run_align(ROOT, "--help")
    assert result.returncode == 0
    for name, _, _ in cli.constant_specs(align):
        assert cli.flag_name(name) in result.stdout, name
    assert len(cli.constant_specs(align)) == 39


def test_lora_alignment_uses_the_sft_model_without_adapters_as_reference(smoke_aligned, smoke_lora_dpo):
    """--lora: only adapters train, the reference is the same model with them off (so every held-out margin is
    0 and the KL 0 before training), and the output dir is an adapter dir that inference.py loads."""
    work, _ = smoke_aligned
    assert "(LoRA: the reference is the SFT model, adapters off)" in smoke_lora_dpo
    out = work / "smoke-run" / "aligned-dpo-lora"
    metrics = load_json(out / "metrics.json")
    assert metrics["eval_accuracy_before"] == 0.5 and metrics["eval_accuracy_after"] > 0.5
    assert (out / "adapter_model.safetensors").exists() and not (out / "ref").exists()
    assert (out / "merged" / "model.safetensors").exists()
    assert load_json(out / "adapter_config.json")["base_model_name_or_path"] == str(work / "smoke-run" / "model")
    answers = [subprocess.run([sys.executable, str(ROOT / "inference.py"), "--finetuned", str(path), "--only",
                               "finetuned", "--prompt", smoke.GREETING, "--input", "cat dog owl", "--json"], cwd=work,
                              env=ENV, capture_output=True, text=True, timeout=120) for path in (out, out / "merged")]
    assert answers[0].returncode == 0 and answers[0].stdout == answers[1].stdout, answers[0].stderr[-2000:]
    rloo = run_align(work, "--smoke", "--method", "rloo", "--lora", "--max-steps", "3", "--val-size", "8",
                     "--output-dir", "lora-rloo")
    assert rloo.returncode == 0, rloo.stderr[-3000:]
    assert load_json(work / "lora-rloo" / "metrics.json")["eval_kl_before"] == 0
    assert (work / "lora-rloo" / "adapter_model.safetensors").exists() and not (work / "lora-rloo" / "ref").exists()
    # GRPO with a verifiable reward (the pairs' chosen answers as references), under LoRA.
    grpo = run_align(work, "--smoke", "--method", "grpo", "--reward", "exact", "--lora", "--max-steps", "3",
                     "--val-size", "8", "--output-dir", "lora-grpo")
    assert grpo.returncode == 0, grpo.stderr[-3000:]
    metrics = load_json(work / "lora-grpo" / "metrics.json")
    assert metrics["global_step"] == 3 and metrics["eval_kl_before"] == 0 and metrics["train_completions"] == 3 * 32
    assert (work / "lora-grpo" / "adapter_model.safetensors").exists() and not (work / "lora-grpo" / "ref").exists()
