"""Tune the SFT model toward preferences with DPO, RLOO or GRPO, through TRL (step 3 of InstructGPT).

    python align.py                    # DPO: distilgpt2-alpaca/ on Anthropic/hh-rlhf -> distilgpt2-alpaca-aligned/
    python align.py --method rloo --reward-model distilgpt2-alpaca-rm   # online RL against reward.py's model
    python align.py --method grpo --reward exact --dataset math.json    # GRPO, rewarded for the reference answer
    python align.py --smoke            # offline, after train.py --smoke and reward.py --smoke: smoke-run/aligned-dpo/
    torchrun --nproc_per_node 2 align.py   # DDP; `accelerate launch` works too

DPO learns from the preference pairs alone; its reference is the frozen SFT model, and --beta sets how far
the policy may move from it (--loss-type: DPO's own loss, or IPO's, SLiC's hinge or robust DPO's). RLOO samples
--num-generations answers per prompt, scores them with the reward model (or --reward: a check against each
record's reference answer, or your own function), and keeps near the SFT model with a KL penalty (--beta); GRPO
does the same with each answer's reward compared with the mean of its prompt's group. The output dir is a normal
model dir: `python inference.py --base distilgpt2-alpaca --finetuned distilgpt2-alpaca-aligned` compares them.
Running the same command again after an interruption continues from the newest checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys

from tuning.runs import checks, launchers, runner

# ---- settings (each has a flag: BATCH_SIZE -> --batch-size) ----
MODEL = "distilgpt2-alpaca"  # the SFT model (train.py's output dir): the policy starts from it, and it is the reference
METHOD = "dpo"  # dpo|rloo|grpo: DPO on preference pairs, or online RL (RLOO, GRPO) rewarded by --reward
DATASET = "Anthropic/hh-rlhf"  # dpo: preference pairs; rloo, grpo: their prompts, or any records train.py reads
REWARD = "model"  # rloo, grpo: model (--reward-model), exact or contains (the record's reference), FILE.py:FUNCTION; or a comma list
REWARD_WEIGHTS = ""  # rloo, grpo: one weight per --reward, a comma list; empty = 1 each
REWARD_MODEL = ""  # rloo, grpo with --reward model: the reward model (reward.py's output dir) that scores the answers
OUTPUT_DIR = "distilgpt2-alpaca-aligned"  # checkpoints, the aligned model, metrics.json, run_config.json, a plot
BETA = -1.0  # how far the policy may move from the SFT model (DPO beta, KL coefficient); -1 = 0.1 dpo, 0.05 rloo, 0.04 grpo
LOSS_TYPE = "sigmoid"  # dpo: TRL's loss sigmoid|ipo|hinge|robust: DPO's own, IPO, SLiC's hinge, or robust DPO
LABEL_SMOOTHING = 0.1  # --loss-type robust: the share of preference labels taken to be flipped; in [0, 0.5)
LR = -1.0  # peak learning rate of AdamW (linear decay); -1 = the method's default: 5e-6 dpo, 1e-5 rloo and grpo
EPOCHS = 1.0  # passes over the training pairs or prompts
MAX_STEPS = -1  # optimizer steps to run; -1 = set by EPOCHS
BATCH_SIZE = 8  # pairs (dpo) or prompts (rloo, grpo) per device per step; >= 1
WARMUP_RATIO = 0.03  # share of the steps spent warming the learning rate up; in [0, 1)
NUM_GENERATIONS = 4  # rloo, grpo: answers sampled per prompt (the baseline, the others or the group, needs >= 2)
MAX_NEW_TOKENS = 128  # rloo, grpo: most tokens per sampled answer; >= 1
TEMPERATURE = 1.0  # rloo, grpo: sampling temperature of the answers; > 0
MISSING_EOS_PENALTY = 1.0  # rloo, grpo: subtracted from the reward model's score of an answer cut off at --max-new-tokens; >= 0
MAX_LENGTH = 512  # dpo: tokens of prompt + the longer answer + EOS; rloo, grpo: of the prompt alone; longer ones are dropped
VAL_SIZE = 0.05  # held-out pairs (dpo) or prompts (rloo, grpo): a count (>= 1) or a fraction in (0, 1)
EVAL_STEPS = 500  # evaluate on the held-out set every N steps; >= 1
SAVE_STEPS = 500  # write checkpoint-N/ every N steps; >= 1
LOGGING_STEPS = 50  # log the training loss every N steps; >= 1
SEED = 42  # seed of the split, the shuffling and the sampling
PRECISION = "auto"  # auto|fp32|bf16|fp16: auto = bf16 where supported, fp16 on older GPUs, fp32 on MPS
PACKING = "auto"  # auto|none|rows|flat: layout of dpo's pairs, rloo/grpo's samples, for their log-probs; auto = rows, or flat with FlashAttention
VLLM = False  # rloo, grpo: sample the answers with vLLM (TRL's use_vllm, colocate mode); needs CUDA and the vllm package
LORA = False  # train LoRA adapters (peft) on the SFT model instead of every weight; the reference is it without them
LORA_R = 16  # --lora: rank of each adapter; >= 1
LORA_ALPHA = 32.0  # --lora: adapter scale numerator (the update is scaled by alpha / r); > 0
LORA_TARGET = "auto"  # --lora: layers to adapt: auto = every linear layer of the attention and MLP blocks, or a comma list
MERGE = False  # --lora: also write the merged full weights to OUTPUT_DIR/merged
GRADIENT_CHECKPOINTING = False  # recompute activations in the backward pass: less memory, about a third slower
SKIP_INVALID = False  # drop malformed records instead of stopping
REPORT_TO = "none"  # where the Trainer also logs: none, tensorboard (OUTPUT_DIR/runs), wandb, ... or a comma list
RESUME = True  # continue from the newest checkpoint in OUTPUT_DIR; --no-resume starts fresh
DEVICE = "auto"  # auto|cuda|mps|cpu: auto picks CUDA, then Apple MPS, then CPU
SMOKE = False  # offline preset: the smoke SFT model, pairs (and reward model for --reward model), to smoke-run/aligned-METHOD/

# The method defaults behind BETA and LR = -1 (low enough to keep what SFT taught; see the README).
DEFAULTS = {"dpo": {"beta": 0.1, "lr": 5e-6}, "rloo": {"beta": 0.05, "lr": 1e-5}, "grpo": {"beta": 0.04, "lr": 1e-5}}
ONLINE = ("rloo", "grpo")  # the methods that sample answers and score them with --reward
# A run's identity: resuming with any of these changed would silently mix two different runs.
IDENTITY = ("model", "method", "dataset", "reward", "reward_weights", "reward_model", "beta", "loss_type",
            "label_smoothing", "lr", "epochs", "max_steps", "batch_size", "warmup_ratio", "num_generations",
            "max_new_tokens", "temperature", "missing_eos_penalty", "max_length", "val_size", "seed", "lora", "lora_r",
            "lora_alpha", "lora_target")


def validate_args(args) -> None:
    from tuning.models import lora
    from tuning.cli import check_all
    from tuning.preference import rewards
    from tuning.data.records import val_size_problems

    problems = [f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})"
                for name in ("batch_size", "max_new_tokens", "max_length", "eval_steps", "save_steps",
                             "logging_steps") if getattr(args, name) < 1]
    if args.epochs <= 0 and args.max_steps <= 0:
        problems.append(f"--epochs must be > 0 (got {args.epochs}) unless --max-steps is set")
    if args.lr <= 0 and args.lr != -1:
        problems.append(f"--lr must be > 0, or -1 for the method's default (got {args.lr})")
    if args.beta < 0 and args.beta != -1:
        problems.append(f"--beta must be >= 0, or -1 for the method's default (got {args.beta})")
    if args.method == "dpo" and args.beta == 0:
        problems.append("--beta 0: DPO needs beta > 0")
    if args.method != "dpo" and args.loss_type != LOSS_TYPE:
        problems.append(f"--loss-type {args.loss_type}: only used with --method dpo")
    if not 0 <= args.label_smoothing < 0.5:
        problems.append(f"--label-smoothing must be in [0, 0.5) (got {args.label_smoothing})")
    elif args.label_smoothing != LABEL_SMOOTHING and args.loss_type != "robust":
        problems.append(f"--label-smoothing: only used with --loss-type robust (got --loss-type {args.loss_type})")
    if not 0 <= args.warmup_ratio < 1:
        problems.append(f"--warmup-ratio must be in [0, 1) (got {args.warmup_ratio})")
    if args.temperature <= 0:
        problems.append(f"--temperature must be > 0 (got {args.temperature})")
    if args.missing_eos_penalty < 0:
        problems.append(f"--missing-eos-penalty must be >= 0 (got {args.missing_eos_penalty})")
    elif args.missing_eos_penalty != MISSING_EOS_PENALTY and rewards.MODEL not in rewards.names(args.reward):
        problems.append("--missing-eos-penalty: only used with --reward model (the reward model's score of a cut "
                        "answer); a check or your function sees the cut answer itself")
    online = args.method in ONLINE
    if online and args.num_generations < 2:
        problems.append(f"--num-generations must be >= 2 for {args.method}'s baseline, the mean reward of the other "
                        f"answers to a prompt (got {args.num_generations})")
    model_reward = rewards.MODEL in rewards.names(args.reward)
    if online and model_reward and not args.reward_model and not args.smoke:
        problems.append(f"--method {args.method} with --reward model needs --reward-model DIR (reward.py's output "
                        "dir), or another --reward (exact, contains, FILE.py:FUNCTION)")
    if args.method == "dpo" and (args.reward != REWARD or args.reward_weights != REWARD_WEIGHTS):
        problems.append("--reward and --reward-weights: only used with --method rloo or grpo (DPO learns from the "
                        "pairs alone)")
    if args.method == "dpo" and args.reward_model:
        problems.append("--reward-model: only used with --method rloo or grpo (DPO learns from the pairs alone)")
    elif online and args.reward_model and not model_reward:
        problems.append(f"--reward-model: only used when --reward has model (it is {args.reward})")
    if online:
        problems += rewards.spec_problems(args.reward, args.reward_weights)
    elif args.vllm:
        problems.append("--vllm: only used with --method rloo or grpo (DPO samples nothing)")
    problems += lora.problems(args) + checks.report_to_problems(args.report_to)
    check_all(problems + val_size_problems(args.val_size))


def apply_defaults(args, explicit: set) -> None:
    """--smoke's preset (except for flags given on the command line), then the method's beta and lr."""
    from tuning import smoke
    from tuning.cli import UserError
    from tuning.preference import rewards

    if args.smoke:
        clash = [f"--{name.replace('_', '-')}" for name in ("reward_model",) if name in explicit]
        if clash:
            raise UserError(f"--smoke brings its own models and data, so it can't be combined with {', '.join(clash)}")
        other = {"model", "dataset"} & explicit  # another smoke model or data (Constitutional AI's, arithmetic's)
        if other and "output_dir" not in explicit:
            raise UserError(f"--smoke with --{' and --'.join(sorted(other))}: another smoke model or other data (as "
                            "the Constitutional AI and arithmetic pipelines use): name the new run's --output-dir")
        fewer = smoke.ALIGN_OTHER if other and args.method == "dpo" else {}  # (AI-labelled pairs are fewer)
        for name, value in {**smoke.ALIGN_SETTINGS[args.method], **fewer}.items():
            if name not in explicit:
                setattr(args, name, value)
        if "model" not in explicit:
            args.model = os.path.join(smoke.OUTPUT_DIR, "model")
        if "dataset" not in explicit:
            args.dataset = os.path.join(smoke.OUTPUT_DIR, "pairs.json")
        model_reward = args.method in ONLINE and rewards.MODEL in rewards.names(args.reward)
        args.reward_model = os.path.join(smoke.OUTPUT_DIR, "reward") if model_reward else ""
        if "output_dir" not in explicit:  # a LoRA variant of its own, beside the full run
            args.output_dir = os.path.join(smoke.OUTPUT_DIR, f"aligned-{args.method}{'-lora' if args.lora else ''}")
        for path, step in ((args.model, "train.py --smoke"), (args.reward_model, "reward.py --smoke")):
            if path and not os.path.isfile(os.path.join(path, "config.json")):
                raise UserError(f"no smoke model in {path}/: run `python {step}` first")
    for name, value in DEFAULTS[args.method].items():
        if getattr(args, name) == -1:
            setattr(args, name, value)


def check_dirs(args) -> None:
    """The SFT (and reward) model dirs hold finished models, and the output dir is neither of them."""
    from tuning.models import lora
    from tuning import rundir
    from tuning.cli import UserError

    for flag, path in (("--model", args.model), ("--reward-model", args.reward_model)):
        if path and os.path.realpath(path) == os.path.realpath(args.output_dir):
            raise UserError(f"--output-dir {args.output_dir} is the {flag} directory; the aligned model needs its own")
    if not os.path.isdir(args.model):
        if args.model == MODEL:  # the default SFT output dir, not a Hub id: train.py has not run yet
            raise UserError(f"--model {args.model}: no SFT model there. Run `python train.py` first (or the smoke "
                            "steps: `python train.py --smoke`, `python reward.py --smoke`, `python align.py --smoke`).")
        return
    if not lora.is_model_dir(args.model):
        last = rundir.find_checkpoint(args.model)
        hint = f"; its training did not finish (pass --model {last}, or resume train.py)" if last else ""
        raise UserError(f"--model {args.model}: no SFT model there{hint}. Run `python train.py` first.")
    architectures = lora.load_config(args.model).architectures or []
    adapter = lora.is_adapter_dir(args.model) and lora.adapter_task(args.model) == "SEQ_CLS"  # reward.py --lora's
    if adapter or any("SequenceClassification" in name for name in architectures):
        what = "a LoRA adapter from reward.py --lora" if adapter else f"a {architectures[0]}"
        raise UserError(f"--model {args.model} is a reward model ({what}): pass the SFT model, "
                        "train.py's output dir (the reward model goes to --reward-model, for --method rloo or grpo)")


def prepare_data(args, tokenizer, template, judge, say) -> tuple[dict, list[dict], dict]:
    """({"train", "validation"} Datasets, the held-out records as read, report): DPO's pairs tokenized as SFT
    tokenized them, or online RL's prompts formatted with the SFT template (and the reward model's), with each
    record's reference answer, which --reward exact and contains need."""
    from tuning.data import preferences
    from tuning.cli import UserError
    from tuning.models.loading import context_limit
    from tuning.models.scoring import end_length
    from tuning.data.chat_template import encode_prompts
    from tuning.preference import rewards

    if args.method == "dpo":
        return preferences.prepare_pairs(args.dataset, args.skip_invalid, args.val_size, args.seed, tokenizer,
                                         template, args.max_length, say)
    reader = (judge.tokenizer, judge.template) if judge else (tokenizer, template)  # (no reward model: unused)
    data, held_out, report = preferences.prepare_prompts(args.dataset, args.skip_invalid, args.val_size, args.seed,
                                                         tokenizer, template, *reader, args.max_length, say)
    if rewards.uses_reference(args.reward):
        missing = sum(reference is None for part in data.values() for reference in part["reference"])
        if missing:
            raise UserError(f"--reward {args.reward}: {missing} of the {sum(map(len, data.values()))} prompts of "
                            f"{args.dataset} have no reference answer to check against (an Alpaca record's "
                            "'output', a pair's 'chosen', a conversation's last assistant turn, or a prompt-only "
                            f"record's {', '.join(repr(f) for f in preferences.REFERENCE_FIELDS)})")
    if rewards.uses_functions(args.reward):
        rows = [(json.loads(row["record"]), row["reference"]) for part in data.values() for row in part]
        clash = sorted({field for record, reference in rows for field in record if field in rewards.ARGUMENTS and
                        (field != "reference" or str(record[field]) != reference)})  # (its own reference: no clash)
        if clash:
            raise UserError(f"--reward {args.reward}: the records of {args.dataset} have a field named "
                            f"{', '.join(repr(f) for f in clash)}, which is also an argument of your reward function; "
                            "rename the field")
    if judge is None:
        return data, held_out, report
    judge_limit = context_limit(judge.model.config)  # the reward model reads prompt + answer + its end
    asked = [prompt for part in data.values() for prompt in part["judge_prompt"]]
    longest = max(map(len, encode_prompts(judge.tokenizer, asked, judge.chat_template)))
    end = end_length(judge.tokenizer, asked[0], judge.chat_template)  # EOS, or the chat template's end-of-turn
    if judge_limit and longest + args.max_new_tokens + end > judge_limit:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: the longest prompt, in the reward model's template, is "
                        f"{longest} tokens, and with an answer and its end that is more than the {judge_limit} positions "
                        f"of --reward-model {args.reward_model}; lower --max-length or --max-new-tokens")
    return data, held_out, report


