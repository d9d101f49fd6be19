"""LoRA (lora.py, train.py --lora): the layers adapted, the same loss under peft, packing and gradient
checkpointing, adapter dirs wherever a model dir goes, --merge, and resume after kill -9."""

import json

import pytest
import torch

import datasetup
import lora
import model as model_lib
from collate import SFTCollator
from conftest import shared_path
from test_train import ENV, FAST, load_json, run_train, start_train, wait_for, workdir  # noqa: F401  (fixture)


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
    wrapped = lora.add_lora(model, "base-dir", 4, 8.0, 0.0).eval()
    torch.testing.assert_close(wrapped(ids).logits, before)
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert wrapped.peft_config["default"].base_model_name_or_path == "base-dir"
    # 2 blocks x (c_attn 32->96, attn c_proj 32->32, c_fc 32->128, mlp c_proj 128->32), rank 4
    assert lora.parameter_counts(wrapped)[0] == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    reward = GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_layer=1, n_head=2, n_embd=32, num_labels=1,
                                                      pad_token_id=0))
    wrapped = lora.add_lora(reward, "sft-dir", 4, 8.0, 0.0, reward_head=True)
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert any("score" in name and "lora" not in name for name in trainable)  # the scalar head, in full


def test_lora_keeps_response_only_logits_and_packing_with_the_same_loss_under_checkpointing(gpt2_tokenizer):
    """The model's own padded loss equals the loss of the path train.py --lora --gradient-checkpointing runs:
    response-only logits, packed rows, a peft model, activations recomputed; and the adapters get gradients."""
    tok = model_lib.ready_tokenizer(gpt2_tokenizer)
    records = json.loads(shared_path("data", "alpaca_5000.json").read_text())[:6]
    examples = [datasetup.tokenize_example(r, tok, "seed", 256) for r in records]
    model = tiny("gpt2")
    model.loss_type, model.config.use_cache = "ForCausalLM", False  # as train.py sets them
    with torch.no_grad():
        own = float(model(**SFTCollator(tok.pad_token_id, "none")(examples)).loss)
    packed = SFTCollator(tok.pad_token_id, "rows")(examples)
    assert model_lib.enable_response_only_logits(model, packed)
    wrapped = lora.add_lora(model, "base", 4, 8.0, 0.0)
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


def test_a_lora_run_saves_the_adapter_merges_and_loads_wherever_a_model_dir_goes(workdir):
    out = workdir / "lora"
    result = run_train(workdir, *FAST, "--lora", "--merge", "--lora-r", "8", "--max-steps", "6", "--save-steps", "3",
                       "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable of" in result.stdout and "(LoRA)" in result.stdout
    for name in ("adapter_model.safetensors", "adapter_config.json", "sft_template.json", "metrics.json",
                 "merged/model.safetensors", "merged/config.json", "merged/sft_template.json"):
        assert (out / name).exists(), name
    assert not (out / "model.safetensors").exists()
    checkpointed = run_train(workdir, *FAST, "--lora", "--lora-r", "8", "--max-steps", "6", "--save-steps", "3",
                             "--gradient-checkpointing", "--output-dir", str(workdir / "lora-gc"))
    assert checkpointed.returncode == 0, checkpointed.stderr[-3000:]  # the same steps, activations recomputed
    assert load_json(workdir / "lora-gc" / "metrics.json")["train_loss"] == pytest.approx(
        load_json(out / "metrics.json")["train_loss"], rel=1e-4)
    config = load_json(out / "adapter_config.json")
    assert config["base_model_name_or_path"] == str(workdir / "smoke-run" / "base") and config["r"] == 8
    tok = model_lib.load_tokenizer(str(out))
    adapter, merged = model_lib.load_model(str(out), tokenizer=tok), model_lib.load_model(str(out / "merged"))
    ids = torch.tensor([tok("Reverse the order of the words.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(adapter.eval()(ids).logits, merged.eval()(ids).logits)
        assert not torch.allclose(model_lib.load_model(str(workdir / "smoke-run" / "base")).eval()(ids).logits,
                                  merged(ids).logits)  # the adapter trained
    import subprocess
    import sys

    from conftest import ROOT

    answers = [subprocess.run([sys.executable, str(ROOT / "inference.py"), "--finetuned", path, "--prompt",
                               "Greet them.", "--input", "cat dog", "--json", "--only", "finetuned"], cwd=workdir,
                              env=ENV, capture_output=True, text=True, timeout=120) for path in (str(out), str(out / "merged"))]
    assert all(a.returncode == 0 for a in answers), answers[0].stderr[-2000:]
    assert answers[0].stdout == answers[1].stdout


def test_a_lora_run_resumes_after_kill_9(workdir):
    out = workdir / "lora-killed"
    args = [*FAST, "--lora", "--max-steps", "12", "--save-steps", "4", "--output-dir", str(out)]
    proc = start_train(workdir, *args)
    wait_for(out / "checkpoint-4" / "trainer_state.json", proc)
    proc.kill()
    proc.wait()
    assert (out / "checkpoint-4" / "adapter_model.safetensors").exists()
    resumed = run_train(workdir, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout and load_json(out / "metrics.json")["global_step"] == 12


@pytest.mark.parametrize("args,expected", [
    (["--merge"], "--merge: only with --lora"),
    (["--lora", "--lora-r", "0", "--lora-dropout", "1"], "--lora-r must be >= 1 (got 0)"),
    (["--lora", "--init", "scratch"], "--lora with --init scratch"),
    (["--smoke", "--lora", "--lora-target", "q_proj", "--output-dir", "x"], "no layer named q_proj"),
])
def test_bad_lora_settings_are_refused_naming_the_flag(workdir, args, expected):
    result = run_train(workdir, *args)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr
