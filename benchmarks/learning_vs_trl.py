"""Do steps 2 and 3 learn as much as TRL's own trainers at the same budget? The smoke preset, side by side.

    python benchmarks/learning_vs_trl.py                 # about 6 minutes on 2 CPU cores
    python benchmarks/learning_vs_trl.py --stages reward # the reward models only (about 2 minutes)

From one smoke SFT model (`train.py --smoke`, whose greeting is polite about half the time), with the same
held-out split:
- reward model: reward.py against TRL's RewardTrainer (its defaults but the budget), both trained on the smoke
  pairs; held-out pairwise accuracy, each model scoring as it trained;
- RLOO: align.py --method rloo against TRL's RLOOTrainer (its defaults but the budget), each against the
  reward model of its own stage; the share of held-out greetings answered in the preferred (polite) style, and
  exact match on the other held-out tasks, greedy.
Each side runs in its own process. Results go to benchmarks/results/learning-vs-trl.{json,md}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import scratch_dir  # noqa: E402  (a temporary directory removed at exit)

# ---- settings (each has a flag: RM_STEPS -> --rm-steps) ----
STAGES = "reward,rloo"  # which stages to compare: reward, rloo, or both (rloo needs the reward models)
RM_STEPS = 200  # reward model: optimizer steps
RM_BATCH = 16  # reward model: pairs a step
RM_LR = 3e-4  # reward model: peak learning rate
RLOO_STEPS = 100  # RLOO: optimizer steps
RLOO_PROMPTS = 8  # RLOO: prompts a step (TRL counts its batch in answers: this times RLOO_GENERATIONS)
RLOO_GENERATIONS = 4  # RLOO: answers sampled a prompt
RLOO_LR = 1e-5  # RLOO: peak learning rate
RLOO_BETA = 0.05  # RLOO: KL coefficient
NEW_TOKENS = 16  # RLOO: most tokens a sampled answer
SEED = 42  # seed of both sides' training
WORKDIR = ""  # a directory where `train.py --smoke` has run; empty = a new one (the SFT run takes ~2.5 min)
WORKER = ""  # internal: run one side (trl-reward, trl-rloo) in this process and print its result as JSON

SMOKE_SFT, SMOKE_PAIRS = os.path.join("smoke-run", "model"), os.path.join("smoke-run", "pairs.json")
VAL_SIZE = 200  # the smoke preset's held-out pairs and prompts (the same split on both sides)


def held_out_style(model_dir: str) -> dict:
    """Greedy answers to the SFT run's held-out prompts: the share of greetings in the preferred (polite) style,
    and of the other tasks answered exactly right."""
    import torch

    from tuning import smoke
    from tuning.data import records, templates
    from tuning.generation import generate

    held_out, _ = records.held_out_records(SMOKE_SFT)
    lm, tokenizer = generate.load_for_generation(model_dir, torch.device("cpu"), "model")
    answers = generate.generate(lm, tokenizer, [templates.format_prompt(r, "seed") for r in held_out],
                                {"max_new_tokens": 32, "do_sample": False}, batch_size=50)
    greet = [(r, a["text"]) for r, a in zip(held_out, answers) if r["instruction"] == smoke.GREETING]
    other = [(r, a["text"]) for r, a in zip(held_out, answers) if r["instruction"] != smoke.GREETING]
    polite = sum(text == smoke.STYLES["polite"].format(names=r["input"]) for r, text in greet)
    return {"preferred_style": polite / len(greet), "greetings": len(greet),
            "other_exact": sum(smoke.is_right(r, text) for r, text in other) / len(other)}


def split_pairs():
    """The smoke pairs' train and held-out parts, split as reward.py --smoke splits them."""
    from tuning.data import preferences, records, templates

    template = templates.load_template(SMOKE_SFT)
    pairs, _ = preferences.load_pairs(SMOKE_PAIRS)
    train, held_out = records.split_records(pairs, VAL_SIZE, 42)
    rows = lambda part: [{"prompt": preferences.pair_prompt(p, template), "chosen": p["chosen"],  # noqa: E731
                          "rejected": p["rejected"]} for p in part]
    return rows(train), rows(held_out)


