"""What the README promises, checked where it was once broken: DataParallel replicas, multi-EOS stop ids, one
prompt format, the tokenization cache, the per-token validation loss, and hints that work when followed."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from tuning.data import tokencache
import inference
from tuning.data import records, sft, templates
from tuning.generation import generate
from tuning.models import loading, response_logits
from tuning.cli import UserError
from tuning.data.collate import SFTCollator
from conftest import ROOT
from test_speed import examples, model_inputs, tiny_gpt2

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_a_data_parallel_replica_computes_with_its_own_weights(monkeypatch):
    """nn.DataParallel copies the module with torch.nn.parallel.replicate; each replica must use its weights."""
    replicate_module = sys.modules["torch.nn.parallel.replicate"]
    model = tiny_gpt2()
    batch = model_inputs(SFTCollator(0, "none")(examples()))
    assert response_logits.enable_response_only_logits(model, batch)
    torch.manual_seed(1)
    noise = [0.5 * torch.randn_like(p) for p in model.parameters()]
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, n in zip(shifted.parameters(), noise):
            p += n

    def broadcast_to_cpu(tensors, devices, detach=False):  # what a GPU broadcast does, with other weights
        params = tensors and tensors[0].requires_grad
        return [[t.detach().clone() + noise[i] if params else t.clone() for i, t in enumerate(tensors)]
                for _ in devices]

    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape", broadcast_to_cpu)
    replica = replicate_module.replicate(model, [0])[0]
    expected, original = shifted(**batch).loss, model(**batch).loss
    assert torch.allclose(replica(**batch).loss, expected, atol=1e-6)
    assert not torch.allclose(expected, original, atol=1e-3)
    assert type(model).__name__ == "GPT2LMHeadModel"  # save_pretrained writes the real architecture


def test_every_stop_id_of_the_model_ends_an_answer(tiny_tokenizer):
    """Llama 3 style generation configs list several stop ids: keep them, and cut answers at any of them."""
    lm = tiny_gpt2()
    tok = copy.deepcopy(tiny_tokenizer)
    tok.padding_side = "left"
    prompt = templates.format_prompt({"instruction": "Count the words.", "input": "cat dog"})
    loading.set_generation_ids(lm, tok)
    ids = torch.tensor([templates.encode_prompt(tok, prompt)])
    first_token = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                              do_sample=False)[0, -1].item()
    assert first_token != tok.eos_token_id
    assert not generate.generate(lm, tok, [prompt], {"max_new_tokens": 4, "do_sample": False})[0]["stopped_at_eos"]
    lm.generation_config.eos_token_id = [first_token, 7]
    loading.set_generation_ids(lm, tok)
    assert lm.generation_config.eos_token_id == [tok.eos_token_id, first_token, 7]
    assert loading.stop_token_ids(lm, tok) == [tok.eos_token_id, first_token, 7]
    stopped = generate.generate(lm, tok, [prompt], {"max_new_tokens": 4, "do_sample": False})[0]
    assert stopped == {"text": "", "new_tokens": 0, "stopped_at_eos": True}


def test_placeholder_inputs_are_formatted_as_in_training(tmp_path):
    record = {"instruction": "Say hi.", "input": "<No Input>", "output": "hi"}
    assert templates.format_prompt(record) == "### Instruction:\nSay hi.\n\n### Response:\n"
    (tmp_path / "p.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "d.json").write_text(json.dumps([record]))
    prompt = templates.format_prompt(records.read_prompts(str(tmp_path / "p.jsonl"))[0], "seed")
    assert prompt == templates.format_prompt(records.load_records(str(tmp_path / "d.json"))[0][0], "seed")


def test_an_edited_template_is_never_served_from_the_cache(tmp_path, tiny_tokenizer, monkeypatch):
    import datasets
    from tuning import smoke

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "d.json"
    path.write_text(json.dumps(smoke.make_records(20)))
    first, report = sft.prepare_datasets(str(path), tiny_tokenizer, "seed", 64, 4, 0)
    assert not report["from_cache"] and sft.prepare_datasets(str(path), tiny_tokenizer, "seed", 64, 4, 0)[1]["from_cache"]
    tokencache.save(first, str(tmp_path / "saved"), tiny_tokenizer, "seed", 64, False)
    edited = templates.Template("## Task:\n{instruction}\n\n## Input:\n{input}\n\n## Answer:\n",
                                "## Task:\n{instruction}\n\n## Answer:\n")
    monkeypatch.setitem(templates.TEMPLATES, "seed", edited)
    second, report = sft.prepare_datasets(str(path), tiny_tokenizer, "seed", 64, 4, 0)
    assert not report["from_cache"]
    record = records.split_records(records.load_records(str(path))[0], 4, 0)[0][0]
    assert second["train"][0]["input_ids"] == sft.tokenize_example(record, tiny_tokenizer, "seed", 64)["input_ids"]
    assert second["train"][0]["input_ids"] != first["train"][0]["input_ids"]
    with pytest.raises(records.DataError, match="template_text"):
        tokencache.load_saved(str(tmp_path / "saved"), tiny_tokenizer, "seed", 64, False)


def test_validation_loss_is_the_mean_over_response_tokens(tmp_path):
    """The same figure at any batch size, and the same as evaluation.py's per-token mean."""
    import torch.nn.functional as F
    from datasets import Dataset
    from transformers import TrainingArguments

    from tuning.runs.trainer import InstructTrainer

    exs = examples(9)
    model = tiny_gpt2()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in exs:
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(ex["labels"][1:])
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    losses = []
    for batch_size in (1, 2, 4):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=batch_size, report_to="none",
                                 use_cpu=True, remove_unused_columns=False, prediction_loss_only=True)
        trainer = InstructTrainer(model=model, args=args, eval_dataset=Dataset.from_list(exs),
                                  data_collator=SFTCollator(0, "rows"))
        losses.append(trainer.evaluate(metric_key_prefix="before")["before_loss"])
        assert trainer.state.log_history[-1]["before_loss"] == losses[-1]  # what the loss curve plots
    assert losses == pytest.approx([total / count] * 3, abs=1e-5)