def pairs_the_run_sees(args, train, world_size: int, say):
    """The training pairs of a DPO run whose --max-steps ends it within an epoch: that many steps' pairs, drawn at
    random with --seed and trained on in the order drawn (align_trainers.AlignDPOTrainer.in_order), so that the
    reference pass before training scores only those, not every pair of the set, and a longer run's pairs and
    batches begin with a shorter one's (extending a run goes on where it stopped)."""
    import random

    needed = args.max_steps * args.batch_size * world_size
    if args.max_steps <= 0 or needed >= len(train):
        return train
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    say(f"DPO: --max-steps {args.max_steps} trains on {needed} of the {len(train)} training pairs (drawn with --seed), "
        "so the reference pass scores those only")
    return train.select(order[:needed])


def probe_samples(train, tokenizer, n: int = 3) -> list[tuple[list[int], list[int]]]:
    """The packing check's samples for RLOO and GRPO: (prompt ids, answer ids) of the first n training prompts, each
    encoded as the trainer encodes it, answered twice, with the last 8 and 3 tokens of the next prompts (real text
    of different lengths: the answers share their prompt, as in training)."""
    from tuning.data.chat_template import encode_prompts

    prompts = encode_prompts(tokenizer, [train[i]["prompt"] for i in range(min(n, len(train)))])
    return [(prompt, prompts[(i + k) % len(prompts)][-length:]) for i, prompt in enumerate(prompts)
            for k, length in ((1, 8), (2, 3))]


