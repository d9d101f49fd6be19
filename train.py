"""Fine-tune DistilGPT2 (or any causal LM) on Alpaca instructions with the Hugging Face Trainer.

    python train.py                      # distilgpt2 on tatsu-lab/alpaca -> distilgpt2-alpaca/
    python train.py --smoke              # offline: tiny GPT-2 on generated tasks, about a minute on a CPU
    torchrun --nproc_per_node 2 train.py # DDP on 2 GPUs (or CPU processes); `accelerate launch` works too

Running the same command again after an interruption continues from the newest checkpoint.
"""

from __future__ import annotations

import math
import os
import shlex
import sys

from tuning.runs import checks, launchers, runner

# ---- settings (each has a flag: BATCH_SIZE -> --batch-size) ----
MODEL = "distilgpt2"  # Hub id or local directory of the causal LM to fine-tune
INIT = "pretrained"  # pretrained|scratch: start from the weights, or random weights from the config
DATASET = "tatsu-lab/alpaca"  # Hub dataset id, a .json/.jsonl file of records, or a datasetup.py --save dir
FORMAT = "auto"  # auto|alpaca|messages|sharegpt|hh: the records' format (auto: read from the first record)
TEMPLATE = "seed"  # prompt template: seed|alpaca (see datasetup.py); conversations: the chat template made from it
TRAIN_ON = "all_assistant"  # conversations: all_assistant|last_assistant, the assistant turns that carry the loss
OUTPUT_DIR = "distilgpt2-alpaca"  # checkpoints, final model, metrics.json, run_config.json, loss_curve.png
EPOCHS = 3.0  # passes over the training split (a fraction is fine)
MAX_STEPS = -1  # optimizer steps to run; -1 = set by EPOCHS
BATCH_SIZE = 8  # examples per device per forward pass; >= 1
GRAD_ACCUM = 4  # forward passes per optimizer step (effective batch = BATCH_SIZE x GRAD_ACCUM x devices)
LR = 1e-4  # peak learning rate of AdamW
LR_SCHEDULER = "cosine"  # learning-rate schedule: cosine|linear|constant|constant_with_warmup
WARMUP_RATIO = 0.03  # share of the steps spent warming the learning rate up; in [0, 1)
WEIGHT_DECAY = 0.0  # AdamW weight decay; >= 0
MAX_LENGTH = 512  # tokens per example, at most the model's positions (the default is lowered to fit them); the response is cut, never the prompt
VAL_SIZE = 0.02  # validation records: a count (>= 1) or a fraction in (0, 1)
EVAL_STEPS = 500  # evaluate every N optimizer steps; >= 1
SAVE_STEPS = 500  # write checkpoint-N/ every N optimizer steps; >= 1
SAVE_TOTAL_LIMIT = 3  # checkpoints kept (older ones are deleted); >= 1
LOGGING_STEPS = 50  # log the training loss every N steps; >= 1
SEED = 42  # seed of the data split, the shuffling and the initial weights
PRECISION = "auto"  # auto|fp32|bf16|fp16: auto = bf16 where supported, fp16 on older GPUs, fp32 on MPS
PACKING = "auto"  # auto|none|rows|flat: how a batch is laid out (tuning/data/collate.py); auto picks the fastest
ORDER = "random"  # random|length: batch order; length groups similar lengths (less padding, but learns less)
TRAIN_ON_PROMPT = False  # also put loss on the prompt tokens (off: the response and its EOS only)
LORA = False  # train LoRA adapters (peft) beside the frozen weights instead of every weight; saves the adapter
LORA_R = 16  # --lora: rank of each adapter; >= 1
LORA_ALPHA = 32.0  # --lora: adapter scale numerator (the update is scaled by alpha / r); > 0
LORA_DROPOUT = 0.05  # --lora: dropout on the adapters' input; in [0, 1)
LORA_TARGET = "auto"  # --lora: layers to adapt: auto = every linear layer of the attention and MLP blocks, or a comma list
MERGE = False  # --lora: also write the merged full weights to OUTPUT_DIR/merged
GRADIENT_CHECKPOINTING = False  # recompute activations in the backward pass: less memory, about a third slower
REPORT_TO = "none"  # where the Trainer also logs: none, tensorboard (OUTPUT_DIR/runs), wandb, ... or a comma list
SKIP_INVALID = False  # drop malformed data records instead of stopping
RESUME = True  # continue from the newest checkpoint in OUTPUT_DIR; --no-resume starts fresh
DEVICE = "auto"  # auto|cuda|mps|cpu: auto picks CUDA, then Apple MPS, then CPU
SMOKE = False  # offline preset (tuning/smoke.py): tiny GPT-2, generated tasks, to smoke-run/; --lora: a new task; --format messages: chats; --dataset: more

