"""LoRA (tuning/models/lora.py, train.py --lora): the layers adapted, the same loss under peft, packing and gradient
checkpointing, adapter dirs wherever a model dir goes, --merge, and resume after kill -9."""

import json
import subprocess
import sys

import pytest
import torch

from tuning.data import sft
from tuning.models import lora
from tuning.models import loading, response_logits
from tuning import rundir
from tuning.models import scoring
from tuning import smoke
from tuning.data.collate import SFTCollator
from conftest import ROOT, shared_path
from test_train import ENV, load_json, run_train, start_train, wait_for


def tiny(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_layer=2, n_head=2, n_embd=32, n_positions=1024,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_auto_targets_every_linear_layer_of_the_blocks_and_a_bad_name_lists_them():
    assert lora.resolve_targets(tiny("gpt2")) == ["c_attn", "c_fc", "c_proj"]  # GPT-2's Conv1D layers
    assert lora.resolve_targets(tiny("llama")) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                   "v_proj"]
    assert lora.resolve_targets(tiny("llama"), "q_proj, v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(lora.LoraError, match=r"--lora-target 'q_proj,c_fc': no layer named q_proj; "
                                             r"GPT2LMHeadModel's linear layers are c_attn, c_fc, c_proj"):
        lora.resolve_targets(tiny("gpt2"), "q_proj,c_fc")


def test_fresh_adapters_change_nothing_and_train_only_themselves_or_the_reward_head():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = tiny("gpt2").eval()
    ids = torch.randint(0, 50257, (2, 9))
    before = model(ids).logits
    wrapped = lora.add_lora(model, "base-dir", 4, 8.0, 0.0, seed=0).eval()
    torch.testing.assert_close(wrapped(ids).logits, before)
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert wrapped.peft_config["default"].base_model_name_or_path == "base-dir"
    # 2 blocks x (c_attn 32->96, attn c_proj 32->32, c_fc 32->128, mlp c_proj 128->32), rank 4
    assert lora.parameter_counts(wrapped)[0] == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    reward = GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_layer=1, n_head=2, n_embd=32, num_labels=1,
                                                      pad_token_id=0))
    wrapped = lora.add_lora(reward, "sft-dir", 4, 8.0, 0.0, reward_head=True, seed=0)
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert any("score" in name and "lora" not in name for name in trainable)  # the scalar head, in full


def test_lora_keeps_response_only_logits_and_packing_with_the_same_loss_under_checkpointing(gpt2_tokenizer):
    """The model's own padded loss equals the loss of the path train.py --lora --gradient-checkpointing runs:
    response-only logits, packed rows, a peft model, activations recomputed; and the adapters get gradients."""
    tok = loading.ready_tokenizer(gpt2_tokenizer)
    records = json.loads(shared_path("data", "alpaca_5000.json").read_text())[:6]
    examples = [sft.tokenize_example(r, tok, "seed", 256) for r in records]
    model = tiny("gpt2")
    model.loss_type, model.config.use_cache = "ForCausalLM", False  # as train.py sets them
    with torch.no_grad():
        own = float(model(**SFTCollator(tok.pad_token_id, "none")(examples)).loss)
    packed = SFTCollator(tok.pad_token_id, "rows")(examples)
    assert response_logits.enable_response_only_logits(model, packed)
    wrapped = lora.add_lora(model, "base", 4, 8.0, 0.0, seed=0)
    model.activation_checkpointing_enable()
    wrapped.train()
    assert model.transformer.gradient_checkpointing
    inputs = {k: v for k, v in packed.items() if k != "num_real_tokens"}
    loss = wrapped(**inputs).loss
    assert loss.item() == pytest.approx(own, rel=1e-5)
    loss.backward()
    grads = [p.grad for name, p in wrapped.named_parameters() if ".lora_B." in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for name, p in wrapped.named_parameters() if "lora" not in name)


def held_out_exact_match(model_dir, records) -> float:
    from tuning.generation.generate import generate, load_for_generation
    from tuning.data.templates import format_prompt

    lm, tokenizer = load_for_generation(str(model_dir), torch.device("cpu"), "model")
    answers = generate(lm, tokenizer, [format_prompt(r, "seed") for r in records],
                       {"max_new_tokens": 16, "do_sample": False}, batch_size=100)
    return sum(smoke.is_right(r, a["text"]) for r, a in zip(records, answers)) / len(records)


