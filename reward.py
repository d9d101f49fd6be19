"""Train a reward model on preference pairs, starting from the SFT model (step 2 of InstructGPT).

    python reward.py                   # distilgpt2-alpaca/ on Anthropic/hh-rlhf -> distilgpt2-alpaca-rm/
    python reward.py --smoke           # offline, after `python train.py --smoke`: smoke-run/reward/
    python reward.py --score --prompt "Greet them." --input "cat dog owl" --answer "Hello, cat dog owl!"
    torchrun --nproc_per_node 2 reward.py   # DDP; `accelerate launch` works too

The model scores prompt + answer + EOS at the answer's last token (where the SFT model predicts the EOS) and
learns -log sigmoid(r_chosen - r_rejected), or, with --soft-labels, the cross-entropy against each pair's 'label'.
Running the same command again after an interruption continues from the newest checkpoint.
"""

from __future__ import annotations

import os
import shlex
import sys

from tuning.runs import checks, launchers, runner

# ---- settings (each has a flag: BATCH_SIZE -> --batch-size) ----
MODEL = "distilgpt2-alpaca"  # the SFT model (train.py's output dir); its body and template start the reward model
DATASET = "Anthropic/hh-rlhf"  # preference pairs: Hub id or .json/.jsonl/.jsonl.gz file (see tuning/data/preferences.py)
OUTPUT_DIR = "distilgpt2-alpaca-rm"  # checkpoints, the reward model, metrics.json, run_config.json, margins.png
EPOCHS = 1.0  # passes over the training pairs (1, as in the InstructGPT paper)
MAX_STEPS = -1  # optimizer steps to run; -1 = set by EPOCHS
BATCH_SIZE = 8  # pairs per device per step (their chosen and rejected answers go through together); >= 1
LR = 1e-5  # peak learning rate of AdamW (linear warmup, then linear decay to 0)
WARMUP_RATIO = 0.03  # share of the steps spent warming the learning rate up; in [0, 1)
MAX_LENGTH = 512  # tokens of prompt + the longer answer + EOS; longer pairs are dropped and counted, never cut
VAL_SIZE = 0.05  # held-out pairs: a count (>= 1) or a fraction in (0, 1)
EVAL_STEPS = 500  # evaluate on the held-out pairs every N steps; >= 1
SAVE_STEPS = 500  # write checkpoint-N/ every N steps; >= 1
LOGGING_STEPS = 50  # log the training loss every N steps; >= 1
SEED = 42  # seed of the split and the shuffling
PRECISION = "auto"  # auto|fp32|bf16|fp16: auto = bf16 where supported, fp16 on older GPUs, fp32 on MPS
PACKING = "auto"  # auto|none|rows|flat: batch layout (tuning/data/collate.py); auto = rows, or flat with FlashAttention
SOFT_LABELS = False  # learn each pair's 'label' (constitution.py's AI label, P(chosen is better)) instead of 1
SKIP_INVALID = False  # drop malformed pairs instead of stopping
LORA = False  # train LoRA adapters (peft) on the SFT body instead of every weight; the score head trains in full
LORA_R = 16  # --lora: rank of each adapter; >= 1
LORA_ALPHA = 32.0  # --lora: adapter scale numerator (the update is scaled by alpha / r); > 0
LORA_TARGET = "auto"  # --lora: layers to adapt: auto = every linear layer of the attention and MLP blocks, or a comma list
MERGE = False  # --lora: also write the merged full reward model to OUTPUT_DIR/merged
GRADIENT_CHECKPOINTING = False  # recompute activations in the backward pass: less memory, about a third slower
REPORT_TO = "none"  # where the Trainer also logs: none, tensorboard (OUTPUT_DIR/runs), wandb, ... or a comma list
RESUME = True  # continue from the newest checkpoint in OUTPUT_DIR; --no-resume starts fresh
DEVICE = "auto"  # auto|cuda|mps|cpu: auto picks CUDA, then Apple MPS, then CPU
SMOKE = False  # offline preset: the smoke SFT model and smoke preference pairs (tuning/smoke.py), to smoke-run/reward/
SCORE = False  # score answers with the reward model in OUTPUT_DIR instead of training (with --answer or --prompts-file)
PROMPT = ""  # --score: the instruction, formatted with the reward model's template
INPUT = ""  # --score: optional input of the instruction
ANSWER = ""  # --score: the answer to score
PROMPTS_FILE = ""  # --score: .json/.jsonl records with "answer" (or "chosen" and "rejected"), and a prompt or "messages"

# A run's identity: resuming with any of these changed would silently mix two different runs.
IDENTITY = ("model", "dataset", "max_length", "val_size", "seed", "epochs", "max_steps", "batch_size", "lr",
            "warmup_ratio", "soft_labels", "lora", "lora_r", "lora_alpha", "lora_target")


