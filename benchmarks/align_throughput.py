"""The alignment rows of the throughput benchmark, on DistilGPT2's real architecture and real HH-RLHF data: align.py's
DPO defaults against TRL DPOTrainer's defaults, and a step of align.py's RLOO and GRPO against TRL's own RLOOTrainer
and GRPOTrainer with the same settings, phase by phase.

    python benchmarks/align_throughput.py            # 48 pairs, DPO rows at every precision, then the online rows
    python benchmarks/align_throughput.py --rows rloo,trl-rloo,grpo,trl-grpo   # the online rows only (~15 min)
    python benchmarks/align_throughput.py --quick    # 16 pairs, 2 online steps: a quick check that every row runs

Every DPO row trains one epoch from the same random initial weights (saved once, so TRL can load its
reference copy from them) on the same pairs, batch size and learning rate. Its time runs from building the
trainer to the end of training, so it includes align.py's one reference pass before training and TRL's
loading of its reference model. Each row runs in its own process, so its peak memory is its own. The online
rows report seconds per step, peak memory, the share of each phase of the steps (phases.py: TRL's trainers are
timed by the same clock) and the sampling speed. Results go to benchmarks/results/align-throughput-cpu.{json,md}
(DPO) and align-online-throughput-cpu.{json,md} (RLOO, GRPO).
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import _peak_mb, plan, scratch_dir, run_workers, script_main, write_results  # noqa: E402  (the shared tools)

# ---- settings (each has a flag: BATCH_SIZE -> --batch-size) ----
MODEL = os.path.join(ROOT, "..", "shared", "distilgpt2-config")  # config.json + tokenizer (random weights)
DATASET = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-base-test.jsonl.gz")  # HH-RLHF pairs
PAIRS = 48  # pairs trained on by the DPO rows (the first N usable ones); >= 16
BATCH_SIZE = 8  # pairs (DPO) or prompts (RLOO) per step in every row (align.py's default; TRL DPO's too)
MAX_LENGTH = 512  # align.py's default; pairs longer than this are left out of every row
RLOO_STEPS = 3  # steps of each online row (RLOO, GRPO) run, the first left out as warm-up; >= 2
ROWS = "default,trl,rloo,trl-rloo,grpo,trl-grpo"  # comma-separated subset of ALL_ROWS
PRECISIONS = "auto"  # comma-separated subset of fp32,bf16; auto = every precision this machine offers
QUICK = False  # 16 pairs and 2 RLOO steps: check that every row runs
WORKER = ""  # internal: run one row (ROW:PRECISION) in this process and print its JSON

DPO_ROWS = ("default", "checkpointed", "trl")
ALL_ROWS = DPO_ROWS + ("rloo", "trl-rloo", "grpo", "trl-grpo")
LABELS = {"default": "align.py --method dpo defaults (packed pairs, reference pass once, no checkpointing)",
          "checkpointed": "align.py --method dpo with gradient checkpointing",
          "trl": "TRL DPOTrainer defaults (reference model, gradient checkpointing)",
          "rloo": "align.py --method rloo defaults (packed answer-only log-probs)",
          "trl-rloo": "TRL RLOOTrainer, same settings",
          "grpo": "align.py --method grpo defaults (packed answer-only log-probs)",
          "trl-grpo": "TRL GRPOTrainer, same settings"}
TRL_NAMES = {"rloo": "RLOOTrainer", "grpo": "GRPOTrainer"}
PHASE_HEADS = ("sampling", "rewards", "reference", "update")  # phases.PHASES, the table's columns


def _setup(workdir: str, n: int):
    """(policy dir with the random initial weights, tokenizer, the first n usable pairs that fit, their tokens)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuning.models import loading
    from tuning.data import preferences
    from tuning.data.chat_template import own_chat_template

    tokenizer = loading.load_tokenizer(MODEL)
    tokenizer.chat_template = own_chat_template("seed", tokenizer)  # as align.py's SFT model carries it
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL))
    policy.save_pretrained(os.path.join(workdir, "policy"))
    tokenizer.save_pretrained(os.path.join(workdir, "policy"))
    pairs, _ = preferences.load_pairs(DATASET, skip_invalid=True)
    tokens, report = preferences.tokenize_pairs(pairs, tokenizer, "seed", MAX_LENGTH)
    fits = [p for i, p in enumerate(pairs) if i not in set(report["too_long_dropped"])]
    return os.path.join(workdir, "policy"), tokenizer, fits[:n], tokens[:n]