def test_resume_hint_names_the_runs_own_command(tmp_path):
    run = tmp_path / "custom-out"
    (run / "checkpoint-3").mkdir(parents=True)
    (run / "checkpoint-3" / "trainer_state.json").write_text("{}")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(run / "checkpoint-3" / "model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.save({}, run / "checkpoint-3" / name)
    with pytest.raises(UserError, match=r"--output-dir .*custom-out`, or pass --finetuned .*checkpoint-3"):
        generate.require_finetuned(str(run))
    (run / "run_config.json").write_text(json.dumps({"command": "python train.py --smoke --output-dir custom-out"}))
    with pytest.raises(UserError, match=r"resume it with `python train.py --smoke --output-dir custom-out`"):
        generate.require_finetuned(str(run))


def test_sampling_settings_without_sample_are_refused():
    import argparse

    greedy = argparse.Namespace(sample=False)
    with pytest.raises(UserError, match="--temperature, --top-p only apply when sampling; add --sample"):
        inference.check_sampling_flags(greedy, {"temperature", "top_p", "seed"})
    with pytest.raises(UserError, match=r"--temperature only applies when sampling; add --sample \(greedy decoding "
                                        r"ignores it\)"):
        inference.check_sampling_flags(greedy, {"temperature"})
    inference.check_sampling_flags(greedy, {"seed", "max_new_tokens"})
    inference.check_sampling_flags(argparse.Namespace(sample=True), {"temperature"})


def test_scratch_runs_are_evaluated_alone():
    import argparse

    import evaluation

    args = argparse.Namespace(only="both", finetuned="run")
    with pytest.raises(UserError, match="--init scratch.*pass --only finetuned"):
        evaluation.check_base(args, {"init": "scratch"}, set())
    evaluation.check_base(args, {"init": "pretrained"}, set())
    evaluation.check_base(argparse.Namespace(only="finetuned", finetuned="run"), {"init": "scratch"}, set())


def run_script(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_flags_that_did_nothing_are_gone_and_hints_name_the_right_flag(tmp_path):
    result = run_script("datasetup.py", "--ignore-index", "-1")
    assert result.returncode == 2 and "unrecognized arguments: --ignore-index" in result.stderr
    result = run_script("train.py", "--smoke", "--model", "gpt2", "--output-dir", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 2 and "--smoke brings its own model, so it can't be combined with --model" in \
        result.stderr and "Traceback" not in result.stderr
    result = run_script("train.py", "--smoke", "--dataset", "x.json", cwd=tmp_path)
    assert result.returncode == 2 and "--smoke --dataset FILE continues the smoke SFT model on FILE" in result.stderr
    assert "name the new run's --output-dir" in result.stderr and "Traceback" not in result.stderr
    result = run_script("inference.py", "--only", "base", "--base", "no-such-org/no-such-model", cwd=tmp_path)
    assert result.returncode == 2 and "with --base" in result.stderr and "--model" not in result.stderr
    result = run_script("model.py", "--model", "no-such-org/no-such-model", "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "device: cpu" in result.stdout and "precision: " in result.stdout  # printed before the download fails
