"""Online RL's packed, answer-only log-probs (models/sampled_logps.py, collate.pack_samples): the layout, exactly;
TRL's own per-token log-probs, entropies, KL and loss on the same samples, within 1e-5 in fp32; no second model
under LoRA; the packing check; and the phase clock (phases.py)."""

import contextlib
import gc

import pytest
import torch

from test_align import real_pairs, rloo_trainer
from tuning.data.collate import pack_samples
from tuning.models import loading, packing_checks
from tuning.models.sampled_logps import padded_samples, token_logps


def test_the_answers_to_a_prompt_share_it_each_at_its_sampled_positions():
    """Two answers to prompt [5, 6] and one to [7]: the shared prompt once, then each answer at positions after it,
    attending to the prompt and to itself only; the first token of each answer is predicted from the prompt's last."""
    ids, mask, keep = padded_samples([[5, 6], [7], [5, 6]], [[1, 2], [3], [4]], pad_id=0)
    assert ids.tolist() == [[5, 6, 1, 2], [0, 7, 3, 0], [5, 6, 4, 0]] and keep == 2
    batch = pack_samples(ids, mask, keep, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 1, 2, 4], [7, 3, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 1, 2]]
    assert batch["targets"].tolist() == [1, 2, 4, 3]
    assert batch["sources"].tolist() == [1, 2, 1, 5]  # flat indices: row 0's 6, 1, 6; row 1's 7
    assert batch["slots"].tolist() == [0, 1, 4, 2]  # [i, j] of TRL's (3, 2) layout, as i * 2 + j
    allowed = batch["attention_mask"][0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 0],
                       [1, 1, 0, 0, 1]]  # the second answer sees the prompt and itself, not the first answer
    assert batch["attention_mask"][1, 0, 1].int().tolist() == [1, 1, 0, 0, 0]  # padding is a segment of its own
    flat = pack_samples(ids, mask, keep, pad_id=0, mode="flat")  # FlashAttention's: whole samples, no mask
    assert flat["attention_mask"] is None and flat["input_ids"].tolist() == [[5, 6, 1, 2, 7, 3, 5, 6, 4]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    none = pack_samples(ids, mask, keep, pad_id=0, mode="none")
    assert none["input_ids"].tolist() == [[5, 6, 1, 2], [7, 3, 0, 0], [5, 6, 4, 0]]
    assert none["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    mask[1, -keep:] = 0  # an answer masked out (TRL's mask_truncated_completions): nothing of it is scored
    skipped = pack_samples(ids, mask, keep, pad_id=0)
    assert skipped["input_ids"].tolist() == [[5, 6, 1, 2, 4]] and skipped["slots"].tolist() == [0, 1, 4]


@pytest.mark.parametrize("softcap,scale,bias", [(None, 1.0, False), (30.0, 0.5, True)])
def test_the_answer_head_is_trls_kernel_in_fp32(softcap, scale, bias, monkeypatch):
    """Our output layer at the answer tokens (tiles of whole-vocabulary rows, products in the autocast precision)
    against TRL's chunked kernel, in fp32: log-probs, entropies and every gradient, with Gemma-2's soft cap, a
    logit scale (Cohere's) and a bias too; across several tiles; with the products kept for the backward pass
    (as in bf16) or recomputed in it."""
    from trl.kernels import ChunkedLogProbFunction

    from tuning.models import sampled_logps

    torch.manual_seed(0)
    hidden, weight = torch.randn(1200, 16), torch.randn(300, 16) * 0.3
    b = torch.randn(300) if bias else None
    targets = torch.randint(0, 300, (1200,))
    results = []
    for head in ("ours", "trl", "ours, products kept"):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight) + ((b,) if bias else ())]
        args = (leaves[0], leaves[1], leaves[2] if bias else None, targets)
        monkeypatch.setattr(sampled_logps, "keeps_products", lambda *a: head == "ours, products kept")
        if head.startswith("ours"):
            logps, entropy = sampled_logps.AnswerHead.apply(*args, 0.7, softcap, scale, True, True)
        else:
            logps, entropy, *_ = ChunkedLogProbFunction.apply(*args, 0.7, 128, softcap, scale, ("log_probs", "entropy"))
        (logps * torch.linspace(-1, 1, 1200)).sum().add(entropy.sum() * 0.3).backward()
        results.append([logps, entropy] + [leaf.grad for leaf in leaves])
    assert len(targets) > 2 * sampled_logps.TOKEN_CHUNK
    for ours, theirs, kept in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kept, ours, rtol=1e-6, atol=1e-6)
    monkeypatch.undo()
    frozen = hidden.clone().requires_grad_()  # a frozen output layer (LoRA): its gradient is not computed
    logps, entropy = sampled_logps.AnswerHead.apply(frozen, weight, b, targets, 0.7, softcap, scale, True, True)
    (logps * torch.linspace(-1, 1, 1200)).sum().add(entropy.sum() * 0.3).backward()
    torch.testing.assert_close(frozen.grad, results[0][2], rtol=1e-5, atol=1e-5)
    assert not sampled_logps.keeps_products(torch.float32, 1024, 50257)  # (fp32: recomputed)
    assert sampled_logps.keeps_products(torch.bfloat16, 1024, 50257)  # (a part of the update, in bf16: kept)
    assert not sampled_logps.keeps_products(torch.bfloat16, 4096, 50257)  # (a whole batch: recomputed)


