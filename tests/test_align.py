"""align.py's parts: the tokens DPO and RLOO train on, our DPO loss against TRL's own, RLOO's evaluation
(KL, RNG, truncation), the reward-model judge and the checks made before training. End to end: test_align_smoke.py."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from tuning.models import packing_checks

from tuning.data import collate

from tuning.data import sft
from tuning.models import loading
from tuning.data import preferences
from conftest import shared_path
from tuning.data.chat_template import own_chat_template, tokenize_conversations
from tuning.data.templates import encode_prompt, format_prompt


def tiny_policy(tmp_path, tokenizer, dropout=0.0, family="gpt2"):
    """A saved tiny GPT-2 (or OPT, or Llama) with the tokenizer's vocabulary (random weights: enough to check tokens
    and losses)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                             intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=1024, bos_token_id=tokenizer.eos_token_id,
                                             eos_token_id=tokenizer.eos_token_id, attention_dropout=dropout))
    elif family == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                         num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=1024,
                                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, dropout=dropout,
                                         attention_dropout=dropout))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=1024,
                                           bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                           resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    return loading.load_model(str(tmp_path / "policy"), "pretrained", tokenizer)


def dpo_trainer(tmp_path, tokenizer, pairs, dropout=0.0, loss_type="sigmoid"):
    from tuning.preference import align_trainers

    policy = tiny_policy(tmp_path, tokenizer, dropout)
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), epochs=1.0, max_steps=2, lr=1e-3, warmup_ratio=0.0,
                           eval_steps=10, save_steps=10, logging_steps=1, seed=0, beta=0.1, method="dpo", gradient_checkpointing=False, lora=False, report_to="none",
                           batch_size=len(pairs), loss_type=loss_type, label_smoothing=0.1)
    config = align_trainers.trl_config(args, torch.device("cpu"), "fp32")
    tokens, _ = preferences.tokenize_pairs(pairs, tokenizer, "seed", 1024)
    from datasets import Dataset

    data = {"train": Dataset.from_list(tokens), "validation": Dataset.from_list(tokens)}
    return align_trainers.build_trainer(args, policy, tokenizer, config, data, None, [], None)


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
    tok = loading.ready_tokenizer(gpt2_tokenizer)
    records, pairs = real_pairs()
    trainer = dpo_trainer(tmp_path, tok, pairs)
    batch = next(iter(trainer.get_train_dataloader()))
    chosen = sequences_of(batch)[0::2]
    assert batch["num_pairs"] == len(pairs) and "attention_mask" not in batch  # packed rows, no padding mask
    for record in records:
        example = sft.tokenize_example(record, tok, "seed", 1024)
        assert (example["input_ids"], [int(label != -100) for label in example["labels"]]) in chosen, record["instruction"]
        assert example["input_ids"][-1] == tok.eos_token_id