def test_lora_teaches_the_smoke_sft_model_a_new_task_and_keeps_the_old_ones(smoke_trained, smoke_lora):
    """`train.py --smoke --lora`: adapters on the smoke SFT model learn a task its data never had ("Give the
    first word.") to >= 90% exact match on held-out prompts, while the old tasks stay within 5 points."""
    assert "trainable of" in smoke_lora and "(LoRA)" in smoke_lora
    assert "; the merged full weights in smoke-run/lora/merged/" in smoke_lora  # (--merge: where they went)
    out, sft = smoke_trained / "smoke-run" / "lora", smoke_trained / "smoke-run" / "model"
    new = [r for r in rundir.read_records(str(out / rundir.HELD_OUT_FILE)) if r["instruction"] == smoke.NEW_TASK]
    old = [r for r in rundir.read_records(str(sft / rundir.HELD_OUT_FILE)) if r["instruction"] != smoke.GREETING]
    assert len(new) >= 100 and held_out_exact_match(sft, new) == 0
    assert held_out_exact_match(out, new) >= 0.9
    assert held_out_exact_match(out, old) >= held_out_exact_match(sft, old) - 0.05
    assert load_json(out / "metrics.json")["train_runtime_s"] < 180


def test_a_lora_run_saves_the_adapter_merges_and_loads_wherever_a_model_dir_goes(smoke_trained, smoke_lora):
    out = smoke_trained / "smoke-run" / "lora"
    for name in ("adapter_model.safetensors", "adapter_config.json", "sft_template.json", "metrics.json",
                 "merged/model.safetensors", "merged/config.json", "merged/sft_template.json"):
        assert (out / name).exists(), name
    assert not (out / "model.safetensors").exists()
    config = load_json(out / "adapter_config.json")
    assert config["base_model_name_or_path"] == str(smoke_trained / "smoke-run" / "model") and config["r"] == 16
    tok = loading.load_tokenizer(str(out))
    adapter, merged = loading.load_model(str(out), tokenizer=tok), loading.load_model(str(out / "merged"))
    ids = torch.tensor([tok("Give the first word.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(adapter.eval()(ids).logits, merged.eval()(ids).logits)
        body = scoring.reward_model_from(str(out)).base_model  # reward.py --model ADAPTER_DIR: the merged body
        torch.testing.assert_close(body(ids).last_hidden_state, merged.base_model(ids).last_hidden_state)
    answers = [subprocess.run([sys.executable, str(ROOT / "inference.py"), "--finetuned", path, "--prompt",
                               smoke.NEW_TASK, "--input", "cat dog owl", "--json", "--only", "finetuned"],
                              cwd=smoke_trained, env=ENV, capture_output=True, text=True, timeout=120)
               for path in (str(out), str(out / "merged"))]
    assert all(a.returncode == 0 for a in answers), answers[0].stderr[-2000:]
    assert answers[0].stdout == answers[1].stdout and '"text": "cat"' in answers[0].stdout
    # evaluation.py on the adapter dir: the held-out split of its run, and the loss the run reported
    report = subprocess.run([sys.executable, str(ROOT / "evaluation.py"), "--finetuned", str(out), "--base",
                             str(smoke_trained / "smoke-run" / "model"), "--num-generations", "20",
                             "--max-new-tokens", "16"], cwd=smoke_trained, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    scores = load_json(out / "eval" / "report.json")
    assert scores["finetuned"]["response_loss"] == pytest.approx(load_json(out / "metrics.json")["eval_loss_after"],
                                                                 rel=1e-3)
    assert scores["finetuned"]["rouge_l_f1"] > scores["base"]["rouge_l_f1"]


def test_gradient_checkpointing_trains_the_same_steps(smoke_trained):
    args = ["--smoke", "--lora", "--max-steps", "6", "--eval-steps", "1000", "--logging-steps", "2"]
    runs = [run_train(smoke_trained, *args, *extra, "--output-dir", name)
            for name, extra in (("lora-plain", []), ("lora-gc", ["--gradient-checkpointing"]))]
    assert all(r.returncode == 0 for r in runs), runs[1].stderr[-3000:]
    losses = [load_json(smoke_trained / name / "metrics.json")["train_loss"] for name in ("lora-plain", "lora-gc")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_a_lora_run_resumes_after_kill_9(smoke_trained):
    out = smoke_trained / "lora-killed"
    args = ["--smoke", "--lora", "--max-steps", "12", "--save-steps", "4", "--eval-steps", "1000", "--output-dir",
            str(out)]
    proc = start_train(smoke_trained, *args)
    wait_for(out / "checkpoint-4" / "trainer_state.json", proc)
    proc.kill()
    proc.wait()
    assert (out / "checkpoint-4" / "adapter_model.safetensors").exists()
    resumed = run_train(smoke_trained, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout and load_json(out / "metrics.json")["global_step"] == 12


def start(cwd, script, *args):
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(cwd, script, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("script,extra", [("reward.py", ["--lr", "1e-3"]), ("align.py", ["--lr", "1e-4"])])
def test_reward_and_align_lora_with_checkpointing_resume_after_kill_9_to_the_same_model(smoke_trained, script,
                                                                                         extra):
    """reward.py and align.py (DPO) with --lora --gradient-checkpointing: killed with kill -9 after their first
    checkpoint, the same command resumes from it and ends where an uninterrupted run without checkpointing
    does (same held-out loss; dropout is off in both scripts, so the steps are deterministic)."""
    args = ["--smoke", "--lora", *extra, "--max-steps", "8", "--save-steps", "4", "--eval-steps", "1000"]
    out = smoke_trained / f"{script[:-3]}-lora-killed"
    proc = start(smoke_trained, script, *args, "--gradient-checkpointing", "--output-dir", str(out))
    wait_for(out / "checkpoint-4" / "trainer_state.json", proc, timeout=240)
    proc.kill()
    proc.wait()
    assert (out / "checkpoint-4" / "adapter_model.safetensors").exists()
    resumed = run(smoke_trained, script, *args, "--gradient-checkpointing", "--output-dir", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout and (out / "adapter_model.safetensors").exists()
    plain = run(smoke_trained, script, *args, "--output-dir", str(out) + "-plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    metrics = [load_json(path / "metrics.json") for path in (out, smoke_trained / (out.name + "-plain"))]
    assert metrics[0]["global_step"] == metrics[1]["global_step"] == 8
    assert metrics[0]["eval_loss_after"] == pytest.approx(metrics[1]["eval_loss_after"], rel=1e-4)
    assert metrics[0]["eval_loss_after"] != metrics[0]["eval_loss_before"]


def test_lora_under_torchrun_trains_and_saves_one_adapter(smoke_trained):
    """DDP with peft: two CPU processes train the adapters and the main one saves them once."""
    out = smoke_trained / "lora-ddp"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(ROOT / "train.py"), "--smoke", "--lora", "--max-steps", "4", "--save-steps", "2",
                             "--eval-steps", "1000", "--output-dir", str(out)], cwd=smoke_trained, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = load_json(out / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["global_step"] == 4
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert (out / "checkpoint-4" / "adapter_model.safetensors").exists() and (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("args,expected", [
    (["--merge"], "--merge: only with --lora"),
    (["--lora", "--lora-r", "0", "--lora-dropout", "1"], "--lora-r must be >= 1 (got 0)"),
    (["--lora", "--init", "scratch"], "--lora with --init scratch"),
    (["--smoke", "--lora", "--lora-target", "q_proj", "--output-dir", "x"], "no layer named q_proj"),
])
def test_bad_lora_settings_are_refused_naming_the_flag(smoke_trained, args, expected):
    result = run_train(smoke_trained, *args)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_a_lora_reward_model_trains_its_score_head_and_loads_as_its_merged_copy(smoke_trained):
    """reward.py --lora: adapters on the SFT body plus the score head in full; the adapter dir scores exactly
    as the merged model that --merge writes (load_reward_model takes either, so align.py's judge does too)."""
    from tuning.data.templates import format_prompt

    result = subprocess.run([sys.executable, str(ROOT / "reward.py"), "--smoke", "--lora", "--merge", "--lr", "1e-3",
                             "--max-steps", "10", "--output-dir", "rm-lora"], cwd=smoke_trained, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(LoRA adapters and the score head)" in result.stdout
    out = smoke_trained / "rm-lora"
    metrics = load_json(out / "metrics.json")
    assert metrics["eval_accuracy_before"] == 0.5 and metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert load_json(out / "adapter_config.json")["task_type"] == "SEQ_CLS"
    adapter, merged = scoring.load_reward_model(str(out)), scoring.load_reward_model(str(out / "merged"))
    prompts = [format_prompt({"instruction": smoke.GREETING, "input": "cat dog"}, adapter[2])] * 2
    scores = [scoring.score_texts(rm, tok, prompts, ["Hello, cat dog!", "hey cat dog"]) for rm, tok, _ in (adapter, merged)]
    assert scores[0] == pytest.approx(scores[1], abs=1e-5) and scores[0][0] != scores[0][1]
    # Hugging Face's own forward (the last token that is not pad_token_id) reads the score where reward.py does: on
    # the merged model (no pad id) given prompt + answer, on the adapter dir (its base, the SFT model, has pad =
    # EOS) given prompt + answer, with or without the EOS.
    from transformers import AutoModelForSequenceClassification

    ids = scoring.answer_ids(adapter[1], prompts[0], "Hello, cat dog!")
    for path, inputs in ((out / "merged", [ids[:-1]]), (out, [ids[:-1], ids])):
        hf = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1).eval()
        for sequence in inputs:  # (the adapter's base config has no num_labels: 1 is given)
            with torch.no_grad():
                assert float(hf(torch.tensor([sequence])).logits[0, 0]) == pytest.approx(scores[0][0], abs=1e-5), path
    assert load_json(out / "merged" / "config.json")["pad_token_id"] is None


def test_an_adapter_dir_that_cannot_serve_is_refused_in_one_line(tmp_path):
    """A reward model's adapter where a causal LM goes, a causal LM's adapter where a reward model goes, and an
    adapter whose base model was moved: each a message that says what to do."""
    def adapter(name, task, base):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"task_type": task,
                                                                          "base_model_name_or_path": base}))
        return str(tmp_path / name)

    with pytest.raises(loading.ModelError, match=r"holds a reward model's LoRA adapter \(reward.py --lora\), not a"):
        loading.load_model(adapter("rm", "SEQ_CLS", str(tmp_path)))
    with pytest.raises(lora.LoraError, match=r"was trained on /nowhere/sft, which is not there any more: put that"):
        loading.load_model(adapter("moved", "CAUSAL_LM", "/nowhere/sft"))
    with pytest.raises(lora.LoraError, match="which is not there any more"):
        lora.load_config(str(tmp_path / "moved"))
    with pytest.raises(scoring.UserError, match=r"no reward model there \(config.json missing\). It holds a causal LM's"):
        scoring.load_reward_model(adapter("sft", "CAUSAL_LM", str(tmp_path)))


def test_memory_benchmark_estimate_and_verdicts():
    """benchmarks/memory.py: full fine-tuning's need extrapolated per layer from the cut rows, and the two
    targets judged on the figures (a skipped full row is compared through its estimate)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory

    cut = [{"mode": "full@4", "peak_mb": 2600.0}, {"mode": "full@2", "peak_mb": 2100.0}]
    assert memory.full_estimate_mb(cut, 6) == 3100.0
    row = dict(trainable=10, total=1000, tokens_per_s=100.0, mean_loss=1.0, peak_mb=0.0)
    results = [{**row, "model": "llama-1b", "mode": "lora_gc", "peak_mb": 3600.0},
               memory.not_run("llama-1b", {"total": 1010, "trainable": 10}, 10000.0, "needs about 10,000, over 24 GiB"),
               {**row, "model": "distilgpt2", "mode": "full", "peak_mb": 3000.0, "tokens_per_s": 100.0},
               {**row, "model": "distilgpt2", "mode": "lora", "tokens_per_s": 99.0}]
    table = memory.summarize(results, {"distilgpt2": 2900.0, "llama-1b": 10000.0})
    assert "| llama-1b | full fine-tuning | 1,000 of 1,000 (100.00%) | not run: needs about 10,000, over 24 GiB | - | - |" in table
    assert "full fine-tuning (estimated) (target <= 35%): 36% FAIL" in table
    assert "LoRA real tokens/s vs full fine-tuning (target >= 1.0x): 0.99x FAIL" in table
    assert "distilgpt2: full fine-tuning's estimate (extrapolated from 2 and 4 layers) was 2,900 MiB; measured 3,000 MiB" in table