def test_the_answer_heads_kept_products_give_the_recomputed_gradients_in_bf16(monkeypatch):
    """Under bf16 autocast, where the products are kept for the backward pass: the log-probs and every gradient as
    when the backward recomputes them (within bf16 rounding), across vocabulary slices."""
    from tuning.models import sampled_logps

    torch.manual_seed(0)
    hidden, weight = torch.randn(600, 32), torch.randn(500, 32) * 0.3
    targets = torch.randint(0, 500, (600,))
    results = []
    for keep in (True, False):
        monkeypatch.setattr(sampled_logps, "keeps_products", lambda *a: keep)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, entropy = sampled_logps.AnswerHead.apply(h, w, None, targets, 0.7, None, 1.0, True, True)
        (logps * torch.linspace(-1, 1, 600)).sum().add(entropy.sum() * 0.3).backward()
        results.append((logps, entropy, h.grad, w.grad))
    for kept, recomputed in zip(*results):
        assert recomputed.abs().max() > 0
        torch.testing.assert_close(kept, recomputed, rtol=2e-2, atol=2e-2 * recomputed.abs().max().item())


def samples_of(trainer, prompts, seed=0):
    """Three answers of different lengths (1 to 9 tokens: right padding) to each prompt (different lengths: left
    padding), in TRL's layout."""
    prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
    generator = torch.Generator().manual_seed(seed)
    pairs = [(p, torch.randint(0, 50000, (1 + 4 * k,), generator=generator).tolist())
             for p in prompt_ids for k in range(3)]
    return padded_samples([p for p, _ in pairs], [a for _, a in pairs], trainer._tokenizer.pad_token_id)


def trls(trainer, model, *args, **kwargs):
    """TRL's own per-token log-probs (its padded rows, its fused output layer), given each row's positions from
    its mask (WithPositions): what TRL computes once its position bug is fixed."""
    from tuning.preference.align_trainers import WithPositions

    cls = next(c for c in type(trainer).__mro__ if c.__module__.startswith("trl."))
    return cls._get_per_token_logps_and_entropies(trainer, WithPositions(model), *args, **kwargs)


@pytest.mark.parametrize("family,method,packing", [("gpt2", "rloo", "rows"), ("llama", "grpo", "rows"),
                                                    ("gpt2", "grpo", "flat"), ("llama", "rloo", "none")])