# A run's identity: resuming with any of these changed would silently mix two different runs.
# The learning-rate settings belong here too: a resumed optimizer and scheduler would silently keep the old ones.
IDENTITY = ("model", "init", "dataset", "format", "template", "train_on", "max_length", "train_on_prompt", "val_size",
            "seed",
            "epochs", "max_steps", "batch_size", "grad_accum", "lr", "lr_scheduler", "warmup_ratio", "weight_decay",
            "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target")


def validate_args(args) -> None:
    from tuning.models import lora
    from tuning.cli import check_all
    from tuning.data.records import val_size_problems

    problems = [f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})"
                for name in ("batch_size", "grad_accum", "eval_steps", "save_steps", "save_total_limit",
                             "logging_steps", "max_length") if getattr(args, name) < 1]
    if args.epochs <= 0 and args.max_steps <= 0:
        problems.append(f"--epochs must be > 0 (got {args.epochs}) unless --max-steps is set")
    if args.lr <= 0:
        problems.append(f"--lr must be > 0 (got {args.lr})")
    if not 0 <= args.warmup_ratio < 1:
        problems.append(f"--warmup-ratio must be in [0, 1) (got {args.warmup_ratio})")
    if args.weight_decay < 0:
        problems.append(f"--weight-decay must be >= 0 (got {args.weight_decay})")
    problems += lora.problems(args) + checks.report_to_problems(args.report_to)
    check_all(problems + val_size_problems(args.val_size))


def apply_smoke(args, explicit: set) -> None:
    """--smoke: the offline preset's model, data and settings, except for flags given on the command line."""
    from tuning import smoke
    from tuning.cli import UserError

    clash = [f"--{name.replace('_', '-')}" for name in ("model", "init") if name in explicit]
    if clash:
        raise UserError(f"--smoke brings its own model, so it can't be combined with {', '.join(clash)}; "
                        "drop --smoke to train another")
    chat, more = smoke_chat(args), "dataset" in explicit
    if more and (args.lora or chat or "output_dir" not in explicit):
        raise UserError("--smoke --dataset FILE continues the smoke SFT model on FILE (as the Constitutional AI "
                        "pipeline does on its revisions): name the new run's --output-dir, and leave out --lora and "
                        "--format messages")
    if args.format not in ("auto", "alpaca", "messages"):
        raise UserError(f"--smoke --format {args.format}: the smoke data is Alpaca records (--format auto), or, with "
                        "--format messages, conversations")
    if chat and args.lora:
        raise UserError("--smoke takes --lora (a new task) or --format messages (conversations), not both")
    extra = (smoke.LORA_SETTINGS if args.lora else smoke.CHAT_SETTINGS if chat else
             smoke.ARITHMETIC_SETTINGS if more and smoke.is_arithmetic_data(args.dataset) else
             smoke.CONTINUE_SETTINGS if more else {})
    for name, value in {**smoke.TRAIN_SETTINGS, **extra}.items():
        if name not in explicit:
            setattr(args, name, value)
    if args.lora or chat or more:  # the smoke SFT model learns more: a new task (LoRA), conversations, or FILE
        if not os.path.isfile(os.path.join(smoke.OUTPUT_DIR, "model", "config.json")):
            variant = "--lora" if args.lora else "--format messages" if chat else "--dataset"
            raise UserError(f"--smoke {variant} continues from the smoke SFT model in {smoke.OUTPUT_DIR}/model/: run "
                            "`python train.py --smoke` first")
        data = "lora-data.json" if args.lora else "chat-data.jsonl"
        args.model = os.path.join(smoke.OUTPUT_DIR, "model")
        if not more:
            args.dataset = os.path.join(smoke.OUTPUT_DIR, data)
    else:
        args.model, args.dataset = os.path.join(smoke.OUTPUT_DIR, "base"), os.path.join(smoke.OUTPUT_DIR, "data.json")
    if "output_dir" not in explicit:
        args.output_dir = os.path.join(smoke.OUTPUT_DIR, "lora" if args.lora else "chat" if chat else "model")
    args.init = "pretrained"