def validate_args(args) -> None:
    from tuning.models import lora
    from tuning.cli import check_all
    from tuning.data.records import val_size_problems

    problems = [f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})"
                for name in ("batch_size", "eval_steps", "save_steps", "logging_steps", "max_length")
                if getattr(args, name) < 1]
    if args.epochs <= 0 and args.max_steps <= 0:
        problems.append(f"--epochs must be > 0 (got {args.epochs}) unless --max-steps is set")
    if args.lr <= 0:
        problems.append(f"--lr must be > 0 (got {args.lr})")
    if not 0 <= args.warmup_ratio < 1:
        problems.append(f"--warmup-ratio must be in [0, 1) (got {args.warmup_ratio})")
    if args.score and bool(args.answer) == bool(args.prompts_file):
        problems.append("--score needs --answer (with --prompt) or --prompts-file, one of them")
    if args.score and args.answer and not args.prompt:
        problems.append("--answer needs the --prompt it answers")
    given = [flag for flag, value in (("--prompt", args.prompt), ("--input", args.input), ("--answer", args.answer),
                                      ("--prompts-file", args.prompts_file)) if value]
    if not args.score and given:
        problems.append(f"{', '.join(given)}: only used with --score")
    problems += lora.problems(args) + checks.report_to_problems(args.report_to)
    check_all(problems + val_size_problems(args.val_size))


def apply_smoke(args, explicit: set) -> None:
    """--smoke: the smoke SFT model, pairs and settings, except for flags given on the command line."""
    from tuning.models import lora
    from tuning import smoke
    from tuning.cli import UserError

    clash = [f"--{name.replace('_', '-')}" for name in ("model", "dataset") if name in explicit]
    if clash:
        raise UserError(f"--smoke brings its own model and data, so it can't be combined with {', '.join(clash)}")
    for name, value in smoke.REWARD_SETTINGS.items():
        if name not in explicit:
            setattr(args, name, value)
    args.model, args.dataset = os.path.join(smoke.OUTPUT_DIR, "model"), os.path.join(smoke.OUTPUT_DIR, "pairs.json")
    if "output_dir" not in explicit:  # a LoRA variant of its own, beside the full reward model that RLOO uses
        args.output_dir = os.path.join(smoke.OUTPUT_DIR, "reward-lora" if args.lora else "reward")
    if not args.score and not lora.is_model_dir(args.model):
        raise UserError(f"no smoke SFT model in {args.model}/: run `python train.py --smoke` first")


def check_dirs(model: str, output_dir: str) -> None:
    """A clear message when the SFT directory holds no finished model (Hub ids other than the default pass
    through), and never an output dir that is the SFT model's own."""
    from tuning import rundir
    from tuning.cli import UserError
    from tuning.models import loading, lora

    if os.path.realpath(model) == os.path.realpath(output_dir):
        raise UserError(f"--output-dir {output_dir} is the SFT model's directory (--model); the reward model "
                        "needs a directory of its own")
    if not os.path.isdir(model):
        if model == MODEL:  # the default SFT output dir, not a Hub id: train.py has not run yet
            raise UserError(f"--model {model}: no SFT model there. Run `python train.py` first (or "
                            "`python train.py --smoke`, then `python reward.py --smoke`).")
        return
    if lora.is_model_dir(model):
        loading.refuse_reward_model(model, "--model")  # (its trained score head would be replaced by a new one)
        return
    last = rundir.find_checkpoint(model)
    hint = f"; its training did not finish (pass --model {last}, or resume train.py)" if last else ""
    raise UserError(f"--model {model}: no SFT model there{hint}. Run `python train.py` first.")