def test_packed_log_probs_and_entropies_are_trls(tmp_path, gpt2_tokenizer, family, method, packing):
    tok = loading.ready_tokenizer(gpt2_tokenizer)
    records, _ = real_pairs(3)
    trainer, prompts = rloo_trainer(tmp_path, tok, records, family=family, method=method, packing=packing)
    ids, mask, keep = samples_of(trainer, prompts)
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 0).any()  # both kinds of padding are there
    ours = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep, compute_entropy=True)
    theirs = trls(trainer, trainer.model, ids, mask, keep, compute_entropy=True)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    assert ours[0].shape == (9, 9) and (ours[0][mask[:, -keep:] == 0] == 0).all()
    if packing == "rows":  # under the run's bf16 autocast, as align.py trains on a CPU with bf16 (eager too)
        trainer.accelerator.autocast_handler = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for attention in ("sdpa", "eager"):
                trainer.model.config._attn_implementation = attention
                ours = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)[0]
                with torch.no_grad():
                    theirs = trls(trainer, trainer.model, ids, mask, keep)[0]
                torch.testing.assert_close(ours.detach(), theirs, rtol=0.03, atol=0.03)


def varied_reward(completions=(), **kwargs):
    """Rewards that differ between answers, so that the advantages (and the loss) are not 0."""
    return [float(len(str(c)) % 7) for c in completions]


varied_reward.score = lambda records, answers: varied_reward(answers)


@pytest.mark.parametrize("family,method", [("gpt2", "rloo"), ("llama", "grpo")])
def test_trls_loss_kl_and_gradients_on_the_same_samples(tmp_path, gpt2_tokenizer, monkeypatch, family, method):
    """One generation batch scored and one loss computed with our log-probs, then again, from the same samples,
    with TRL's own: the advantages (RLOO's include the KL penalty), the KL TRL logs, the loss and the gradients
    agree within 1e-5 in fp32; RLOO's old-policy log-probs, here the sampler's own, cost no forward."""
    tok = loading.ready_tokenizer(gpt2_tokenizer)
    records, _ = real_pairs(3)
    trainer, prompts = rloo_trainer(tmp_path, tok, records, beta=0.05, family=family, method=method,
                                    judge=varied_reward, reward="model")
    with torch.no_grad():  # the policy moved away from the reference: a KL that is not 0
        for parameter in trainer.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    batch = [{"prompt": p, "judge_prompt": p} for p in prompts[:2]] * 2  # TRL's repeated prompts
    trainer.model.train()  # (as in training: TRL logs the KL of the mode the model is in)
    trainer.current_gradient_accumulation_steps = 1  # (set by the training loop; GRPO's loss reads it)
    results = []
    from tuning.preference import align_trainers

    forwards = []  # our forwards over the samples: the reference's only (RLOO's old policy is the sampler's)
    monkeypatch.setattr(align_trainers, "token_logps", lambda *a, **k: forwards.append(1) or token_logps(*a, **k))
    for theirs in (False, True):
        if theirs:
            monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies",
                                lambda model, *a, **k: trls(trainer, model, *a, **k))
        trainer._metrics["train"].clear()
        torch.manual_seed(0)
        inputs = trainer._generate_and_score_completions(batch)
        assert theirs or len(forwards) == 1
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        results.append((inputs, trainer._metrics["train"]["kl"][-1], loss.detach(), grads))
    (ours, our_kl, our_loss, our_grads), (trl, trl_kl, trl_loss, trl_grads) = results
    assert torch.equal(ours["completion_ids"], trl["completion_ids"])  # the same samples
    torch.testing.assert_close(ours["advantages"], trl["advantages"], rtol=1e-5, atol=1e-5)
    assert our_kl == pytest.approx(trl_kl, rel=1e-5, abs=1e-6) and our_kl != 0
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert our_loss.item() != 0
    torch.testing.assert_close(our_grads, trl_grads, rtol=1e-4, atol=1e-6)


def causal_lms() -> int:
    from transformers import GPT2LMHeadModel

    gc.collect()
    return sum(isinstance(o, GPT2LMHeadModel) for o in gc.get_objects())