def smoke_chat(args) -> bool:
    """--smoke --format messages: the smoke tasks as conversations, with a two-turn task (smoke.TWO_TURN)."""
    return args.smoke and args.format == "messages"


def use_saved_settings(args, explicit: set) -> set:
    """--dataset DIR from `datasetup.py --save`: its template, max length, prompt loss and split size, unless
    given as flags. Returns the settings it took from there (given ones, not defaults)."""
    from tuning.data import tokencache

    taken = set()
    if tokencache.is_saved_dir(args.dataset):
        saved = tokencache.saved_settings(args.dataset)
        for name in ("template", "max_length", "train_on_prompt", "val_size"):
            if name not in explicit and saved.get(name) is not None:
                setattr(args, name, saved[name])
                taken.add(name)
    return taken


def fit_max_length(args, given: set, say) -> None:
    """--max-length against the positions of the model to train (checks.fit_max_length's rule). The smoke base
    model is written later, by the run itself, from smoke.MODEL_CONFIG."""
    from tuning import smoke

    fresh_smoke = args.smoke and not os.path.isfile(os.path.join(args.model, "config.json"))  # written by the run
    positions = smoke.MODEL_CONFIG["n_positions"] if fresh_smoke else checks.model_positions(args.model)
    checks.fit_max_length(args, given, args.model, positions, say)


def data_report(args, report: dict, data, say) -> dict | None:
    """Says what was read and left out (malformed records under --skip-invalid, empty instructions or outputs,
    prompts longer than --max-length); returns it for run_config.json. None for a datasetup.py --save dir, whose
    records were read (and reported) when it was made."""
    from tuning.data.records import left_out_report, say_left_out

    if "read" not in report:
        return None
    too_long = sum(report["records_per_split"].values()) - len(data["train"]) - len(data["validation"])
    say_left_out(args.dataset, report, too_long, f"whose prompt alone is longer than --max-length {args.max_length}",
                 "records", say, empty="an empty instruction or output")
    return {**left_out_report(report, too_long), "empty_details": report["empty_details"]}


def conversational(loaded) -> bool:
    """Whether the records read are conversations (a datasetup.py --save dir is read as it was made)."""
    from tuning.data.conversations import is_conversation

    return bool(loaded and loaded[0] and is_conversation(loaded[0][0]))


def check_format_flags(args, explicit: set, conversations: bool) -> None:
    """--train-on chooses among a conversation's assistant turns: given for Alpaca records, it would do nothing."""
    from tuning.cli import UserError

    if "train_on" in explicit and not conversations:
        raise UserError(f"--train-on applies to conversations; {args.dataset} holds Alpaca records (one answer each)")


def audit(data, tokenizer, collator, args, say) -> None:
    """The label audit (label_audit.py) on the tokenized conversations: stops on any problem; shows what one
    training example teaches."""
    from tuning.data import label_audit

    label_audit.require_sound_labels(data, tokenizer, collator)
    taught = ("every token (--train-on-prompt)" if args.train_on_prompt else
              f"{args.train_on.replace('_', ' ')} turns and their end-of-turn token ({tokenizer.eos_token!r})")
    say(f"Labels: {taught}; checked on every example. Example 0 of train, trained tokens in [[ ]]:")
    say("  " + label_audit.marked_example(data["train"][0], tokenizer).replace("\n", "\n  "))


def choose_packing(model, examples: list[dict], packing: str, explicit: bool, pad_id: int, say) -> str:
    """`packing`, or "none" when this model lets packed examples attend to each other (OPT, BLOOM, MPT)."""
    from tuning.models.packing_checks import packed_loss_matches

    return checks.choose_packing(model, packing, explicit, say, "loss", len(examples),
                                 lambda: packed_loss_matches(model, examples, pad_id))