def main(args, explicit: set) -> None:
    from tuning.models import lora
    from tuning.models import devices, loading
    from tuning.data import preferences
    from tuning import rundir
    from tuning.data import collate
    from tuning.models import packing_checks, scoring
    from tuning.data.chat_template import saved_or_ours
    from tuning.data.templates import load_template, write_template

    device = devices.get_device(args.device)
    precision, why = devices.resolve_precision(args.precision, device)
    if args.smoke and "precision" not in explicit:
        why = "set by --smoke"
    packing, attn = checks.resolve_packing(args.packing, device, precision)
    check_dirs(args.model, args.output_dir)
    checks.fit_max_length(args, explicit, args.model, checks.model_positions(args.model),
                          print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None))
    from transformers import TrainingArguments  # (seconds to import, after the checks that refuse a start)

    from tuning.preference.reward_trainer import RewardTrainer
    from tuning.runs.trainer import StopOnSignal, report_targets

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    config = {**vars(args), "device": device.type, "precision": precision,
              "command": shlex.join(["python", "reward.py", *sys.argv[1:]])}
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=args.warmup_ratio, eval_strategy="steps",
        eval_steps=args.eval_steps, save_strategy="steps", save_steps=args.save_steps, save_total_limit=2,
        logging_steps=args.logging_steps, seed=args.seed, bf16=precision == "bf16", fp16=precision == "fp16",
        use_cpu=device.type == "cpu", ddp_backend="gloo" if device.type == "cpu" and distributed else None,
        report_to=report_targets(args.report_to, args.output_dir), remove_unused_columns=False,
        dataloader_pin_memory=device.type == "cuda",
        ddp_find_unused_parameters=None,  # set below: off where every trainable weight is used (no extra graph pass)
        activation_checkpointing=args.gradient_checkpointing)
    launchers.refuse_data_parallel(training_args, "reward.py")  # DataParallel would split score_index from its rows
    main_process = training_args.process_index == 0
    say = print if main_process else (lambda *a, **k: None)

    checkpoint = runner.open_output_dir(args.output_dir, config, IDENTITY, args.resume, training_args, say)
    say(f"Device: {device.type} x {training_args.world_size}; precision: {precision} ({why})")
    with training_args.main_process_first(desc="preparing data"):
        if args.smoke:
            from tuning import smoke

            smoke.prepare_pairs(os.path.dirname(args.dataset))
        tokenizer = loading.load_tokenizer(args.model)
        template = load_template(args.model)
        tokenizer.chat_template = saved_or_ours(tokenizer, template)  # conversations as SFT rendered them; saved
        data, held_out, report = preferences.prepare_pairs(args.dataset, args.skip_invalid, args.val_size, args.seed,
                                                           tokenizer, template, args.max_length, say,
                                                           targets=args.soft_labels)
    model = scoring.reward_model_from(args.model)
    collate_probe = checks.probe_examples(data["train"])
    probe = [pair["prompt_ids"] + pair[key] for pair in collate_probe for key in ("chosen_ids", "rejected_ids")]
    packing = checks.choose_packing(model, packing, "packing" in explicit, say, "hidden states", len(probe),
                                    lambda: packing_checks.packed_scores_match(model, probe, tokenizer.pad_token_id))
    if attn and packing == "flat":
        model.set_attn_implementation(attn)
    say(f"Reward model: {type(model).__name__} from {args.model} (score head new, zero: every score 0 before "
        f"training); packing: {packing}")
    if args.lora:  # after the packing check, which compares the plain model's own forward passes
        model = lora.add_lora(model, rundir.model_path(args.model), args.lora_r, args.lora_alpha, 0.0,  # no dropout
                              args.lora_target, reward_head=True, seed=args.seed)  # in a reward model (models/scoring.py)
    say(f"Parameters: {lora.describe(model)}{' (LoRA adapters and the score head)' if args.lora else ''}")
    probe_batch = {k: v for k, v in collate.ScoreCollator(tokenizer.pad_token_id, packing)(collate_probe).items()
                   if not k.startswith("num_") and k != "targets"}
    launchers.find_unused_parameters(model, lambda m: m(**probe_batch).logits.sum(), training_args, say)
    config.update(packing=packing, n_train=len(data["train"]), n_val=len(data["validation"]),
                  world_size=training_args.world_size, data_report=report)
    if main_process:
        rundir.write_records(os.path.join(args.output_dir, rundir.HELD_OUT_FILE), held_out)  # the held-out pairs, as read
        rundir.write_json(os.path.join(args.output_dir, rundir.RUN_CONFIG_FILE), config)

    stopper = StopOnSignal(announce=main_process)
    trainer = RewardTrainer(
        model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
        data_collator=collate.ScoreCollator(tokenizer.pad_token_id, packing, 8 if device.type == "cuda" else None),
        processing_class=tokenizer, callbacks=[stopper],
        checkpoint_files=lambda directory: (scoring.without_pad_id(model), write_template(directory, template)))
    if not checkpoint:
        say("Evaluating the untrained reward model on the held-out pairs ...")
    before = runner.evaluate_once(trainer, "before", checkpoint, args.output_dir, main_process)
    with runner.guarded(args.output_dir, main_process):
        runner.train(trainer, stopper, checkpoint, args.output_dir)
        after = trainer.evaluate()
        scoring.without_pad_id(model)
        trainer.save_model(args.output_dir)
        metrics = runner.run_metrics(trainer)  # a collective: every process must reach it
        if main_process:
            write_template(args.output_dir, template)
            if args.merge:
                lora.save_merged(args.output_dir, os.path.join(args.output_dir, rundir.MERGED_DIR),
                                 lambda path: scoring.load_reward_model(path)[0])
                write_template(os.path.join(args.output_dir, rundir.MERGED_DIR), template)
            metrics.update({
                "eval_accuracy_before": before["before_accuracy"], "eval_accuracy_after": after["eval_accuracy"],
                "eval_loss_before": before["before_loss"], "eval_loss_after": after["eval_loss"],
                "eval_mean_margin_before": before["before_mean_margin"],
                "eval_mean_margin_after": after["eval_mean_margin"], "eval_pairs": len(after["eval_margins"]),
                "pairs_per_second": metrics["train_pairs"] / metrics["train_runtime_s"], "device": device.type,
                "precision": precision, "packing": packing, "world_size": training_args.world_size,
                "peak_memory_mb": trainer.peak_memory_mb()})
            plot_margins(before, after, metrics, os.path.join(args.output_dir, "margins.png"))
            rundir.write_json(os.path.join(args.output_dir, rundir.METRICS_FILE), metrics)  # last: the run is finished
    runner.finish(trainer)
    if not main_process:
        return
    say(f"\nHeld-out pairwise accuracy {metrics['eval_accuracy_before']:.1%} -> {metrics['eval_accuracy_after']:.1%}"
        f" (loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f}, mean margin "
        f"{metrics['eval_mean_margin_after']:+.3f}) on {metrics['eval_pairs']} pairs")
    merged = f"; the merged full reward model in {os.path.join(args.output_dir, rundir.MERGED_DIR)}/" if args.merge else ""
    say(f"{metrics['pairs_per_second']:.1f} pairs/s on {device.type}; reward model, metrics.json and margins.png in "
        f"{args.output_dir}/{merged}")


