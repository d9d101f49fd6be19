"""The aligning trainers of align.py: TRL's DPOTrainer and RLOOTrainer with the run layer mixed in
(trainer.RunLayer: run totals, the NaN guard, template in each checkpoint), fed exactly the tokens the SFT
model saw, and evaluated the way metrics.json reports them.

- DPO trains on pairs tokenized by preferences.tokenize_pairs (the SFT template's prompt, each answer + EOS),
  not TRL's text tokenization. Its reference log-probs are computed once, before training, by the frozen
  SFT model (TRL's precompute_ref_log_probs), so no second model stays in memory.
- RLOO and GRPO encode prompts as inference.py does (a text as templates.encode_prompt, a conversation with the
  SFT model's chat template), read the log-probs of their samples packed, at the answer tokens only
  (models/sampled_logps.py), score them with a reward model through models/scoring.py, which reads the score at the
  answer's final token, and time each phase of a step (phases.py).
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager, nullcontext

import torch
from trl import DPOTrainer, GRPOTrainer, RLOOTrainer

from tuning.data.collate import PairCollator, positions_from_mask
from tuning.data.chat_template import answer_tokens, encode_prompts, prompt_ids, saved_or_ours
from tuning.models.activations import fuse_activations
from tuning.models.loading import context_limit
from tuning.models.scoring import end_length, load_reward_model, pairwise_stats, score_ids, score_samples
from tuning.models.scoring import within_context
from tuning.models.sampled_logps import enable_sampled_logps, padded_samples, token_logps
from tuning.models.sampler import fast_sampling
from tuning.models.sequence_logps import answer_lengths, dpo_losses, enable_sequence_logps, model_inputs
from tuning.preference import rewards
from tuning.preference.phases import PHASES, PhaseTimes
from tuning.runs.trainer import RunLayer, report_targets

# TRL 1.16 still uses transformers' old names for activation checkpointing.
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)


class AlignDPOTrainer(RunLayer, DPOTrainer):
    """TRL's DPOTrainer on pairs tokenized as SFT tokenized them, laid out by collate.PairCollator (packed, no
    padding) and scored at the answer tokens only, with TRL's loss of its config's loss_type (align.py's
    --loss-type, computed by sequence_logps.dpo_losses). The reference log-probs are TRL's precomputed ones,
    from the same forward. Held-out evaluation: each pair's implicit-reward margin
    beta * ((log pi - log ref)(chosen) - (log pi - log ref)(rejected)), summarized by scoring.pairwise_stats:
    accuracy with ties counted half (exactly 50% before training, where the policy is the reference) and the
    mean margin, whatever the loss type; and the loss trained on, averaged over the pairs."""

    COUNTS = {"num_real_tokens": "real_tokens", "num_pairs": "pairs"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        drop_ref_adapter(self.model)
        (self.loss_type,) = self.loss_types  # one loss (align.py's --loss-type), never TRL's weighted mix of several

    in_order = False  # train on the pairs in their order (a random draw already: align.pairs_the_run_sees)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # already tokenized as SFT tokenized it: {"prompt_ids", "chosen_ids", "rejected_ids"}

    def _get_train_sampler(self, train_dataset=None):
        from torch.utils.data import SequentialSampler

        if self.in_order:  # each process takes its share of each batch, as with the random sampler
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
        return super()._get_train_sampler(train_dataset)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """`dataset` with the reference's (the SFT model's, before any step) log-probs of each pair's answers as
        two new columns. Each process scores every world_size-th pair and all get every value; TRL's own
        version shares them through a cache file that in-memory datasets keep in a per-process temp dir."""
        from accelerate.utils import gather_object
        from tqdm.auto import tqdm

        mine = range(self.args.process_index, len(dataset), self.args.world_size)
        values = []
        with tqdm(total=len(mine), desc=f"Reference log-probs ({name})", unit="pair",
                  disable=not self.is_world_process_zero() or len(mine) < 1000) as bar:
            for batch, real in self.evaluation_batches(dataset):
                with without_adapters(self.model):  # under LoRA, the SFT model is the policy without them
                    chosen, rejected = self.compute_ref_log_probs(self.model, batch)
                values += zip(chosen[:real].tolist(), rejected[:real].tolist())
                bar.update(real)
        indexed = list(zip(mine, values))
        ordered = [value for _, value in sorted(gather_object(indexed) if self.args.world_size > 1 else indexed)]
        return (dataset.add_column("ref_chosen_logps", [chosen for chosen, _ in ordered])
                .add_column("ref_rejected_logps", [rejected for _, rejected in ordered]))

    def compute_ref_log_probs(self, model, inputs):
        """(chosen, rejected) answer log-probs of `model` on a batch, without gradients."""
        with torch.no_grad(), self.accelerator.autocast():
            logps = model(**model_inputs(inputs)).logits
        return logps[0::2], logps[1::2]

    def pair_losses(self, batch, chosen, rejected):
        """(each pair's loss, margins) of the batch, from the policy's answer log-probs `chosen` and `rejected`:
        the run's loss type with TRL's beta and label_smoothing, as TRL's own _compute_loss would compute it."""
        tokens = answer_lengths(batch)
        return dpo_losses(self.loss_type, chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                          self.beta, self.label_smoothing, tokens[0::2], tokens[1::2])

    def _compute_loss(self, model, inputs, return_outputs):
        logps = model(**model_inputs(inputs)).logits
        losses, margins = self.pair_losses(inputs, logps[0::2], logps[1::2])
        loss = losses.mean()
        margins = self.accelerator.gather(margins.detach())
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["rewards/margins"].append(margins.mean().item())
        # Ties count half, as in the held-out accuracy (scoring.pairwise_stats): 50% at the start, not 0%.
        self._metrics[mode]["rewards/accuracies"].append(pairwise_stats(margins)["accuracy"])
        return (loss, None) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval") -> dict:
        from accelerate.utils import gather_object

        margins, losses, started = [], [], time.perf_counter()
        for batch, real in self.evaluation_batches(eval_dataset):
            # The policy's log-probs, computed the same way as the precomputed reference's (so 0 margins at start).
            chosen, rejected = self.compute_ref_log_probs(self.model, batch)
            pair_losses, pair_margins = self.pair_losses(batch, chosen.double(), rejected.double())
            margins += pair_margins[:real].tolist()
            losses += pair_losses[:real].tolist()
        if self.args.world_size > 1:
            margins, losses = gather_object(margins), gather_object(losses)
        stats = {**pairwise_stats(margins), "loss": float(torch.tensor(losses, dtype=torch.float64).mean())}
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in stats.items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - started, 4)
        return {**self.report_evaluation(metrics), f"{metric_key_prefix}_margins": margins}