def main(args, explicit: set) -> None:
    import torch

    from tuning.data import chat_template, conversations, label_audit, sft, tokencache
    from tuning.models import lora
    from tuning.models import devices, loading, response_logits
    from tuning import rundir
    from tuning.data.collate import SFTCollator
    from tuning.data.templates import write_template

    device = devices.get_device(args.device)
    precision, why = devices.resolve_precision(args.precision, device)
    if args.smoke and "precision" not in explicit:
        why = "set by --smoke"
    packing, attn = checks.resolve_packing(args.packing, device, precision)
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    loading.refuse_reward_model(args.model, "--model")  # at start, not after reading and tokenizing the data
    fit_max_length(args, explicit | use_saved_settings(args, explicit), say)
    from transformers import TrainingArguments  # (seconds to import, after the checks that refuse a start)

    from tuning.runs.plots import plot_loss_curve
    from tuning.runs.trainer import InstructTrainer, StopOnSignal, report_targets

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # started by torchrun / accelerate launch
    config = {**vars(args), "device": device.type, "precision": precision,
              "model_path": rundir.model_path(args.model),  # the base model of inference.py and evaluation.py
              "command": shlex.join(["python", "train.py", *sys.argv[1:]])}

    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_ratio, weight_decay=args.weight_decay, eval_strategy="steps",
        eval_steps=args.eval_steps, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, logging_steps=args.logging_steps, seed=args.seed,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device.type == "cpu",
        ddp_backend="gloo" if device.type == "cpu" and distributed else None, remove_unused_columns=False,
        report_to=report_targets(args.report_to, args.output_dir),
        dataloader_pin_memory=device.type == "cuda", prediction_loss_only=True,
        activation_checkpointing=args.gradient_checkpointing,
        ddp_find_unused_parameters=None,  # set below: off where every trainable weight is used (no extra graph pass)
        train_sampling_strategy="group_by_length" if args.order == "length" else "random")
    main_process = training_args.process_index == 0
    say = print if main_process else (lambda *a, **k: None)

    checkpoint = runner.open_output_dir(args.output_dir, config, IDENTITY, args.resume, training_args, say)
    say(f"Device: {device.type} x {training_args.world_size}; precision: {precision} ({why})")

    with training_args.main_process_first(desc="preparing data"):
        if args.smoke:
            from tuning import smoke

            smoke.prepare(os.path.dirname(args.model))
            if args.lora:
                smoke.prepare_lora(os.path.dirname(args.model))
            if smoke_chat(args):
                smoke.prepare_chat(os.path.dirname(args.model))
            smoke.prepare_named(args.dataset)  # (the arithmetic task's data, the first time it is named)
        # Records first: a bad data file is reported before any model download.
        loaded = None if tokencache.is_saved_dir(args.dataset) else conversations.load_training_records(
            args.dataset, args.format, args.skip_invalid)
        tokenizer = loading.load_tokenizer(args.model, smoke_hint=True)
        is_chat = conversational(loaded)
        chat = chat_template.chat_template_for(tokenizer, args.template, is_chat)
        check_format_flags(args, explicit, is_chat)
        if is_chat:
            label_audit.require_generation_markers(chat, args.model)
        data, report = sft.prepare_datasets(args.dataset, tokenizer, args.template, args.max_length,
                                            args.val_size, args.seed, args.train_on_prompt, args.skip_invalid,
                                            loaded, chat, args.train_on)
    tokenizer.chat_template = chat  # saved with every checkpoint and the model: plain transformers renders alike
    left_out = data_report(args, report, data, say)
    say(f"Data: {len(data['train'])} train / {len(data['validation'])} validation examples"
        f" ({'cached' if report.get('from_cache') else 'tokenized'})")
    torch.manual_seed(args.seed)
    model = loading.load_model(args.model, args.init, tokenizer)
    model.config.use_cache = False  # no KV cache in training; GPT-2 also needs this to keep packed examples apart
    # Checked on a few real training examples: packing keeps them apart, and response-only logits give the
    # model's own loss; otherwise the plain path is used.
    probe = checks.probe_examples(data["train"])
    packing = choose_packing(model, probe, packing, "packing" in explicit, tokenizer.pad_token_id, say)
    if is_chat:  # before the first step, with the collator training uses
        audit(data, tokenizer, SFTCollator(tokenizer.pad_token_id, packing), args, say)
    sparse = response_logits.enable_response_only_logits(model, SFTCollator(tokenizer.pad_token_id, packing)(probe))
    if attn and packing == "flat":  # after the checks, which run in fp32 on the CPU, where FlashAttention can't
        model.set_attn_implementation(attn)
    say(f"Packing: {packing}; response-only logits: {'on' if sparse else 'off (the model transforms its logits)'}")
    if args.lora:  # after the checks above, which compare the plain model's own forward passes
        model = lora.add_lora(model, rundir.model_path(args.model), args.lora_r, args.lora_alpha, args.lora_dropout,
                              args.lora_target, seed=args.seed)
    say(f"Parameters: {lora.describe(model)}{' (LoRA)' if args.lora else ''}")
    probe_batch = {k: v for k, v in SFTCollator(tokenizer.pad_token_id, packing)(probe).items() if k != "num_real_tokens"}
    launchers.find_unused_parameters(model, lambda m: m(**probe_batch).loss, training_args, say)
    config.update(packing=packing, n_train=len(data["train"]), n_val=len(data["validation"]),
                  world_size=training_args.world_size, response_only_logits=sparse, data_report=left_out)
    if report.get("held_out") is not None:
        config["held_out_sha256"] = rundir.records_sha256(report["held_out"])
        if checkpoint:  # a Hub dataset that changed since the run began would silently change its split
            rundir.check_same_run(args.output_dir, config, ("held_out_sha256",))
    if main_process:
        if report.get("held_out") is not None:
            rundir.write_records(os.path.join(args.output_dir, rundir.HELD_OUT_FILE), report["held_out"])
        rundir.write_json(os.path.join(args.output_dir, rundir.RUN_CONFIG_FILE), config)

    stopper = StopOnSignal(announce=main_process)
    trainer = InstructTrainer(
        model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
        data_collator=SFTCollator(tokenizer.pad_token_id, packing, 8 if device.type == "cuda" else None),
        processing_class=tokenizer, callbacks=[stopper],
        checkpoint_files=lambda directory: write_template(directory, args.template))

    if not checkpoint:
        say("Evaluating the model before fine-tuning ...")
    before = runner.evaluate_once(trainer, "before", checkpoint, args.output_dir, main_process)
    say(f"Before: eval loss {before['before_loss']:.4f}, perplexity {math.exp(before['before_loss']):.2f}")

    with runner.guarded(args.output_dir, main_process):
        runner.train(trainer, stopper, checkpoint, args.output_dir)
        after = trainer.evaluate()
        trainer.save_model(args.output_dir)
        metrics = runner.run_metrics(trainer)  # a collective: every process must reach it
        if main_process:
            write_template(args.output_dir, args.template)
            if args.merge:
                merged = os.path.join(args.output_dir, rundir.MERGED_DIR)
                lora.save_merged(args.output_dir, merged, loading.load_model)
                write_template(merged, args.template)
            metrics.update({
                "eval_loss_before": before["before_loss"], "eval_loss_after": after["eval_loss"],
                "eval_perplexity_before": math.exp(before["before_loss"]),
                "eval_perplexity_after": math.exp(after["eval_loss"]), "device": device.type, "precision": precision,
                "packing": packing, "world_size": training_args.world_size, "peak_memory_mb": trainer.peak_memory_mb()})
            plot_loss_curve(trainer.state.log_history, before["before_loss"],
                            os.path.join(args.output_dir, "loss_curve.png"))
            rundir.write_json(os.path.join(args.output_dir, rundir.METRICS_FILE), metrics)  # last: the run is finished
    runner.finish(trainer)
    if not main_process:
        return
    say(f"\nEval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f}  (perplexity "
        f"{metrics['eval_perplexity_before']:.2f} -> {metrics['eval_perplexity_after']:.2f})")
    merged = f"; the merged full weights in {os.path.join(args.output_dir, rundir.MERGED_DIR)}/" if args.merge else ""
    say(f"{metrics['train_tokens_per_second']:.0f} real tokens/s on {device.type}; model, metrics.json and "
        f"loss_curve.png in {args.output_dir}/{merged}")


def run(args, explicit: set) -> None:
    """The command line: --smoke's preset, then the run."""
    if args.smoke:
        apply_smoke(args, explicit)
    main(args, explicit)


if __name__ == "__main__":
    runner.run_script(sys.modules[__name__], validate_args, run)