def probe_loss(args, data: dict, tokenizer, packing: str):
    """A loss over a few real training examples, for launchers.find_unused_parameters: DPO's answer log-probs of
    packed pairs, or, for RLOO, the language-model loss of a prompt."""
    import torch

    from tuning.data import collate
    from tuning.data.chat_template import prompt_ids
    from tuning.models import sequence_logps

    if args.method == "dpo":
        batch = sequence_logps.model_inputs(collate.PairCollator(tokenizer.pad_token_id, packing)(
            checks.probe_examples(data["train"])))
        return lambda model: model(**batch).logits.sum()
    ids = torch.tensor([prompt_ids(tokenizer, data["train"][0]["prompt"])])
    return lambda model: model(input_ids=ids, labels=ids).loss


def main(args, explicit: set) -> None:
    from tuning.preference import align_report
    from tuning.models import lora
    from tuning.models import devices, loading
    from tuning.models import packing_checks, sampled_logps, sequence_logps
    from tuning import rundir
    from tuning.data.chat_template import saved_or_ours
    from tuning.data.templates import load_template, write_template

    device = devices.get_device(args.device)
    precision, why = devices.resolve_precision(args.precision, device)
    if args.smoke and "precision" not in explicit:
        why = "set by --smoke"
    packing, attn = checks.resolve_packing(args.packing, device, precision)
    if args.vllm:
        checks.refuse_without_vllm(device)
    check_dirs(args)
    if args.method in ONLINE:
        from tuning.preference import rewards

        rewards.load_user_functions(args.reward)  # (a mistake in the user's file is said before the models load)
    checks.fit_max_length(args, explicit, args.model, checks.model_positions(args.model),
                          print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None),
                          reserve=args.max_new_tokens if args.method in ONLINE else 0)
    from tuning.preference import align_trainers  # (TRL: seconds to import, after the checks that refuse a start)
    from tuning.runs.trainer import StopOnSignal

    config = {**vars(args), "device": device.type, "precision": precision, "sft_model": rundir.model_path(args.model),
              "command": shlex.join(["python", "align.py", *sys.argv[1:]])}
    training_args = align_trainers.trl_config(args, device, precision)
    launchers.refuse_data_parallel(training_args, "align.py")
    main_process = training_args.process_index == 0
    say = print if main_process else (lambda *a, **k: None)

    checkpoint = runner.open_output_dir(args.output_dir, config, IDENTITY, args.resume, training_args, say)
    say(f"Device: {device.type} x {training_args.world_size}; precision: {precision} ({why}); method: {args.method} "
        f"(beta {args.beta}, lr {args.lr:g})")
    judge = None
    with training_args.main_process_first(desc="preparing data"):
        if args.smoke:
            from tuning import smoke

            if "dataset" not in explicit:
                smoke.prepare_pairs(os.path.dirname(args.dataset))
            smoke.prepare_named(args.dataset)  # (the arithmetic task's prompts, the first time they are named)
        tokenizer = loading.load_tokenizer(args.model)
        template = load_template(args.model)
        tokenizer.chat_template = saved_or_ours(tokenizer, template)  # conversations as SFT rendered them; saved
        if args.method in ONLINE and args.reward_model:
            judge = align_trainers.Judge(args.reward_model, device, args.batch_size * args.num_generations,
                                         args.missing_eos_penalty)
        data, held_out, report = prepare_data(args, tokenizer, template, judge, say)
        drawn = len(data["train"])
        if args.method == "dpo":
            data["train"] = pairs_the_run_sees(args, data["train"], training_args.world_size, say)
    policy = loading.load_model(args.model, "pretrained", tokenizer)
    # Packed pairs or samples, where this model keeps packed sequences apart (checked on real examples).
    pad = tokenizer.pad_token_id
    if args.method == "dpo":
        probe = checks.probe_examples(data["train"])
        enabled, matches = sequence_logps.enable_sequence_logps(policy), packing_checks.packed_logps_match
    else:
        probe = probe_samples(data["train"], tokenizer)
        enabled = sampled_logps.enable_sampled_logps(policy)
        matches = functools.partial(packing_checks.packed_samples_match, mode=packing)
    packing = checks.choose_packing(enabled, packing, "packing" in explicit, say, "answer log-probs", len(probe),
                                    lambda: matches(policy, probe, pad))
    if attn and packing == "flat":
        policy.set_attn_implementation(attn)
    config["packing"] = packing
    say(f"Packing: {packing} (answer log-probs read at the answer tokens only)")
    if args.lora:  # after the packing check, which compares the plain model's own forward passes
        policy = lora.add_lora(policy, rundir.model_path(args.model), args.lora_r, args.lora_alpha, 0.0,  # no dropout
                               args.lora_target, seed=args.seed)  # in either method (align_trainers.trl_config)
    say(f"Parameters: {lora.describe(policy)}{' (LoRA: the reference is the SFT model, adapters off)' if args.lora else ''}")
    launchers.find_unused_parameters(policy, probe_loss(args, data, tokenizer, packing), training_args, say)
    config.update(n_train=len(data["train"]), n_val=len(data["validation"]), world_size=training_args.world_size,
                  data_report=report)
    if main_process:
        rundir.write_records(os.path.join(args.output_dir, rundir.HELD_OUT_FILE), held_out)  # held out, as read
        rundir.write_json(os.path.join(args.output_dir, rundir.RUN_CONFIG_FILE), config)

    stopper = StopOnSignal(announce=main_process)
    trainer = align_trainers.build_trainer(args, policy, tokenizer, training_args, data, judge, [stopper],
                                         lambda directory: write_template(directory, template), packing,
                                         in_order=len(data["train"]) < drawn)
    if not checkpoint:
        say("Evaluating the SFT model on the held-out set ...")
    before = runner.evaluate_once(trainer, "before", checkpoint, args.output_dir, main_process)
    with runner.guarded(args.output_dir, main_process):
        runner.train(trainer, stopper, checkpoint, args.output_dir)
        after = trainer.evaluate()
        loading.set_generation_ids(trainer.model, tokenizer)
        trainer.save_model(args.output_dir)
        metrics = runner.run_metrics(trainer)  # a collective: every process must reach it
        if main_process and args.merge:
            lora.save_merged(args.output_dir, os.path.join(args.output_dir, rundir.MERGED_DIR), loading.load_model)
            write_template(os.path.join(args.output_dir, rundir.MERGED_DIR), template)
        if main_process:
            write_template(args.output_dir, template)
            metrics.update(align_report.summary(args, trainer, before, after, metrics), device=device.type,
                           precision=precision, world_size=training_args.world_size,
                           peak_memory_mb=trainer.peak_memory_mb())
            align_report.plot(args, before, after, os.path.join(args.output_dir, "before_after.png"))
            rundir.write_json(os.path.join(args.output_dir, rundir.METRICS_FILE), metrics)  # last: the run is finished
    runner.finish(trainer)
    if main_process:
        for line in align_report.report_lines(args, metrics):
            say(line)


def run(args, explicit: set) -> None:
    """The command line: --smoke's preset and the method's defaults, then the run."""
    apply_defaults(args, explicit)
    main(args, explicit)


if __name__ == "__main__":
    runner.run_script(sys.modules[__name__], validate_args, run)