def trl_reward_model(out: str) -> dict:
    """TRL's RewardTrainer with its defaults but the budget; held-out accuracy by its own tokenization and forward
    (the score at the last token that is not the pad id)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    train, held_out = split_pairs()
    tokenizer = AutoTokenizer.from_pretrained(SMOKE_SFT)
    config = RewardConfig(output_dir=out, max_steps=RM_STEPS, per_device_train_batch_size=RM_BATCH,
                          learning_rate=RM_LR, seed=SEED, use_cpu=True, report_to="none", save_strategy="no",
                          eval_strategy="no", logging_steps=RM_STEPS, disable_tqdm=True)
    trainer = RewardTrainer(model=SMOKE_SFT, args=config, train_dataset=Dataset.from_list(train),
                            processing_class=tokenizer)
    trainer.train()
    held = trainer._prepare_dataset(Dataset.from_list(held_out), tokenizer, config, "eval")
    model, margins = trainer.model.eval(), []
    with torch.no_grad(), trainer.accelerator.autocast():
        for start in range(0, len(held), 16):
            batch = trainer.data_collator([held[i] for i in range(start, min(start + 16, len(held)))])
            chosen, rejected = model(**batch, use_cache=False).logits.squeeze(-1).float().chunk(2)
            margins += (chosen - rejected).tolist()
    trainer.save_model(out)
    tokenizer.save_pretrained(out)
    return {"accuracy": sum((m > 0) + 0.5 * (m == 0) for m in margins) / len(margins)}


def trl_rloo(out: str, reward_model: str) -> dict:
    """TRL's RLOOTrainer with its defaults but the budget, against TRL's reward model through its own path."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from tuning.data import preferences, records, templates

    template = templates.load_template(SMOKE_SFT)
    prompts, _ = preferences.load_prompts(SMOKE_PAIRS)
    train, _ = records.split_records(prompts, VAL_SIZE, 42)
    config = RLOOConfig(output_dir=out, max_steps=RLOO_STEPS, learning_rate=RLOO_LR, beta=RLOO_BETA, seed=SEED,
                        per_device_train_batch_size=RLOO_PROMPTS * RLOO_GENERATIONS, num_generations=RLOO_GENERATIONS,
                        max_completion_length=NEW_TOKENS, temperature=1.0, use_cpu=True, report_to="none",
                        save_strategy="no", logging_steps=RLOO_STEPS, disable_tqdm=True)
    trainer = RLOOTrainer(model=SMOKE_SFT, reward_funcs=reward_model, args=config,
                          train_dataset=Dataset.from_list([{"prompt": preferences.pair_prompt(p, template)}
                                                           for p in train]),
                          processing_class=AutoTokenizer.from_pretrained(SMOKE_SFT),
                          reward_processing_classes=AutoTokenizer.from_pretrained(reward_model))
    trainer.train()
    trainer.save_model(out)
    AutoTokenizer.from_pretrained(SMOKE_SFT).save_pretrained(out)
    shutil.copy(os.path.join(SMOKE_SFT, "sft_template.json"), out)
    return held_out_style(out)


def start(workdir: str, alone: bool, *command: str) -> subprocess.Popen:
    """A Python script started in `workdir`; `alone`: on one thread (two such jobs share 2 cores without the
    spin-waiting of two multi-threaded ones)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **({"OMP_NUM_THREADS": "1"}
                                                                                      if alone else {})}
    process = subprocess.Popen([sys.executable, *command], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    process.command = command
    return process


def finish(process: subprocess.Popen) -> str:
    """A started script's stdout, once it has ended; SystemExit with its stderr when it failed."""
    if not hasattr(process, "output"):
        process.output, error = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(process.command)} failed:\n{error[-3000:]}")
    return process.output


def run(workdir: str, *command: str) -> str:
    return finish(start(workdir, False, *command))


def worker(workdir: str, side: str, *flags: str, together: bool = False) -> dict:
    settings = [f"--{name.lower().replace('_', '-')}={globals()[name]}" for name in SETTINGS]
    output = finish(start(workdir, together, os.path.abspath(__file__), f"--worker={side}", *settings, *flags))
    return json.loads(output.splitlines()[-1])


SETTINGS = ("RM_STEPS", "RM_BATCH", "RM_LR", "RLOO_STEPS", "RLOO_PROMPTS", "RLOO_GENERATIONS", "RLOO_LR", "RLOO_BETA",
            "NEW_TOKENS", "SEED")


def compare(workdir: str, stages: str = STAGES, say=print, together: bool = False) -> dict:
    """{stage: {"ours": ..., "trl": ...}} for the stages asked, in `workdir` (where train.py --smoke has run). With
    `together`, both sides of a stage train at once, one thread each (what they learn is compared, not their
    speed: the tests' way, in about half the time on 2 cores)."""
    here = os.getcwd()
    os.chdir(workdir)  # (the smoke preset's paths are relative to it)
    try:
        return _compare(workdir, stages, say, together)
    finally:
        os.chdir(here)