def _args(workdir: str, method: str, **settings):
    from types import SimpleNamespace

    import align

    defaults = {name.lower(): getattr(align, name) for name in ("EPOCHS", "MAX_STEPS", "WARMUP_RATIO", "SEED",
                                                                "NUM_GENERATIONS", "MAX_NEW_TOKENS", "TEMPERATURE",
                                                                "MISSING_EOS_PENALTY", "GRADIENT_CHECKPOINTING", "LORA",
                                                                "REPORT_TO", "LOSS_TYPE", "LABEL_SMOOTHING", "REWARD", "VLLM",
                                                                "REWARD_WEIGHTS")}
    return SimpleNamespace(**{**defaults, "output_dir": os.path.join(workdir, "out"), "method": method,
                              "batch_size": BATCH_SIZE, "eval_steps": 10**6, "save_steps": 10**6, "logging_steps": 1,
                              **align.DEFAULTS[method], **settings})


def run_dpo_row(row: str, precision: str, n: int) -> dict:
    import torch
    from datasets import Dataset

    from tuning.preference import align_trainers
    from tuning.models import loading

    workdir = scratch_dir()
    path, tokenizer, pairs, tokens = _setup(workdir, n)
    started = time.perf_counter()
    policy = loading.load_model(path, "pretrained", tokenizer)
    if row == "trl":
        from trl import DPOConfig, DPOTrainer

        from tuning.data import preferences

        data = Dataset.from_list([{"prompt": preferences.prompt_text(p, "seed", tokenizer), "chosen": p["chosen"],
                                   "rejected": p["rejected"]} for p in pairs])
        config = DPOConfig(output_dir=os.path.join(workdir, "out"), per_device_train_batch_size=BATCH_SIZE,
                           num_train_epochs=1, logging_steps=1, save_strategy="no", report_to="none",
                           use_cpu=True, bf16=precision == "bf16", seed=42, disable_tqdm=True,
                           learning_rate=5e-6, max_length=MAX_LENGTH)
        trainer = DPOTrainer(model=policy, args=config, train_dataset=data, processing_class=tokenizer)
    else:
        args = _args(workdir, "dpo", epochs=1.0)
        config = align_trainers.trl_config(args, torch.device("cpu"), precision)
        config.disable_tqdm, config.eval_strategy = True, "no"
        config.gradient_checkpointing = row == "checkpointed"
        data = {"train": Dataset.from_list(tokens), "validation": None}
        trainer = align_trainers.build_trainer(args, policy, tokenizer, config, data, None, [], None)
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"row": row, "precision": precision, "pairs": len(tokens), "steps": trainer.state.global_step,
            "pairs_per_s": len(tokens) / seconds, "seconds": seconds, "mean_loss": sum(losses) / len(losses),
            "peak_mb": _peak_mb()}