def test_lora_holds_no_second_model_and_its_reference_is_the_adapters_off(tmp_path, gpt2_tokenizer):
    """Under LoRA the reference is the policy with its adapters off: the trainer loads no copy (without LoRA TRL
    loads one, which this count sees), and the reference log-probs are the SFT model's."""
    from tuning.models import lora

    tok = loading.ready_tokenizer(gpt2_tokenizer)
    records, _ = real_pairs(2)
    before = causal_lms()
    full, prompts = rloo_trainer(tmp_path / "full", tok, records, beta=0.05)
    assert causal_lms() - before == 2 and full.ref_model is not None  # the policy and TRL's reference copy
    sft = full.model
    del full
    before = causal_lms()

    def wrap(policy):
        return lora.add_lora(policy, str(tmp_path / "lora" / "policy"), 4, 8.0, 0.0, seed=0)

    trainer, _ = rloo_trainer(tmp_path / "lora", tok, records, beta=0.05, wrap=wrap)
    assert causal_lms() - before == 1 and trainer.ref_model is None  # the policy alone
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.5)  # trained adapters: the policy is no longer the SFT model
    ids, mask, keep = samples_of(trainer, prompts)
    with trainer.model.disable_adapter():
        reference, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
    policy, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
    expected, _, _ = trls(trainer, sft, ids, mask, keep)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(policy, expected, atol=1e-3)


def test_the_packing_check_sends_a_model_that_mixes_packed_samples_to_padded_rows(tmp_path, gpt2_tokenizer):
    """OPT keeps shared prompts apart through the 4D mask but not samples packed by position ids alone (flat):
    align.py's check finds that, on real prompts."""
    tok = loading.ready_tokenizer(gpt2_tokenizer)
    records, _ = real_pairs(3)
    samples = {}
    for family in ("gpt2", "opt"):
        trainer, prompts = rloo_trainer(tmp_path / family, tok, records, family=family)
        prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
        samples = [(p, prompt_ids[(i + k) % 3][-n:]) for i, p in enumerate(prompt_ids) for k, n in ((1, 8), (2, 3))]
        same = {mode: packing_checks.packed_samples_match(trainer.model, samples, tok.pad_token_id, mode)[0]
                for mode in ("rows", "flat")}
        assert same == ({"rows": True, "flat": True} if family == "gpt2" else {"rows": True, "flat": False})


def test_the_phases_of_each_step_are_timed(tmp_path, gpt2_tokenizer):
    """Two training steps: every phase took time inside them, the sampled tokens are counted, evaluation (outside
    the steps) adds nothing, and the run's totals carry them."""
    from tuning.preference import phases

    tok = loading.ready_tokenizer(gpt2_tokenizer)
    records, _ = real_pairs(4)
    trainer, _ = rloo_trainer(tmp_path, tok, records, beta=0.05, judge=varied_reward)
    trainer.args.max_steps = 2
    trainer.train()
    seconds = dict(trainer.phase_seconds)
    assert all(value > 0 for value in seconds.values()), seconds
    assert trainer.generated_tokens == 2 * 4 * 4  # 2 steps x 4 answers (2 prompts x 2) x 4 new tokens (random weights: no EOS)
    trainer.evaluate()
    assert trainer.phase_seconds == seconds
    totals = trainer.run_totals()
    assert totals["phase_seconds"] == pytest.approx(seconds) and totals["generated_tokens"] == 32
    line = phases.share_line(seconds, 123.4)
    assert line.startswith("Time in the steps: ") and line.endswith("; 123 sampled tokens/s")
    assert all(name in line for name in phases.PHASES.values())