def test_packed_answer_log_probs_equal_padded_ones(tmp_path, gpt2_tokenizer):
    """Packing changes the layout, not the numbers: each answer's log-prob is the same padded, in packed rows,
    in one flat row, and alone, and so is each answer's count of scored tokens (its ids and EOS), which IPO uses."""
    from tuning.models import sequence_logps

    tok = loading.ready_tokenizer(gpt2_tokenizer)
    _, pairs = real_pairs()
    tokens, _ = preferences.tokenize_pairs(pairs, tok, "seed", 1024)
    model = sequence_logps.enable_sequence_logps(tiny_policy(tmp_path, tok)).eval()
    with torch.no_grad():
        logps = {mode: model(**sequence_logps.model_inputs(collate.PairCollator(tok.pad_token_id, mode)(tokens))).logits
                 for mode in ("none", "rows", "flat")}
        alone = torch.cat([model(**sequence_logps.model_inputs(collate.PairCollator(tok.pad_token_id, "rows")([p]))).logits
                           for p in tokens])
    for mode in ("rows", "flat"):
        torch.testing.assert_close(logps[mode], logps["none"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(alone, logps["none"], rtol=1e-5, atol=1e-4)
    lengths = torch.tensor([len(pair[key]) for pair in tokens for key in ("chosen_ids", "rejected_ids")])
    for mode in ("none", "rows", "flat"):
        assert torch.equal(sequence_logps.answer_lengths(collate.PairCollator(tok.pad_token_id, mode)(tokens)), lengths)
    assert packing_checks.packed_logps_match(model, tokens, tok.pad_token_id)[0]


# Each --loss-type's loss where the policy is the reference (every log-ratio 0), at beta 0.1 and label smoothing 0.1:
# DPO's ln 2, IPO's (0 - 1 / (2 beta))^2, the hinge's 1 - 0, and robust DPO's (0.9 ln 2 - 0.1 ln 2) / 0.8 = ln 2.
LOSS_AT_START = {"sigmoid": math.log(2), "ipo": 25.0, "hinge": 1.0, "robust": math.log(2)}


@pytest.mark.parametrize("loss_type", list(LOSS_AT_START))
def test_dpo_loss_equals_trls_loss_on_the_same_pairs(tmp_path, gpt2_tokenizer, loss_type):
    """Our loss of each --loss-type, on packed pairs, equals TRL's own (its padded batches, its fused output layer,
    its formula for the trainer's loss_type and label smoothing) on identical pairs and reference log-probs; the
    held-out evaluation reports the same loss, and exactly the loss at margin 0 with 50% accuracy before training
    (the policy is the reference). IPO averages each answer's log-ratio over its tokens: ours counts as many as
    TRL's completion mask. Each of the other loss types gives another loss on these pairs, so none passes for it."""
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tuning.models import sequence_logps

    tok = loading.ready_tokenizer(gpt2_tokenizer)
    _, pairs = real_pairs()
    trainer = dpo_trainer(tmp_path, tok, pairs, loss_type=loss_type)
    assert trainer.loss_types == [loss_type] and trainer.label_smoothing == (0.1 if loss_type == "robust" else 0.0)
    before = trainer.evaluate(metric_key_prefix="before")
    assert before["before_accuracy"] == 0.5
    assert before["before_loss"] == pytest.approx(LOSS_AT_START[loss_type], abs=1e-12)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    ours = trainer.evaluate()
    examples = [trainer.eval_dataset[i] for i in range(len(pairs))]  # with the precomputed reference log-probs
    batch, their_batch = trainer.data_collator(examples), DataCollatorForPreference(tok.pad_token_id)(examples)
    tokens = sequence_logps.answer_lengths(batch)  # ours: chosen, rejected, chosen, ...; TRL's: chosen, then rejected
    assert torch.equal(torch.cat([tokens[0::2], tokens[1::2]]), their_batch["completion_mask"].sum(1))
    with torch.no_grad():
        logps = trainer.model(**sequence_logps.model_inputs(batch)).logits
        packed = float(trainer.compute_loss(trainer.model, batch))
        theirs = float(DPOTrainer._compute_loss(trainer, trainer.model, their_batch, False))
    assert packed == pytest.approx(theirs, rel=1e-4) and ours["eval_loss"] == pytest.approx(theirs, rel=1e-4)
    assert theirs != pytest.approx(LOSS_AT_START[loss_type], rel=1e-3)
    others = {other: float(sequence_logps.dpo_losses(other, logps[0::2], logps[1::2], batch["ref_chosen_logps"],
                                                     batch["ref_rejected_logps"], 0.1, 0.1, tokens[0::2],
                                                     tokens[1::2])[0].mean()) for other in LOSS_AT_START}
    assert others[loss_type] == pytest.approx(theirs, rel=1e-4)
    assert all(value != pytest.approx(theirs, rel=1e-3) for other, value in others.items() if other != loss_type)


def test_the_loss_flags_offer_the_losses_tested_above():
    """--loss-type's choices are the loss types compared with TRL's above; robust takes --label-smoothing, and RLOO
    runs with the defaults."""
    import align
    from tuning import cli

    parser = cli.build_parser(align)
    assert next(a for a in parser._actions if a.dest == "loss_type").choices == list(LOSS_AT_START)
    for argv in (["--loss-type", "ipo"], ["--loss-type", "robust", "--label-smoothing", "0.2"],
                 ["--method", "rloo", "--reward-model", "rm"]):
        cli.parse_or_exit(parser, align.validate_args, argv)


@pytest.mark.parametrize("argv,expected", [
    (["--loss-type", "kto"], "argument --loss-type: invalid choice: 'kto'"),
    (["--loss-type", "robust", "--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5) (got 0.5)"),
    (["--label-smoothing", "0.2"], "--label-smoothing: only used with --loss-type robust (got --loss-type sigmoid)"),
    (["--method", "rloo", "--reward-model", "rm", "--loss-type", "hinge", "--label-smoothing", "-0.1"],
     "invalid settings:\n  --loss-type hinge: only used with --method dpo\n  --label-smoothing must be in [0, 0.5) "
     "(got -0.1)"),
])
def test_bad_loss_settings_are_refused_naming_the_flag(capsys, argv, expected):
    """In one message, all at once; a label smoothing that its loss would ignore is a mistake too."""
    import align
    from tuning import cli

    with pytest.raises(SystemExit) as stop:
        cli.parse_or_exit(cli.build_parser(align), align.validate_args, argv)
    assert stop.value.code == 2 and expected in capsys.readouterr().err


def test_metrics_and_the_closing_line_name_the_loss_type():
    """Losses of different types are not comparable: metrics.json records the type, and the closing line names it."""
    from tuning.preference import align_report

    args = SimpleNamespace(method="dpo", loss_type="ipo", output_dir="out", merge=False)
    before = {"before_accuracy": 0.5, "before_loss": 25.0, "before_mean_margin": 0.0, "before_margins": [0.0, 0.0]}
    after = {"eval_accuracy": 1.0, "eval_loss": 20.0, "eval_mean_margin": 0.3, "eval_margins": [0.2, 0.4]}
    metrics = align_report.summary(args, None, before, after, {"train_runtime_s": 2.0, "global_step": 1,
                                                               "train_pairs": 8})
    assert metrics["loss_type"] == "ipo" and metrics["eval_loss_after"] == 20.0
    head, _ = align_report.report_lines(args, {**metrics, "device": "cpu"})
    assert head.endswith("50.0% -> 100.0% (IPO loss 25.0000 -> 20.0000, mean margin +0.300) on 2 pairs")


def rloo_trainer(tmp_path, tokenizer, records, beta=0.0, dropout=0.0, judge=None, family="gpt2", method="rloo",
                 reward="model", wrap=None, packing="rows"):
    """A tiny online RL trainer (RLOO, or GRPO) on `records`: Alpaca records (prompts in the seed template), or
    conversations (lists of turns, asked with our chat template, which the tokenizer then carries, as align.py's
    does); each Alpaca record's output is its reference answer, for --reward exact. `wrap(policy)` (LoRA) runs
    before the trainer is built; `packing` lays out the samples for their log-probs."""
    from datasets import Dataset

    from tuning.preference import align_trainers

    prompts = [r if isinstance(r, list) else format_prompt(r, "seed") for r in records]
    if any(isinstance(r, list) for r in records):
        tokenizer.chat_template = own_chat_template("seed", tokenizer)
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), epochs=1.0, max_steps=1, lr=1e-5, warmup_ratio=0.0,
                           eval_steps=10, save_steps=10, logging_steps=1, seed=0, beta=beta, method=method,
                           gradient_checkpointing=False, lora=False, report_to="none", batch_size=2, num_generations=2,
                           max_new_tokens=4, temperature=0.7, reward=reward, reward_weights="")
    config = align_trainers.trl_config(args, torch.device("cpu"), "fp32")
    data = Dataset.from_list([{"prompt": p, "judge_prompt": p, "record": json.dumps(r),
                               "reference": None if isinstance(r, list) else r["output"]}
                              for p, r in zip(prompts, records)])
    if judge is None:
        def judge(completions=(), **kwargs):
            return [0.0] * len(completions)

        judge.score = lambda records, answers: [0.0] * len(answers)
    policy = tiny_policy(tmp_path, tokenizer, dropout, family)
    policy = wrap(policy) if wrap else policy
    return align_trainers.build_trainer(args, policy, tokenizer, config, {"train": data, "validation": data}, judge, [],
                                      None, packing), prompts


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_rloo_encodes_prompts_as_inference_does(tmp_path, gpt2_tokenizer, method):
    tok = loading.ready_tokenizer(gpt2_tokenizer)
    records, _ = real_pairs(2)
    trainer, prompts = rloo_trainer(tmp_path, tok, records, method=method)
    assert trainer.reward_funcs[0].function.stop_ids == trainer.eos_token_ids == [tok.eos_token_id]  # the EOS penalty
    ids, _, _ = trainer._tokenize_prompts(prompts)
    for record, prompt_ids in zip(records, ids):
        example = sft.tokenize_example(record, tok, "seed", 1024)
        assert prompt_ids == [t for t, label in zip(example["input_ids"], example["labels"]) if label == -100]


TALKS = [[{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"},
          {"role": "user", "content": "Name a color."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}]]


def test_rloo_asks_a_conversation_its_next_turn_as_sft_rendered_it(tmp_path, gpt2_tokenizer):
    """Conversation prompts (multi-turn, with a system turn) are encoded as SFT encoded the dialogue before an
    answer, trained on for a step, and judged: the reward function gets each prompt's conversation and each
    answer's text, and the held-out answers are inference.py's."""
    from tuning.generation import generate

    tok = loading.ready_tokenizer(copy.deepcopy(gpt2_tokenizer))  # (it gets a chat template)
    seen = []

    def judge(completions=(), judge_prompt=(), **kwargs):
        seen.append((list(judge_prompt), list(completions)))  # (the held-out evaluation gives texts)
        return [float(len(c[-1]["content"] if isinstance(c, list) else c)) for c in completions]

    judge.score = lambda records, answers: [0.0] * len(answers)
    trainer, prompts = rloo_trainer(tmp_path, tok, TALKS, judge=judge)
    ids, _, _ = trainer._tokenize_prompts(prompts)
    for talk, prompt_ids in zip(TALKS, ids):
        [example] = tokenize_conversations([talk + [{"role": "assistant", "content": "Blue."}]], tok,
                                           tok.chat_template, 1024, train_on="last_assistant")
        assert prompt_ids == example["input_ids"][:example["spans"][-1][0]]
    assert tok.decode(ids[1]) == "Be brief.\n\n### Instruction:\nCount to three.\n\n### Response:\n"
    trainer.train()
    assert seen and all(prompt in TALKS for prompt in seen[0][0])
    assert all(c[-1]["role"] == "assistant" and isinstance(c[-1]["content"], str) for c in seen[0][1])
    held_out = [{"prompt": p} for p in prompts]
    assert trainer.greedy_answers(held_out) == generate.generate(trainer.model, tok, prompts, {
        "max_new_tokens": 4, "do_sample": False}, raw=True)


def test_the_judge_scores_a_conversation_answer_in_its_dialogue(tmp_path, gpt2_tokenizer):
    """The reward model reads a conversation's answer as the last turn of the dialogue, as reward.py trained it on
    pairs (the SFT tokens of the dialogue), and the same whether TRL hands the answer as text or as a turn."""
    from tuning.data.templates import write_template
    from tuning.models import scoring
    from tuning.preference import align_trainers

    tok = loading.ready_tokenizer(copy.deepcopy(gpt2_tokenizer))  # (it gets a chat template)
    tok.chat_template = own_chat_template("seed", tok)
    tiny_policy(tmp_path, tok)
    rm = scoring.reward_model_from(str(tmp_path / "policy"))
    with torch.no_grad():
        rm.score.weight.normal_()
    scoring.without_pad_id(rm)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    write_template(str(tmp_path / "rm"), "seed")
    judge = align_trainers.Judge(str(tmp_path / "rm"), torch.device("cpu"))
    [example] = tokenize_conversations([TALKS[0] + [{"role": "assistant", "content": "Blue."}]], tok,
                                       tok.chat_template, 1024)
    assert sum(judge.parts(TALKS[0], "Blue."), []) == example["input_ids"]
    pair = preferences.parse_pair({"prompt": TALKS[0], "chosen": [{"role": "assistant", "content": "Blue."}],
                                   "rejected": [{"role": "assistant", "content": "No."}]})
    tokens = preferences.tokenize_pair(pair, tok, "seed", 1024)
    assert sum(judge.parts(TALKS[0], "Blue."), []) == tokens["prompt_ids"] + tokens["chosen_ids"]
    as_text = judge(completions=["Blue.", "No."], judge_prompt=[TALKS[0]] * 2)
    as_turns = judge(completions=[[{"role": "assistant", "content": a}] for a in ("Blue.", "No.")],
                     judge_prompt=[TALKS[0]] * 2)
    assert as_text == as_turns and as_text[0] != as_text[1]


@pytest.mark.parametrize("method", ["dpo", "rloo"])
def test_both_methods_train_without_dropout(tmp_path, gpt2_tokenizer, method):
    """The log-probs the loss compares are the policy's own: dropout off, though the model was saved with it."""
    tok = loading.ready_tokenizer(gpt2_tokenizer)
    records, pairs = real_pairs(2)
    trainer = (dpo_trainer(tmp_path, tok, pairs, dropout=0.1) if method == "dpo"
               else rloo_trainer(tmp_path, tok, records, dropout=0.1)[0])
    rates = [m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates and set(rates) == {0.0}


@pytest.mark.parametrize("family,method", [("gpt2", "rloo"), ("opt", "rloo"), ("gpt2", "grpo")])
def test_rloo_scores_each_sampled_token_at_the_position_it_was_sampled_at(tmp_path, gpt2_tokenizer, family, method):
    """TRL left-pads the prompts and scores prompt + answer without position ids, so GPT-2 and OPT would number the
    padding too. Our per-token log-probs of a left-padded row equal those of the same row alone, and generate's own
    (its logits at the sampling temperature) of the tokens it sampled."""
    tok = loading.ready_tokenizer(gpt2_tokenizer)
    records, _ = real_pairs(3)
    records = [records[0], records[2]]  # prompts of different lengths: the shorter one is left-padded
    trainer, prompts = rloo_trainer(tmp_path, tok, records, family=family, method=method)
    prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
    width = max(map(len, prompt_ids))
    assert min(map(len, prompt_ids)) < width
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    model = trainer.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=trainer.temperature,
                             top_k=0, max_new_tokens=6, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        answers = out.sequences[:, width:]
        assert tok.eos_token_id not in answers.tolist()  # (random weights: every sampled token is scored)
        sampled = (torch.stack(out.logits, 1).double() / trainer.temperature).log_softmax(-1)
        sampled = sampled.gather(-1, answers[..., None]).squeeze(-1)
        padded, _, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([ids, answers], 1), torch.cat([mask, torch.ones_like(answers)], 1), answers.shape[1])
        alone = torch.cat([trainer._get_per_token_logps_and_entropies(
            model, torch.tensor([p + a]), torch.ones(1, len(p) + len(a), dtype=torch.long), len(a))[0]
            for p, a in zip(prompt_ids, answers.tolist())])
    torch.testing.assert_close(padded.double(), alone.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.double(), sampled, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_rloo_held_out_answers_are_inferences_and_the_kl_samples_trls(tmp_path, gpt2_tokenizer, method):
    """The held-out greedy answers are inference.py's (its generate, the model's own generation config, fp32 even
    under bf16 autocast), and the KL's samples come from TRL's own training sampler, which turns off what the
    model's generation config adds (here a no-repeat n-gram size that would change the samples)."""
    from transformers import GenerationConfig

    from tuning.generation import generate

    tok = loading.ready_tokenizer(gpt2_tokenizer)
    records, _ = real_pairs(2)
    trainer, prompts = rloo_trainer(tmp_path, tok, records, method=method)
    held_out = [{"prompt": p} for p in prompts]
    ours = trainer.greedy_answers(held_out)
    theirs = generate.generate(trainer.model, tok, prompts, {"max_new_tokens": 4, "do_sample": False}, raw=True)
    assert ours == theirs and all("raw_text" in answer for answer in ours)
    plain = trainer.sampled_answers(held_out)
    trainer.model.generation_config = GenerationConfig(**{**trainer.model.generation_config.to_dict(),
                                                          "no_repeat_ngram_size": 1})
    assert trainer.sampled_answers(held_out) == plain


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_rloo_evaluation_kl_is_at_the_sampling_temperature_and_leaves_the_rng_alone(tmp_path, gpt2_tokenizer, method):
    """The held-out KL sums k3 = exp(d) - d - 1 (d = log ref - log pi) over each sampled answer's tokens, with
    both models' log-probs at the sampling temperature, as a plain full-vocabulary computation gives it; the
    evaluation's seeded sampling leaves training's random state as it was; --beta 0 has no KL to report."""
    tok = loading.ready_tokenizer(gpt2_tokenizer)
    records, _ = real_pairs(2)
    trainer, prompts = rloo_trainer(tmp_path, tok, records, beta=0.05, method=method)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    held_out = [{"prompt": p} for p in prompts]
    state = torch.get_rng_state()
    answers = trainer.sampled_answers(held_out)
    assert torch.equal(torch.get_rng_state(), state) and answers == trainer.sampled_answers(held_out)
    kl = trainer.kl_to_reference(held_out, answers)
    expected = []
    for prompt, answer in zip(prompts, answers):
        ids = torch.tensor([encode_prompt(tok, prompt) + answer])
        with torch.no_grad():
            logps = [(m(input_ids=ids).logits[0, -len(answer) - 1:-1].double() / 0.7).log_softmax(-1)
                     .gather(-1, ids[0, -len(answer):, None]).squeeze(-1) for m in (trainer.model, trainer.ref_model)]
        d = logps[1] - logps[0]
        expected.append(float((d.exp() - d - 1).sum()))
    assert kl == pytest.approx(expected, rel=1e-4) and min(kl) > 0
    assert trainer.kl_to_reference(held_out, trainer.sampled_answers(held_out)) == kl
    no_reference, _ = rloo_trainer(tmp_path / "b0", tok, records, beta=0.0, method=method)
    assert no_reference.ref_model is None and no_reference.kl_to_reference(held_out, answers) == [None, None]


def test_a_nan_in_dpo_stops_the_run_before_the_optimizer_step(tmp_path, gpt2_tokenizer):
    from tuning.runs.trainer import NonFiniteLoss

    _, pairs = real_pairs()
    trainer = dpo_trainer(tmp_path, loading.ready_tokenizer(gpt2_tokenizer), pairs)
    with torch.no_grad():
        trainer.model.transformer.h[0].mlp.c_fc.bias[0] = float("nan")  # after the reference pass
    with pytest.raises(NonFiniteLoss, match=r"became nan at step 1"):
        trainer.train()
    assert trainer.state.global_step == 0




def test_a_reward_model_too_short_for_prompt_and_answer_is_refused_before_training(tmp_path, gpt2_tokenizer):
    """RLOO's judge reads prompt + answer + EOS: a reward model with too few positions for the longest prompt and
    --max-new-tokens is an error naming both flags, before any step (not a crash in the middle of training)."""
    from transformers import GPT2Config

    import align
    from tuning.cli import UserError

    tok = loading.ready_tokenizer(gpt2_tokenizer)
    tiny_policy(tmp_path, tok)
    records = json.loads(shared_path("data", "alpaca_5000.json").read_text())[:20]
    (tmp_path / "prompts.json").write_text(json.dumps(records))
    longest = max(len(encode_prompt(tok, format_prompt(r, "seed"))) for r in records)
    args = SimpleNamespace(model=str(tmp_path / "policy"), method="rloo", dataset=str(tmp_path / "prompts.json"),
                           reward_model="rm", reward="model", skip_invalid=False, val_size=4, seed=0, max_length=512,
                           max_new_tokens=32)
    for positions, fits in ((longest + 33, True), (longest + 32, False)):
        judge = SimpleNamespace(model=SimpleNamespace(config=GPT2Config(n_positions=positions)), tokenizer=tok,
                                template="seed", chat_template=None)
        if fits:
            data, _, _ = align.prepare_data(args, tok, "seed", judge, lambda *a: None)
            assert len(data["train"]) + len(data["validation"]) == 20
        else:
            with pytest.raises(UserError, match=rf"--max-new-tokens 32: the longest prompt.* {longest} tokens.*"
                                                 rf"more than the {positions} positions of --reward-model rm"):
                align.prepare_data(args, tok, "seed", judge, lambda *a: None)


def test_plain_python_on_several_gpus_is_refused_with_the_torchrun_command():
    from tuning.runs import launchers
    from tuning.cli import UserError

    launchers.refuse_data_parallel(SimpleNamespace(n_gpu=1), "align.py")
    with pytest.raises(UserError, match=r"4 GPUs.*DataParallel.*`torchrun --nproc_per_node 4 align.py \.\.\.`"):
        launchers.refuse_data_parallel(SimpleNamespace(n_gpu=4), "align.py")


def test_dpo_with_few_steps_scores_only_the_pairs_it_will_see():
    """--max-steps 3 of 8 pairs uses 24 pairs: the reference pass before training scores those, not all 100 (on
    the HH pairs, 193 s of a 264 s run went to pairs never used). A longer run's pairs begin with a shorter one's."""
    from datasets import Dataset

    import align

    train = Dataset.from_list([{"n": i} for i in range(100)])
    said = []
    args = SimpleNamespace(max_steps=3, batch_size=8, seed=0)
    three = align.pairs_the_run_sees(args, train, 1, said.append)["n"]
    assert len(three) == 24 and said == ["DPO: --max-steps 3 trains on 24 of the 100 training pairs (drawn with "
                                         "--seed), so the reference pass scores those only"]
    four = align.pairs_the_run_sees(SimpleNamespace(max_steps=4, batch_size=8, seed=0), train, 1, said.append)["n"]
    assert four[:24] == three and three != sorted(three)  # in the order drawn: a longer run's batches begin alike
    assert len(align.pairs_the_run_sees(args, train, 2, said.append)) == 48  # every process's batches
    assert len(align.pairs_the_run_sees(SimpleNamespace(max_steps=-1, batch_size=8, seed=0), train, 1, said.append)) == 100
    assert len(align.pairs_the_run_sees(SimpleNamespace(max_steps=20, batch_size=8, seed=0), train, 1, said.append)) == 100


def test_dpos_logged_training_accuracy_counts_ties_half(tmp_path, gpt2_tokenizer):
    """At the first step the policy is the reference: every margin is 0, a tie, and the logged
    rewards/accuracies is 50% (as the held-out accuracy), not 0%."""
    _, pairs = real_pairs()
    trainer = dpo_trainer(tmp_path, loading.ready_tokenizer(gpt2_tokenizer), pairs)
    examples = [trainer.train_dataset[i] for i in range(len(pairs))]
    trainer.model.train()
    trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    assert trainer._metrics["train"]["rewards/accuracies"][-1] == 0.5