def run_online_row(row: str, precision: str, steps: int) -> dict:
    """`steps` steps of RLOO or GRPO at align.py's defaults (8 prompts x 4 answers, up to 128 new tokens) against a
    random reward model of the same architecture: align.py's trainer, or TRL's own (trl-rloo, trl-grpo: its
    trainer as it comes, with the same config, and the reward model as TRL scores one), both timed by phases.py.
    The first step is left out as warm-up."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import GRPOTrainer, RLOOTrainer

    from tuning.data import preferences
    from tuning.data.templates import write_template
    from tuning.models import loading, scoring
    from tuning.preference import align_trainers, phases

    method = row.removeprefix("trl-")
    workdir = scratch_dir()
    path, tokenizer, pairs, _ = _setup(workdir, BATCH_SIZE * (steps + 1))
    rm = scoring.reward_model_from(path)
    torch.manual_seed(1)
    with torch.no_grad():
        rm.score.weight.normal_(std=0.02)  # a random judge: its scores vary, as a trained one's do
    scoring.without_pad_id(rm)
    rm.save_pretrained(os.path.join(workdir, "rm"))
    tokenizer.save_pretrained(os.path.join(workdir, "rm"))
    write_template(os.path.join(workdir, "rm"), "seed")
    del rm
    args = _args(workdir, method, max_steps=steps)
    config = align_trainers.trl_config(args, torch.device("cpu"), precision)
    config.disable_tqdm, config.eval_strategy = True, "no"
    prompts = [preferences.pair_prompt(p, "seed") for p in pairs]
    policy = loading.load_model(path, "pretrained", tokenizer)
    if row.startswith("trl-"):
        trl_class = GRPOTrainer if method == "grpo" else RLOOTrainer
        timed = type(f"Timed{trl_class.__name__}", (phases.PhaseTimes, trl_class), {})
        judge = AutoModelForSequenceClassification.from_pretrained(os.path.join(workdir, "rm"))
        trainer = timed(model=policy, args=config, train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                        processing_class=tokenizer, reward_funcs=judge, reward_processing_classes=tokenizer)
    else:
        judge = align_trainers.Judge(os.path.join(workdir, "rm"), torch.device("cpu"),
                                     BATCH_SIZE * args.num_generations, args.missing_eos_penalty)
        data = {"train": Dataset.from_list([{"prompt": p, "judge_prompt": p} for p in prompts]), "validation": None}
        trainer = align_trainers.build_trainer(args, policy, tokenizer, config, data, judge, [], None)
    ends, seconds, tokens = [], [], []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())
            seconds.append(dict(trainer.phase_seconds))
            tokens.append(trainer.generated_tokens)

    trainer.add_callback(Timer())
    trainer.train()
    spent = {phase: seconds[-1][phase] - seconds[0][phase] for phase in phases.PHASES}
    total = ends[-1] - ends[0]
    return {"row": row, "precision": precision, "steps": len(ends), "seconds_per_step": total / (len(ends) - 1),
            "phase_shares": phases.shares(spent), "phase_seconds_per_step": {
                phase: value / (len(ends) - 1) for phase, value in spent.items()},
            "completions_per_s": BATCH_SIZE * args.num_generations * (len(ends) - 1) / total,
            "generated_tokens_per_s": (tokens[-1] - tokens[0]) / max(1e-9, spent["sampling"]), "peak_mb": _peak_mb()}


def summarize(results: list[dict], auto: str) -> str:
    lines = []
    if any(r["row"] in DPO_ROWS for r in results):
        lines = ["| DPO | precision | pairs/s | peak RSS (MB) | mean loss |", "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {LABELS[r['row']]} | {r['precision']} | {r['pairs_per_s']:.2f} | {r['peak_mb']:.0f} | "
                  f"{r['mean_loss']:.4f} |" for r in results if r["row"] in DPO_ROWS] + [""]
    by = {(r["row"], r["precision"]): r for r in results}
    ours, trl = by.get(("default", auto)), by.get(("trl", "bf16")) or by.get(("trl", auto))
    if ours and trl:  # the target: each side's defaults (align.py: --precision auto; TRL: bf16)
        speed, memory = ours["pairs_per_s"] / trl["pairs_per_s"], ours["peak_mb"] / trl["peak_mb"]
        lines.append(f"- defaults: align.py ({auto}) vs TRL DPOTrainer ({trl['precision']}) (target: >= 1x as fast, "
                     f"<= 100% memory): {speed:.2f}x pairs/s, {memory:.0%} peak memory "
                     f"{'PASS' if speed >= 1 and memory <= 1 else 'FAIL'}")
    online = [r for r in results if r["row"] not in DPO_ROWS]
    if online:
        lines += [f"| online RL step ({BATCH_SIZE} prompts x 4 answers) | precision | s/step | peak RSS (MB) | "
                  + " | ".join(PHASE_HEADS) + " | sampled tokens/s |", "| --- | --- | ---: | ---: | "
                  + " | ".join("---:" for _ in PHASE_HEADS) + " | ---: |"]
        lines += [f"| {LABELS[r['row']]} | {r['precision']} | {r['seconds_per_step']:.1f} | {r['peak_mb']:.0f} | "
                  + " | ".join(f"{r['phase_shares'][phase]:.0%}" for phase in PHASE_HEADS)
                  + f" | {r['generated_tokens_per_s']:.0f} |" for r in online]
        lines.append("")
    for method in ("rloo", "grpo"):
        ours, trl = by.get((method, auto)), by.get((f"trl-{method}", auto))
        if ours and trl:
            speed, memory = trl["seconds_per_step"] / ours["seconds_per_step"], ours["peak_mb"] / trl["peak_mb"]
            lines.append(f"- {method.upper()}: align.py vs TRL {TRL_NAMES[method]}, both {auto} (target: >= 3x as fast, "
                         f"<= 40% memory): {speed:.2f}x steps/s, {memory:.0%} peak memory "
                         f"{'PASS' if speed >= 3 and memory <= 0.4 else 'FAIL'}")
    ours = by.get(("rloo", auto))
    if ours:
        lines.append(f"- RLOO: align.py's step at its defaults (target: < 4,096 MB peak): {ours['peak_mb']:.0f} MB "
                     f"{'PASS' if ours['peak_mb'] < 4096 else 'FAIL'}")
    return "\n".join(lines)


def main(args) -> None:
    n, steps = (16, 2) if args.quick else (args.pairs, args.rloo_steps)
    rows, precisions, auto = plan(args.rows, ALL_ROWS, args.precisions)
    common = [f"--model={args.model}", f"--dataset={args.dataset}", f"--batch-size={args.batch_size}",
              f"--max-length={args.max_length}", "--pairs", str(n), "--rloo-steps", str(steps)]
    results = run_workers(__file__, [r for r in rows if r in DPO_ROWS], precisions, common, f"{n} pairs",
                          lambda r: f"{r['pairs_per_s']:.2f} pairs/s")
    results += run_workers(__file__, [r for r in rows if r not in DPO_ROWS], [auto], common, f"{steps} steps",
                           lambda r: f"{r['seconds_per_step']:.1f} s/step")
    header = (f"Model: DistilGPT2 architecture (random weights); CPU threads: {os.cpu_count()}; `--precision auto` "
              f"picks {auto} here; TRL's default is bf16. DPO: the first {n} usable pairs of "
              f"{os.path.basename(args.dataset)} that fit {args.max_length} tokens, batch size {args.batch_size}, one "
              "epoch per row, timed from building the trainer (reference pass or reference model included). Online RL: "
              f"{steps} steps of {args.batch_size} of their prompts x 4 answers (up to 128 new tokens), the first left "
              "out, against a random reward model of the same architecture; each phase's share of the steps "
              "(phases.py: the reference and old-policy log-probs together).\n")
    table = summarize(results, auto)
    print("\n" + header + "\n" + table)
    if not args.quick:  # (each part's file holds its latest run)
        for name, part in (("align-throughput-cpu", DPO_ROWS), ("align-online-throughput-cpu", ALL_ROWS[3:])):
            ran = [r for r in results if r["row"] in part]
            if ran:
                write_results(name, {"pairs": n, "steps": steps, "batch_size": args.batch_size, "auto_precision": auto,
                                     "results": ran}, header, summarize(ran, auto))

if __name__ == "__main__":
    script_main(sys.modules[__name__], ("model", "dataset", "batch_size", "max_length"),
                lambda row, precision, flags: run_dpo_row(row, precision, flags.pairs) if row in DPO_ROWS
                else run_online_row(row, precision, flags.rloo_steps))