def sampling_setup(tmp_path, gpt2_tokenizer, family):
    """A tiny trainer's policy and its distinct prompts, each repeated 3 times, left-padded (TRL's sampling call)."""
    tok = loading.ready_tokenizer(gpt2_tokenizer)
    records, _ = real_pairs(3)
    trainer, prompts = rloo_trainer(tmp_path, tok, records, family=family)
    prompt_ids = [list(p) for p in dict.fromkeys(map(tuple, trainer._tokenize_prompts(prompts)[0]))]  # distinct
    assert len(prompt_ids) >= 2
    ids, mask, _ = padded_samples([p for p in prompt_ids for _ in range(3)], [[]] * 3 * len(prompt_ids),
                                  tok.pad_token_id)
    return tok, trainer.model, ids, mask


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_sampling_loop_is_generates_given_the_same_draws(tmp_path, gpt2_tokenizer, family, monkeypatch):
    """TRL's sampling call on repeated, left-padded prompts, with each token's draw made the most likely one on
    both sides (torch.multinomial for generate() as it comes, draw_tokens for ours): with each prompt read once,
    the loop of sample_answers, the cache with room and eager attention on a CPU, the same answers as
    generate()'s, in fp32, through the temperature and top-k processors, and each row padded after its stop
    token as generate() pads it; generate() is as it was after."""
    from transformers import GenerationConfig

    from tuning.models import sampler

    tok, model, ids, mask = sampling_setup(tmp_path, gpt2_tokenizer, family)
    with torch.no_grad():  # sharper attention and words than a tiny random model's, so that a difference shows
        for weight in model.parameters():
            weight.mul_(6)
    seen = {False: [], True: []}  # each side's probabilities at each step

    def most_likely(fast):
        return lambda probs, *args, **kwargs: seen[fast].append(probs) or probs.argmax(-1, keepdim=not fast)

    monkeypatch.setattr(torch, "multinomial", most_likely(False))
    monkeypatch.setattr(sampler, "draw_tokens", most_likely(True))

    def both(**settings):
        config = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.7, top_k=20,
                                  pad_token_id=tok.pad_token_id, **settings)
        out = []
        for fast in (False, True):
            seen[fast].clear()
            with torch.no_grad(), sampler.fast_sampling(model) if fast else contextlib.nullcontext():
                out.append(model.generate(input_ids=ids, attention_mask=mask, generation_config=config))
        assert torch.equal(out[0], out[1]) and out[0].shape == (len(ids), ids.shape[1] + 12)
        assert len(seen[True]) == len(seen[False]) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in
                                                           zip(seen[True], seen[False]))
        return out[0]

    drawn = both(eos_token_id=tok.eos_token_id)
    stop = int(drawn[0, ids.shape[1] + 2])  # a token row 0 draws third: as a stop token, rows end early
    stopped = both(eos_token_id=[stop, tok.eos_token_id])
    assert (stopped[0, ids.shape[1] + 3:] == tok.pad_token_id).all()
    assert "generate" not in model.__dict__ and model.config._attn_implementation == "sdpa"  # (as it was after)


def test_the_sampler_draws_each_token_with_its_probability():
    """draw_tokens: over 200,000 draws from rows of known probabilities (some 0, as top-k or top-p leave them),
    each token's share within 0.005 of its probability, and a token of probability 0 never drawn; a NaN row
    refused."""
    from tuning.models.sampler import draw_tokens

    torch.manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.9]])
    drawn = draw_tokens(probs.repeat(100_000, 1)).view(100_000, 2)
    for row in range(2):
        shares = torch.bincount(drawn[:, row], minlength=6) / 100_000
        assert (shares - probs[row]).abs().max() < 0.005
        assert (shares[probs[row] == 0] == 0).all()
    with pytest.MonkeyPatch.context() as patch:  # a uniform number of exactly 0 draws the first token of them
        patch.setattr(torch, "rand", lambda *shape, **kw: torch.zeros(*shape, **kw))  # that has a probability
        assert draw_tokens(probs).tolist() == [1, 0]
    with pytest.raises(RuntimeError, match="NaN, infinite or all zero"):  # (as torch.multinomial refuses it)
        draw_tokens(torch.tensor([[0.5, 0.5], [float("nan"), 0.5]]))