def _compare(workdir: str, stages: str, say, together: bool) -> dict:
    from tuning import smoke

    smoke.prepare_pairs(os.path.dirname(SMOKE_PAIRS))  # (before two sides would read it while one writes it)
    results = {}
    trained = all(os.path.isfile(os.path.join(workdir, name, "metrics.json")) for name in ("rm-ours", "rm-trl"))
    if "reward" in stages or ("rloo" in stages and not trained):  # (RLOO reuses reward models trained before)
        say("reward model: reward.py and TRL's RewardTrainer ...")
        ours = start(workdir, together, os.path.join(ROOT, "reward.py"), "--smoke", "--max-steps", str(RM_STEPS),
                     "--batch-size", str(RM_BATCH), "--lr", str(RM_LR), "--seed", str(SEED), "--output-dir", "rm-ours")
        if not together:
            finish(ours)
        theirs = worker(workdir, "trl-reward", together=together)
        finish(ours)
        with open(os.path.join(workdir, "rm-ours", "metrics.json")) as handle:
            results["reward"] = {"ours": {"accuracy": json.load(handle)["eval_accuracy_after"]}, "trl": theirs}
        with open(os.path.join(workdir, "rm-trl", "metrics.json"), "w") as handle:
            json.dump(theirs, handle)
    if "rloo" in stages:
        say("RLOO: align.py and TRL's RLOOTrainer ...")
        ours = start(workdir, together, os.path.join(ROOT, "align.py"), "--method", "rloo", "--model", SMOKE_SFT,
                     "--dataset", SMOKE_PAIRS, "--reward-model", "rm-ours", "--max-steps", str(RLOO_STEPS),
                     "--batch-size", str(RLOO_PROMPTS), "--num-generations", str(RLOO_GENERATIONS), "--lr",
                     str(RLOO_LR), "--beta", str(RLOO_BETA), "--max-new-tokens", str(NEW_TOKENS), "--temperature", "1",
                     "--seed", str(SEED), "--max-length", "128", "--val-size", str(VAL_SIZE), "--precision", "fp32",
                     "--eval-steps", "1000", "--save-steps", "1000", "--output-dir", "rloo-ours")
        if not together:
            finish(ours)
        theirs = worker(workdir, "trl-rloo", together=together)
        finish(ours)
        results["rloo"] = {"ours": held_out_style(os.path.join(workdir, "rloo-ours")), "trl": theirs,
                           "sft": held_out_style(SMOKE_SFT)}
    return results


def table(results: dict) -> str:
    lines = ["| stage | measure | SFT model | this project | TRL's trainer |", "| --- | --- | ---: | ---: | ---: |"]
    if "reward" in results:
        lines.append(f"| reward model ({RM_STEPS} steps of {RM_BATCH} pairs, lr {RM_LR:g}) | held-out pairwise "
                     f"accuracy | 50.0% | {results['reward']['ours']['accuracy']:.1%} | "
                     f"{results['reward']['trl']['accuracy']:.1%} |")
    if "rloo" in results:
        ours, theirs, sft = results["rloo"]["ours"], results["rloo"]["trl"], results["rloo"]["sft"]
        budget = (f"RLOO ({RLOO_STEPS} steps of {RLOO_PROMPTS} prompts x {RLOO_GENERATIONS} answers, lr {RLOO_LR:g}, "
                  f"beta {RLOO_BETA:g})")
        lines.append(f"| {budget} | held-out greetings in the preferred style | {sft['preferred_style']:.1%} | "
                     f"{ours['preferred_style']:.1%} | {theirs['preferred_style']:.1%} |")
        lines.append(f"| {budget} | exact match on the other held-out tasks | {sft['other_exact']:.1%} | "
                     f"{ours['other_exact']:.1%} | {theirs['other_exact']:.1%} |")
    return "\n".join(lines)


def main(args) -> None:
    workdir = args.workdir or scratch_dir("learning-vs-trl-")
    if not os.path.isfile(os.path.join(workdir, SMOKE_SFT, "config.json")):
        print("SFT: train.py --smoke ...", flush=True)
        run(workdir, os.path.join(ROOT, "train.py"), "--smoke")
    results = compare(workdir, args.stages, lambda text: print(text, flush=True))
    text = table(results)
    print("\n" + text)
    base = os.path.join(ROOT, "benchmarks", "results", "learning-vs-trl")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".json", "w") as handle:
        json.dump(results, handle, indent=2)
    with open(base + ".md", "w") as handle:
        handle.write("Smoke preset, one SFT model, the same held-out split; TRL's trainers at their defaults but "
                     "the budget, each reward model scoring as it trained.\n\n" + text + "\n")
    print(f"\nwritten: {base}.json and .md")


if __name__ == "__main__":
    from tuning import cli

    parsed = cli.parse_or_exit(cli.build_parser(sys.modules[__name__]), lambda a: None)
    globals().update({name: getattr(parsed, name.lower()) for name in SETTINGS})
    if parsed.worker:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        done = trl_reward_model("rm-trl") if parsed.worker == "trl-reward" else trl_rloo("rloo-trl", "rm-trl")
        print(json.dumps(done))
    else:
        main(parsed)