def plot_margins(before: dict, after: dict, metrics: dict, path: str) -> None:
    """margins.png: histograms of the held-out margins r(chosen) - r(rejected), before and after training."""
    from tuning.runs.plots import plot_before_after

    tied = all(margin == 0 for margin in before["before_margins"])  # the new zero head: 50%, ties counted half
    plot_before_after(before["before_margins"], after["eval_margins"], path,
                      f"Reward model on {len(after['eval_margins'])} held-out preference pairs",
                      "reward margin on a held-out pair: r(chosen) - r(rejected); right of 0 = ranked right",
                      ("before training (every margin 0: new zero head)" if tied else
                       f"before training ({metrics['eval_accuracy_before']:.1%} right)",
                       f"after training ({metrics['eval_accuracy_after']:.1%} right)"), ylabel="pairs")


def score_main(args) -> None:
    """--score: print the reward model's score of each answer (and, for pairs, which one it prefers)."""
    from tuning.models import devices
    from tuning.models import scoring
    from tuning.data import preferences
    from tuning.data.chat_template import saved_or_ours
    from tuning.data.preferences import pair_prompt

    device = devices.get_device(args.device)
    rm, tokenizer, template = scoring.load_reward_model(args.output_dir, device, flag="--output-dir")
    chat_template = saved_or_ours(tokenizer, template)
    items = preferences.read_scoring_file(args.prompts_file) if args.prompts_file else [
        {"instruction": args.prompt, "input": args.input, "prompt": None, "messages": None, "answers": [args.answer]}]
    prompts = [pair_prompt(item, template, chat_template, tokenizer) for item in items for _ in item["answers"]]
    scores = iter(scoring.score_texts(rm, tokenizer, prompts, [a for item in items for a in item["answers"]],
                                      args.batch_size, chat_template=chat_template))
    right = 0
    for item in items:
        values = [next(scores) for _ in item["answers"]]
        earlier = len(item["messages"]) - 1 if item["messages"] else 0
        shown = (item["messages"][-1]["content"] if item["messages"] else item["prompt"] if item["prompt"] is not None
                 else " / ".join(filter(None, (item["instruction"], item["input"]))))
        print(f"prompt: {shown.strip()[-200:]!r}" + (f" (after {earlier} earlier turns)" if earlier else ""))
        for label, answer, value in zip(("chosen", "rejected") if len(values) == 2 else ("answer",),
                                        item["answers"], values):
            print(f"  {value:+9.4f}  {label}: {answer.strip()[:200]!r}")
        right += len(values) == 2 and values[0] > values[1]
    pairs = sum(len(item["answers"]) == 2 for item in items)
    if pairs:
        print(f"chosen scored above rejected in {right}/{pairs} pairs")


def run(args, explicit: set) -> None:
    """The command line: --smoke's preset, then training or --score."""
    if args.smoke:
        apply_smoke(args, explicit)
    if args.score:
        score_main(args)
    else:
        main(args, explicit)


if __name__ == "__main__":
    runner.run_script(sys.modules[__name__], validate_args, run)