@pytest.mark.parametrize("family", ["llama"])
def test_the_sampler_keeps_generates_distribution_and_leaves_other_calls_to_it(tmp_path, gpt2_tokenizer, family):
    """The first token of 600 samples of each prompt, with top-k 4: ours and generate()'s as it comes fall on the
    same four tokens in shares within 0.08 of each other (the draws differ, the distribution does not); a call
    that is not plain sampling (greedy, several sequences a row, a cache implementation of its own, no cache)
    is generate()'s own, and a batch with no repeated prompt gets no shared prefill."""
    from transformers import GenerationConfig

    from tuning.models import sampler

    tok, model, ids, mask = sampling_setup(tmp_path, gpt2_tokenizer, family)
    config = GenerationConfig(max_new_tokens=1, do_sample=True, top_k=4, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
    rows = torch.arange(len(ids)).repeat_interleave(200)  # each prompt 3 x 200 times
    shares = []
    for fast in (False, True):
        torch.manual_seed(0)
        with torch.no_grad(), sampler.fast_sampling(model) if fast else contextlib.nullcontext():
            first = model.generate(input_ids=ids[rows], attention_mask=mask[rows], generation_config=config)[:, -1]
        shares.append({(int(row) // 3, int(token)): 0 for row, token in zip(rows, first)})
        for row, token in zip(rows, first):
            shares[-1][(int(row) // 3, int(token))] += 1 / 600
    assert shares[0].keys() == shares[1].keys() and len(shares[0]) <= 4 * len(ids) // 3
    assert max(abs(shares[0][key] - shares[1][key]) for key in shares[0]) < 0.08
    plain = {"generation_config": config}
    assert sampler.samples_plainly(model, ids, plain)
    for own in ({"do_sample": False}, {"num_return_sequences": 2}, {"cache_implementation": "static"},
                {"use_cache": False}, {"return_dict_in_generate": True}):
        assert not sampler.samples_plainly(model, ids, {**plain, **own})
    assert sampler.prefilled_cache(model, ids, mask) is not None
    assert sampler.prefilled_cache(model, ids[::3], mask[::3]) is None  # nothing repeats


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_the_update_in_parts_has_the_whole_batchs_loss_and_gradients(tmp_path, gpt2_tokenizer, method):
    """compute_loss taking the gradient a few samples at a time (the answers to a prompt together) gives the loss
    and the gradients of the whole batch at once."""
    tok = loading.ready_tokenizer(gpt2_tokenizer)
    records, _ = real_pairs(4)
    trainer, prompts = rloo_trainer(tmp_path, tok, records, beta=0.05, method=method, judge=varied_reward)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([{"prompt": p, "judge_prompt": p} for p in prompts[-3:]] * 2)
    results = []
    for tokens in (10**6, 1):
        trainer.UPDATE_TOKENS = tokens  # the whole batch at once, then one sample a part
        assert len(trainer.update_parts(inputs)) == (1 if tokens > 1 else 6)
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in trainer.model.parameters()
                                                   if p.grad is not None])))
    (whole, whole_grads), (parts, part_grads) = results
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)  # (RLOO's: about 0, its advantages centred)
    torch.testing.assert_close(part_grads, whole_grads, rtol=1e-4, atol=1e-4 * whole_grads.abs().max().item())
    assert whole_grads.abs().max() > 1e-3


def test_gpt2s_activation_runs_as_one_kernel_with_the_same_outputs(tmp_path, gpt2_tokenizer):
    """fuse_activations: GPT-2's gelu_new modules become the fused tanh-GELU kernel, one per layer, with the
    same logits and gradients within 1e-5 in fp32 and the same saved weights; the online trainer's policy has no
    unfused one left."""
    import copy

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.activations import NewGELUActivation

    from tuning.models.activations import fuse_activations

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=3, n_head=2, n_positions=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    with torch.no_grad():  # large enough inputs to the activation that its tanh is not flat
        for weight in model.parameters():
            weight.mul_(4)
    fused = copy.deepcopy(model)
    assert fuse_activations(fused) == 3 and fuse_activations(fused) == 0
    ids = torch.randint(0, 300, (2, 20))
    outs = []
    for m in (model, fused):
        logits = m(ids).logits
        logits.square().mean().backward()
        outs.append((logits, torch.cat([p.grad.flatten() for p in m.parameters()])))
    assert outs[0][0].abs().max() > 1
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    scale = outs[0][1].abs().max()  # (large here, from the scaled weights)
    torch.testing.assert_close(outs[1][1] / scale, outs[0][1] / scale, rtol=1e-5, atol=1e-5)
    assert fused.state_dict().keys() == model.state_dict().keys() and fused.config.activation_function == "gelu_new"
    tok = loading.ready_tokenizer(gpt2_tokenizer)
    trainer, _ = rloo_trainer(tmp_path, tok, real_pairs(2)[0])
    assert not any(isinstance(m, NewGELUActivation) for m in trainer.model.modules())