class OnlineLayer:
    """What align.py's online RL trainers (TRL's RLOO and GRPO) share: prompts encoded as inference.py encodes
    them, and the sampled answers' log-probs read packed, at the answer tokens only, at the positions they were
    sampled at (models/sampled_logps.py: the policy's, the old policy's and the reference's; the same values as
    TRL's own forwards, tested), with the phases of each step timed (PhaseTimes, mixed in before this class: the
    run's totals keep them across a resume). `judge(records, answers) ->
    rewards` scores answers (texts) to prompt records, as the training rewards add up (rewards.Scorer). Held-out
    evaluation on the eval set's prompts: the mean reward of greedy answers, as inference.py would give them, the
    share of them cut off at --max-new-tokens, and the KL to the reference over answers sampled at the training
    temperature (kl_to_reference)."""

    COUNTS = {"num_real_tokens": "real_tokens", "num_completions": "completions"}
    # How samples are laid out for their log-probs (collate.pack_samples): packed rows, or one padded row each for a
    # model that lets packed sequences attend to each other (align.py checks, as for DPO's pairs).
    sample_packing = "rows"
    # Tokens (prompt + answer, of the samples) per forward and backward of the policy update: its activations are
    # the most memory a step takes, so a batch with more goes through in parts of about this many.
    UPDATE_TOKENS = 1024

    def __init__(self, *args, judge=None, **kwargs):
        super().__init__(*args, **kwargs)
        drop_ref_adapter(self.model)  # TRL's RLOO then takes the reference with the adapters off
        enable_sampled_logps(self.model)
        fuse_activations(self.model)  # (GPT-2's GELU in one kernel: less memory in the update, the same function)
        if self.ref_model is not None:  # (under LoRA there is none: the reference is the policy, adapters off)
            enable_sampled_logps(self.accelerator.unwrap_model(self.ref_model))
            fuse_activations(self.ref_model)
        self.judge = judge
        self._drawn = None  # (answers, their log-probs) from the sampler, for RLOO's old policy (drawn_logps)
        self._loss_inputs = None  # the batch whose loss is being computed, when its old log-probs are the update's

    def run_totals(self) -> dict:
        """RunLayer's totals, and the seconds of each phase (mean over processes) and tokens sampled (summed)."""
        totals = super().run_totals()
        here = torch.tensor([self.phase_seconds[phase] for phase in PHASES] + [self.generated_tokens],
                            dtype=torch.float64, device=self.args.device)
        seconds = self.accelerator.reduce(here[:-1].clone(), reduction="mean").tolist()
        tokens = self.accelerator.reduce(here[-1:].clone(), reduction="sum").item()
        before = self.prior.get("phase_seconds") or {}
        totals["phase_seconds"] = {phase: before.get(phase, 0.0) + value for phase, value in zip(PHASES, seconds)}
        totals["generated_tokens"] = int(self.prior.get("generated_tokens", 0) + tokens)
        return totals

    def batch_counts(self, inputs) -> dict:
        return {}  # prompts only: counted once their answers are generated (_prepare_inputs)

    def _generate_single_turn(self, *args, **kwargs):
        """TRL's sampling (training's, and the held-out KL's) by models/sampler.py: each prompt read once for its
        answers, our decoding loop, on a CPU eager attention; inference.py's greedy answers (greedy_answers) are
        left as they are. Under mixed precision, inside one autocast context: the model's forward enters its own
        at every token, and a context's exit empties the cache of weights cast to bf16 unless one encloses it, so
        that every weight would be cast again at every token (on a CPU, the output layer's cast took as long as
        its product)."""
        record = [] if self.old_policy_is_sampler() else None
        with fast_sampling(self.accelerator.unwrap_model(self.model), record), self.accelerator.autocast():
            answers = super()._generate_single_turn(*args, **kwargs)
        self._drawn = (answers, record[0]) if record and len(record) == 1 and record[0] is not None and \
            isinstance(answers, list) else None
        return answers

    def old_policy_is_sampler(self) -> bool:
        """Whether TRL's RLOO would take the old policy's log-probs from a forward of the very model that sampled:
        in training, one update per batch sampled (num_iterations 1, one generation per optimizer step), sampled by
        our sampler (not vLLM). RLOO then reads them twice, both served without that forward: the KL penalty in
        its rewards reads the sampler's own log-probs of the tokens it drew (drawn_logps), and its loss's ratio
        reads the policy's log-probs from the update's own forward, detached (_compute_loss): a ratio of exactly 1
        in value, as TRL's second forward of the same weights gives it. GRPO computes no old log-probs then."""
        return isinstance(self, RLOOTrainer) and self.model.training and not self.use_vllm and \
            self.num_iterations == 1 and self.args.steps_per_generation == self.args.gradient_accumulation_steps

    def drawn_logps(self, input_ids, logits_to_keep: int):
        """The sampler's log-probs of the answers of TRL's batch (rows, logits_to_keep), 0 after each answer;
        None unless they are that batch's answers. Used once."""
        (answers, logps), self._drawn = self._drawn, None
        completions = input_ids[:, -logits_to_keep:]
        if len(answers) != len(completions):
            return None
        out = torch.zeros(completions.shape, dtype=torch.float32, device=completions.device)
        for i, answer in enumerate(answers):
            if len(answer) > logps.shape[1] or completions[i, :len(answer)].tolist() != list(answer):
                return None
            out[i, :len(answer)] = logps[i, :len(answer)]
        return out

    def _compute_loss(self, model, inputs):
        """TRL's loss; where the old policy is the policy itself (old_policy_is_sampler), its log-probs are the
        update's own, detached (set by _get_per_token_logps_and_entropies as it computes them)."""
        if not self.old_policy_is_sampler() or "old_logps" not in inputs:
            return super()._compute_loss(model, inputs)
        self._loss_inputs = dict(inputs)
        try:
            return super()._compute_loss(model, self._loss_inputs)
        finally:
            self._loss_inputs = None

    def _tokenize_prompts(self, prompts: list):
        """Each prompt's ids as inference.py encodes it: a text (encode_prompt), or a conversation rendered with
        the SFT model's chat template (the tokenizer's, saved with the model), its next assistant turn's prompt."""
        return encode_prompts(self._tokenizer, prompts), None, {}

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)
        if self.model.training:
            self._session["real_tokens"] += int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
            self._session["completions"] += len(inputs["completion_ids"])
        return inputs

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **inputs):
        """The per-token log-probs (and entropies) of the sampled answers that TRL's loss and KL read, laid out as
        TRL's: packed, each sample at the positions generate() gave it, the output layer at its answer tokens only
        (sampled_logps.token_logps). A mixture-of-experts' balancing loss, or a batch with no answer token, goes
        through TRL's own forward, with each row's positions taken from its attention mask (TRL passes none, and
        GPT-2 or OPT would number the left padding of a short prompt as positions)."""
        if self._drawn is not None and model is self.model and not torch.is_grad_enabled() and \
                not compute_entropy and not compute_aux_loss:  # RLOO's old policy: the sampler's log-probs
            logps = self.drawn_logps(input_ids, logits_to_keep)
            if logps is not None:
                return logps, None, None
        if compute_aux_loss or any(value is not None for value in inputs.values()) or \
                not attention_mask[:, -logits_to_keep:].any():
            out = super()._get_per_token_logps_and_entropies(WithPositions(model), input_ids, attention_mask,
                                                              logits_to_keep, batch_size, compute_entropy,
                                                              compute_aux_loss, **inputs)
        else:
            with self.accelerator.autocast():
                out = token_logps(model, input_ids, attention_mask, logits_to_keep, self._tokenizer.pad_token_id,
                                  self.temperature, compute_entropy, self.sample_packing) + (None,)
        if self._loss_inputs is not None and torch.is_grad_enabled():  # (see _compute_loss)
            self._loss_inputs["old_logps"] = (out[0].detach() * self._loss_inputs["completion_mask"]).sum(1)
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss, its gradient taken a part of the batch at a time (update_parts): each part's backward runs
        here but the last's, which the Trainer runs on the returned loss (the whole batch's value), so the
        gradients are the whole batch's while only a part's activations are held."""
        parts = self.update_parts(inputs)
        if len(parts) == 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        done = 0.0
        with self.accelerator.autocast():  # (one context around the parts: each weight cast to bf16 once, not per part)
            for part, weight in parts[:-1]:
                with self.accelerator.no_sync(model):  # (under DDP, the gradients are shared once, at the last part)
                    loss = super().compute_loss(model, part, return_outputs, num_items_in_batch) * weight
                    self.accelerator.backward(loss)
                done += loss.detach()
            part, weight = parts[-1]
            return super().compute_loss(model, part, return_outputs, num_items_in_batch) * weight + done

    def update_parts(self, inputs: dict) -> list[tuple[dict, float]]:
        """(part of the batch, its weight in the loss) for compute_loss: the samples ordered by prompt, so that the
        answers to one prompt share it in a part's forward, in parts of about UPDATE_TOKENS tokens (as many parts in
        every process, as the loss's collectives need: the most any process needs). The whole batch as one part
        where it has fewer tokens, or where TRL's loss is not a weighted
        sum of its parts' (GRPO's loss types other than its default dapo, an entropy quantile or bonus, a mixture of
        experts' balancing loss), or where the Trainer's backward scales it (gradient accumulation, DeepSpeed)."""
        rows, grpo = len(inputs["completion_ids"]), isinstance(self, GRPOTrainer)
        summed = grpo and self.loss_type == "dapo" and self.top_entropy_quantile == 1.0 and \
            not self._entropy_bonus_enabled  # (a bonus of each part's mean entropy would count once per part)
        if (grpo and not summed) or self.aux_loss_enabled or self.is_deepspeed_enabled or \
                getattr(self, "current_gradient_accumulation_steps", 1) != 1:
            return [(inputs, 1.0)]
        tokens = int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
        count = torch.tensor([min(rows, -(-tokens // self.UPDATE_TOKENS))], device=inputs["completion_ids"].device)
        count = int(self.accelerator.gather(count).max()) if self.accelerator.num_processes > 1 else int(count)
        if count <= 1:
            return [(inputs, 1.0)]
        size = -(-rows // count)
        prompts = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(inputs["prompt_ids"], inputs["prompt_mask"])]
        place = {}  # each prompt: where it first comes
        for i, prompt in enumerate(prompts):
            place.setdefault(prompt, i)
        order = sorted(range(rows), key=lambda i: (place[prompts[i]], i))
        parts = []
        for start in range(0, rows, size):
            index = torch.tensor(order[start:start + size], device=inputs["completion_ids"].device)
            part = {key: value[index] if isinstance(value, torch.Tensor) and value.dim() and len(value) == rows
                    else value for key, value in inputs.items()}
            # GRPO's dapo loss divides by the whole batch's token count (num_items_in_batch): its parts just add up.
            parts.append((part, 1.0 if summed else len(index) / rows))  # RLOO's: the mean over the samples
        return parts

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval") -> dict:
        from accelerate.utils import gather_object

        started = time.perf_counter()
        self.on_device()
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        mine = [dataset[i] for i in range(self.args.process_index, len(dataset), self.args.world_size)]
        was_training = self.model.training
        self.model.eval()
        try:
            greedy = self.greedy_answers(mine)
            kl = self.kl_to_reference(mine, self.sampled_answers(mine))
        finally:
            self.model.train(was_training)
        rewards = list(self.judge(mine, [answer["raw_text"] for answer in greedy]))
        cut = [float(not answer["stopped_at_eos"]) for answer in greedy]
        if self.args.world_size > 1:
            rewards, kl, cut = gather_object(rewards), gather_object(kl), gather_object(cut)
        metrics = {f"{metric_key_prefix}_mean_reward": sum(rewards) / max(1, len(rewards)),
                   f"{metric_key_prefix}_kl": None if kl[:1] == [None] else sum(kl) / max(1, len(kl)),
                   f"{metric_key_prefix}_truncated": sum(cut) / max(1, len(cut)),
                   f"{metric_key_prefix}_runtime": round(time.perf_counter() - started, 4)}
        return {**self.report_evaluation(metrics), f"{metric_key_prefix}_rewards": rewards}

    @torch.no_grad()
    def greedy_answers(self, records: list[dict]) -> list[dict]:
        """Each record's greedy answer exactly as inference.py gives it (generation.generate, raw text kept): the
        model's own generation config, in fp32 even where training runs under autocast."""
        from tuning.generation.generate import generate

        model = self.accelerator.unwrap_model(self.model)
        with self.forked_rng(), without_autocast(model):
            return generate(model, self._tokenizer, [record["prompt"] for record in records],
                            {"max_new_tokens": self.max_completion_length, "do_sample": False}, self.args.seed,
                            self.args.per_device_eval_batch_size, raw=True)

    @torch.no_grad()
    def sampled_answers(self, records: list[dict]) -> list[list[int]]:
        """Each record's answer ids sampled by TRL's own training sampler (its generation config: the training
        temperature, no repetition penalty, under the run's precision), cut after the first stop token, which is
        kept. Seeded, so each evaluation of a policy draws the same samples (not with --vllm, whose sampler has its
        own seed), and training's RNG is left as it was."""
        with self.forked_rng():
            torch.manual_seed(self.args.seed)
            prompt_ids, _, _ = self._tokenize_prompts([record["prompt"] for record in records])
            out, size = [], self.args.per_device_eval_batch_size
            for start in range(0, len(prompt_ids), size):
                out += self.sample_ids(prompt_ids[start:start + size])
        return out

    def sample_ids(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """One answer's ids for each prompt, from TRL's training sampler (each trainer's own call)."""
        raise NotImplementedError

    def forked_rng(self):
        """A context whose random draws leave this process's CPU and device RNG as they were."""
        device = self.args.device  # this process's accelerator only (none on CPU), whatever else the machine has
        return torch.random.fork_rng(devices=[] if device.type == "cpu" else [device.index or 0],
                                     device_type=None if device.type == "cpu" else device.type)

    @torch.no_grad()
    def kl_to_reference(self, records: list[dict], answers: list[list[int]]) -> list[float | None]:
        """An estimate of KL(pi || ref) from each answer, sampled from the policy at the training temperature:
        the sum over its tokens of k3 = exp(d) - d - 1, d = log ref - log pi (unbiased, never below 0, less noisy
        than log pi - log ref), both models' log-probs at that temperature, as TRL's loss uses them, and read at
        the answer tokens only, as in training. None where there is no reference model (--beta 0)."""
        if self.beta == 0:
            return [None] * len(answers)
        values, pad = [], self._tokenizer.pad_token_id
        for start in range(0, len(records), self.args.per_device_eval_batch_size):
            chunk = range(start, min(len(records), start + self.args.per_device_eval_batch_size))
            prompts = encode_prompts(self._tokenizer, [records[i]["prompt"] for i in chunk])
            ids, mask, right = padded_samples(prompts, [answers[i] for i in chunk], pad, self.args.device)
            logps = []
            for reference in (False, True):  # the reference: TRL's copy of the SFT model, or (LoRA) adapters off
                model = self.ref_model if reference and self.ref_model is not None else self.model
                with without_adapters(model) if reference else nullcontext():
                    logps.append(self._get_per_token_logps_and_entropies(model, ids, mask, right)[0].double())
            d = (logps[1] - logps[0]) * mask[:, -right:]
            values += (d.exp() - d - 1).sum(-1).tolist()
        return values


class AlignRLOOTrainer(PhaseTimes, OnlineLayer, RunLayer, RLOOTrainer):
    """TRL's RLOO (REINFORCE with each answer's baseline the mean reward of the other answers to its prompt), with
    OnlineLayer and the run layer."""

    def sample_ids(self, prompt_ids):
        return self._generate_single_turn(prompt_ids, None, {})


class AlignGRPOTrainer(PhaseTimes, OnlineLayer, RunLayer, GRPOTrainer):
    """TRL's GRPO (each answer's advantage its reward less the mean of its prompt's group, over their standard
    deviation; a clipped objective), with OnlineLayer and the run layer."""

    def sample_ids(self, prompt_ids):
        return self._generate_single_turn(prompt_ids, None, {}, 1)[0]  # (ids, sampler log-probs): the ids


def drop_ref_adapter(model) -> None:
    """Removes TRL's frozen "ref" copy of fresh (B = 0) adapters, which would be saved: the reference is them off."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


class WithPositions:
    """`model`, called with each row's position ids taken from its attention mask (collate.positions_from_mask, as
    generate() numbers a left-padded row) unless the call passes its own."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, attention_mask=None, position_ids=None, **kwargs):
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)
        return self.model(*args, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@contextmanager
def without_autocast(model):
    """A context in which `model`'s forward runs without the mixed-precision autocast that accelerate wrapped
    around it when the trainer prepared it: in fp32, as a model freshly loaded by inference.py runs."""
    wrapped, original = model.__dict__.get("forward"), model.__dict__.get("_original_forward")
    if wrapped is None or original is None:  # not wrapped (fp32 training, or a peft model's inner model)
        yield model
        return
    model.forward = original
    try:
        yield model
    finally:
        model.forward = wrapped


def without_adapters(model):
    """A context in which a peft model runs without its LoRA adapters (the model it started from); for any
    other model, a context that changes nothing."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


class Judge:
    """A reward model (reward.py's output dir) as RLOO's reward function and as the evaluation's judge. Each
    answer is scored, exactly as decoded, after its prompt formatted with the reward model's own template, or,
    for a conversation, rendered with its chat template ("judge_prompt"); in training, under the run's mixed
    precision (as TRL scores), held out in fp32. In training, an answer cut off at
    --max-new-tokens (no stop token among `stop_ids`) is scored as if it had ended there, minus
    `missing_eos_penalty`: a cut answer must not pass for a finished one."""


    def __init__(self, path: str, device, batch_size: int = 16, missing_eos_penalty: float = 0.0):
        self.model, self.tokenizer, self.template = load_reward_model(path, device)
        fuse_activations(self.model)  # (GPT-2's GELU in one kernel: the same scores, a little faster)
        self.chat_template = saved_or_ours(self.tokenizer, self.template)
        self.turn_end = end_length(self.tokenizer, [], self.chat_template)  # a conversation's end-of-turn length
        self.batch_size, self.missing_eos_penalty, self.stop_ids = batch_size, missing_eos_penalty, ()
        self.shares = None  # whether the answers to a prompt share it when scored (checked on the first call)
        self.autocast = nullcontext  # training's mixed precision, which scores the samples (set by build_trainer)

    def __call__(self, prompts=None, completions=(), judge_prompt=(), completion_ids=None, **kwargs) -> list[float]:
        # TRL gives a conversation's answers as one assistant turn each: [{"role": "assistant", "content": ...}]
        completions = [answer[-1]["content"] if isinstance(answer, list) else answer for answer in completions]
        parts = [self.parts(p, a) for p, a in zip(judge_prompt, completions)]
        with self.autocast() if completion_ids is not None else nullcontext():  # (training: TRL gives the ids)
            rewards = self.scores(parts)
        if completion_ids is None or not self.missing_eos_penalty:
            return rewards
        if not self.stop_ids:
            raise ValueError("Judge.stop_ids is not set: every answer would count as cut off")
        return [reward - self.missing_eos_penalty * (not ids or ids[-1] not in self.stop_ids)
                for reward, ids in zip(rewards, completion_ids)]

    def scores(self, parts: list[tuple[list[int], list[int]]]) -> list[float]:
        """The score of each (prompt ids, answer ids), --batch-size x --num-generations at a time: the answers to a
        prompt sharing it (scoring.score_samples) once the reward model has given the same scores so as one padded
        row each on the first answers it reads (two prompts, each with two answers), else one padded row each."""
        pad = self.tokenizer.pad_token_id
        if self.shares is None and len(parts) >= 2:
            (p, a), (q, b) = parts[0], next((part for part in parts if part[0] != parts[0][0]), parts[1])
            probe = [(p, a), (p, b), (q, b), (q, a)]  # two prompts (where there are), each with two answers
            with torch.autocast(self.model.device.type, enabled=False):  # (compared in fp32)
                padded = score_ids(self.model, [x + y for x, y in probe], pad, self.batch_size)
                try:
                    shared = score_samples(self.model, [x for x, _ in probe], [y for _, y in probe], pad)
                except Exception:  # a model that builds its attention bias from a 2D mask (BLOOM's ALiBi)
                    shared = [float("nan")] * len(probe)
            self.shares = bool(torch.allclose(torch.tensor(padded), torch.tensor(shared), rtol=1e-4, atol=1e-4))
        if not self.shares:
            return score_ids(self.model, [p + a for p, a in parts], pad, self.batch_size)
        out = []
        for start in range(0, len(parts), self.batch_size):
            chunk = parts[start:start + self.batch_size]
            out += score_samples(self.model, [p for p, _ in chunk], [a for _, a in chunk], pad)
        return out

    def parts(self, prompt, answer: str) -> tuple[list[int], list[int]]:
        """(prompt, answer + its end: EOS, or the chat template's end-of-turn) as the reward model reads them.
        Re-encoding decoded text can take more tokens than were sampled (a character cut mid-way, another
        tokenizer), so an answer is cut to fit the reward model's context (align.py checks that every prompt
        leaves room for --max-new-tokens)."""
        end = self.turn_end if isinstance(prompt, list) else 1  # the chat template's end-of-turn, or EOS
        asked = prompt_ids(self.tokenizer, prompt, self.chat_template)
        ids = within_context(asked + answer_tokens(self.tokenizer, prompt, answer, self.chat_template),
                             context_limit(self.model.config), end)
        return ids[:len(asked)], ids[len(asked):]

    def score(self, records: list[dict], answers: list[str]) -> list[float]:
        return self(completions=answers, judge_prompt=[record["judge_prompt"] for record in records])


# The sampler draws answers from the policy itself, so that the loss and the KL estimate, which read the policy's
# log-probs, are about the distribution sampled: TRL sets the temperature, top-k, top-p and repetition penalty,
# and these turn off what a model's own generation config could add (an SFT model saved with no_repeat_ngram_size).
POLICY_SAMPLING = {"no_repeat_ngram_size": 0, "min_new_tokens": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
                   "eta_cutoff": 0.0, "num_beams": 1}  # (min_new_tokens overrides a min_length: setting both warns)


def trl_config(args, device, precision: str):
    """TRL's DPOConfig, RLOOConfig or GRPOConfig from align.py's settings. All run without dropout (the log-probs
    that the loss compares must be the policy's own, not a random subnetwork's: TRL's DPO default, not its RLOO or
    GRPO one) and with gradient checkpointing only when asked; RLOO and GRPO sample with vLLM in this process with --vllm; DPO computes the reference log-probs once, before
    training, instead of keeping a second model, and holds --loss-type (and robust's --label-smoothing) as TRL's
    own loss settings, which AlignDPOTrainer's loss reads. RLOO and GRPO weigh several rewards by --reward-weights."""
    from trl import DPOConfig, GRPOConfig, RLOOConfig

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    common = dict(
        output_dir=args.output_dir, num_train_epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr,
        lr_scheduler_type="linear", warmup_steps=args.warmup_ratio, eval_strategy="steps", eval_steps=args.eval_steps,
        save_strategy="steps", save_steps=args.save_steps, save_total_limit=2, logging_steps=args.logging_steps,
        seed=args.seed, bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device.type == "cpu",
        ddp_backend="gloo" if device.type == "cpu" and distributed else None, remove_unused_columns=False,
        dataloader_pin_memory=device.type == "cuda", report_to=report_targets(args.report_to, args.output_dir),
        gradient_checkpointing=args.gradient_checkpointing, ddp_find_unused_parameters=None,  # align.py sets it
        beta=args.beta, disable_dropout=True)
    if args.method == "dpo":
        return DPOConfig(**common, per_device_train_batch_size=args.batch_size,
                         per_device_eval_batch_size=args.batch_size, max_length=None, precompute_ref_log_probs=True,
                         loss_type=[args.loss_type],  # of the losses offered, robust alone reads label_smoothing
                         label_smoothing=args.label_smoothing if args.loss_type == "robust" else 0.0)
    completions = args.batch_size * args.num_generations  # TRL counts a batch in sampled answers
    config = GRPOConfig if args.method == "grpo" else RLOOConfig
    return config(**common, per_device_train_batch_size=completions, per_device_eval_batch_size=completions,
                  num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
                  temperature=args.temperature,  # (vLLM's sampler reads none of POLICY_SAMPLING's settings)
                  generation_kwargs=None if getattr(args, "vllm", False) else dict(POLICY_SAMPLING),
                  reward_weights=rewards.weights_of(args.reward, args.reward_weights),
                  use_vllm=getattr(args, "vllm", False), vllm_mode="colocate")  # (vLLM inside this process)


def build_trainer(args, policy, tokenizer, training_args, data: dict, judge, callbacks, checkpoint_files,
                  packing: str = "rows", in_order: bool = False):
    """The method's trainer on the prepared data (DPO's batches and online RL's samples laid out by `packing`, a
    data/collate.py mode;
    with `in_order`, DPO trains on its pairs in their order, already drawn at random: align.pairs_the_run_sees)."""
    common = dict(model=policy, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
                  processing_class=tokenizer, callbacks=callbacks, checkpoint_files=checkpoint_files)
    if args.method == "dpo":
        multiple = 8 if training_args.device.type == "cuda" else None
        trainer = AlignDPOTrainer(**{**common, "model": enable_sequence_logps(policy)},
                                  data_collator=PairCollator(tokenizer.pad_token_id, packing, multiple))
        trainer.in_order = in_order
        return trainer
    online = AlignGRPOTrainer if args.method == "grpo" else AlignRLOOTrainer
    functions = rewards.build(args.reward, judge)
    trainer = online(**common, reward_funcs=functions,
                     judge=rewards.Scorer(functions, rewards.weights_of(args.reward, args.reward_weights)).score)
    trainer.sample_packing = packing
    if judge is not None:
        judge.stop_ids = trainer.eos_token_ids  # what ends an answer in generation
        judge.autocast = trainer.accelerator.autocast
    return trainer
