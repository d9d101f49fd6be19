"""Which step-3 method to pick? Each of align.py's methods, at its defaults, from one smoke SFT model.

    python benchmarks/methods.py                 # about 8 minutes on 2 CPU cores (more without WORKDIR's models)
    python benchmarks/methods.py --workdir DIR   # where train.py --smoke (and reward.py --smoke) already ran

The SFT model is the smoke one taught the arithmetic task (`train.py --smoke --dataset smoke-run/arithmetic.json`:
its greetings are polite about half the time, and half its sums forget the carry). From it, with align.py's smoke
defaults: DPO and IPO on the smoke preference pairs; RLOO and GRPO against the smoke reward model, on those pairs'
prompts; GRPO with --reward exact on the arithmetic prompts. Each aligned model answers, greedily, the SFT run's
200 held-out prompts and the 200 additions GRPO held out (which no run trained on), and is compared with the SFT
model on them:
- win rate over SFT, judged by the smoke reward model on the SFT run's held-out prompts, with its 95% bootstrap
  interval (evaluation.py's);
- the share of held-out greetings in the preferred (polite) style;
- exact match on the other held-out tasks (every smoke task but the greeting), and on the held-out additions;
- KL from SFT: the exact mean per-token KL(aligned || SFT) at the aligned model's answers, with its interval;
- the align.py run's wall time (the command, start to end) and peak memory (its metrics.json).
Results go to benchmarks/results/methods.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import scratch_dir  # noqa: E402  (a temporary directory removed at exit)

# ---- settings (each has a flag: RESAMPLES -> --resamples) ----
METHODS = "dpo,ipo,rloo,grpo,grpo-exact"  # which rows to run, a comma list of METHOD_ARGS' names
RESAMPLES = 1000  # bootstrap resamples of the intervals
SEED = 0  # seed of the bootstrap
WORKDIR = ""  # a directory where train.py --smoke has run (reward.py --smoke too, or it runs); empty = a new one

SFT = os.path.join("smoke-run", "arithmetic")  # the common SFT model (the smoke one, taught the arithmetic task)
# Each row's align.py flags beyond --smoke --model SFT --output-dir smoke-run/methods/NAME: the method's defaults.
METHOD_ARGS = {
    "dpo": ["--method", "dpo"],
    "ipo": ["--method", "dpo", "--loss-type", "ipo"],
    "rloo": ["--method", "rloo"],
    "grpo": ["--method", "grpo"],
    "grpo-exact": ["--method", "grpo", "--reward", "exact", "--dataset",
                   os.path.join("smoke-run", "arithmetic-prompts.json")],
}
# How the table names each row.
LABELS = {"dpo": "DPO", "ipo": "IPO (DPO --loss-type ipo)", "rloo": "RLOO, reward model", "grpo": "GRPO, reward model",
          "grpo-exact": "GRPO, --reward exact"}


def run(workdir: str, *command: str) -> float:
    """Runs a script of the project in `workdir`; its wall time in seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *command], cwd=workdir, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def prepare(workdir: str, say) -> None:
    """The smoke SFT model, the reward model and the arithmetic SFT model, unless `workdir` has them."""
    steps = ((os.path.join("smoke-run", "model"), ["train.py", "--smoke"]),
             (os.path.join("smoke-run", "reward"), ["reward.py", "--smoke"]),
             (SFT, ["train.py", "--smoke", "--dataset", os.path.join("smoke-run", "arithmetic.json"), "--output-dir",
                    SFT]))
    for path, command in steps:
        if not os.path.isfile(os.path.join(workdir, path, "metrics.json")):
            say(f"{' '.join(command)} ...")
            run(workdir, os.path.join(ROOT, command[0]), *command[1:])


def evaluation_records(workdir: str) -> tuple[list[dict], list[dict]]:
    """(the smoke SFT run's held-out records, the additions the GRPO --reward exact run held out)."""
    from tuning import rundir

    tasks = rundir.read_records(os.path.join(workdir, "smoke-run", "model", rundir.HELD_OUT_FILE))
    sums = rundir.read_records(os.path.join(workdir, "smoke-run", "methods", "grpo-exact", rundir.HELD_OUT_FILE))
    return tasks, [{"instruction": r["instruction"], "input": r["input"], "output": r["reference"]} for r in sums]


def answers_of(path: str, records: list[dict]) -> tuple[list[dict], object, object]:
    """(greedy answers as inference.py gives them, with their ids, the model, the tokenizer)."""
    import torch

    from tuning.data.templates import format_prompt, load_template
    from tuning.generation.generate import generate, load_for_generation

    lm, tokenizer = load_for_generation(path, torch.device("cpu"), "model")
    template = load_template(path)
    answers = generate(lm, tokenizer, [format_prompt(r, template) for r in records],
                       {"max_new_tokens": 32, "do_sample": False}, batch_size=100, raw=True)
    return answers, lm, tokenizer


def measure(workdir: str, path: str, sft: dict, tasks: list[dict], sums: list[dict], judge) -> dict:
    """One aligned model against the SFT model (`sft`: its answers and model)."""
    import evaluation
    from tuning import smoke
    from tuning.data.chat_template import prompt_ids
    from tuning.data.templates import format_prompt, load_template

    records = tasks + sums
    answers, lm, tokenizer = answers_of(path, records)
    task_answers, sum_answers = answers[:len(tasks)], answers[len(tasks):]
    rewards = evaluation.rewards(judge, tasks, {"sft": sft["answers"][:len(tasks)], "aligned": task_answers}, 100)
    first = {"reward": rewards["sft"], "characters": [len(a["text"]) for a in sft["answers"][:len(tasks)]]}
    second = {"reward": rewards["aligned"], "characters": [len(a["text"]) for a in task_answers]}
    win = evaluation.judged_win_rates(first, second, RESAMPLES, SEED)["raw"]
    template = load_template(path)
    sequences = [(prompt_ids(tokenizer, format_prompt(r, template)), a["token_ids"]) for r, a in zip(records, answers)]
    kl_sums, kl_tokens = evaluation.kl_per_prompt(sft["lm"], lm, sequences, tokenizer.pad_token_id, 50)
    lengths = {"length": [len(a["token_ids"]) for a in sft["answers"]]}, {"length": [len(a["token_ids"]) for a in answers]}
    drift = evaluation.drift(kl_sums, kl_tokens, *lengths, RESAMPLES, SEED)
    return {"win_rate": win, "kl": drift["kl"], **style_and_exact(tasks, task_answers, sums, sum_answers, smoke)}


def style_and_exact(tasks, task_answers, sums, sum_answers, smoke) -> dict:
    greetings = [a["text"] for r, a in zip(tasks, task_answers) if r["instruction"] == smoke.GREETING]
    others = [(r, a["text"]) for r, a in zip(tasks, task_answers) if r["instruction"] != smoke.GREETING]
    return {"preferred_style": sum(smoke.style(a) == "polite" for a in greetings) / len(greetings),
            "other_exact": sum(a == r["output"] for r, a in others) / len(others),
            "arithmetic_exact": sum(a["text"] == r["output"] for r, a in zip(sums, sum_answers)) / len(sums)}


def compare(workdir: str, methods: list[str], say=print) -> dict:
    """{"sft": its figures, method: its figures, wall time and peak memory} in `workdir`."""
    import torch

    from tuning import smoke
    from tuning.models.scoring import load_reward_model

    here = os.getcwd()
    os.chdir(workdir)  # (the smoke preset's paths are relative to it)
    try:
        prepare(workdir, say)
        runs = {}
        for name in ["grpo-exact"] + [m for m in methods if m != "grpo-exact"]:  # (its held-out sums are needed)
            out = os.path.join("smoke-run", "methods", name)
            if name not in methods and os.path.isfile(os.path.join(out, "metrics.json")):
                continue
            say(f"{LABELS[name]}: align.py ...")
            seconds = run(workdir, os.path.join(ROOT, "align.py"), "--smoke", "--model", SFT, *METHOD_ARGS[name],
                          "--output-dir", out, "--no-resume")
            with open(os.path.join(out, "metrics.json")) as handle:
                runs[name] = {"wall_seconds": seconds, "peak_memory_mb": json.load(handle)["peak_memory_mb"]}
        tasks, sums = evaluation_records(workdir)
        judge = load_reward_model(os.path.join("smoke-run", "reward"), torch.device("cpu"))
        sft_answers, sft_lm, _ = answers_of(SFT, tasks + sums)
        sft = {"answers": sft_answers, "lm": sft_lm}
        results = {"sft": style_and_exact(tasks, sft_answers[:len(tasks)], sums, sft_answers[len(tasks):], smoke)}
        for name in methods:
            say(f"{LABELS[name]}: measuring ...")
            results[name] = {**measure(workdir, os.path.join("smoke-run", "methods", name), sft, tasks, sums, judge),
                             **runs[name]}
        return results
    finally:
        os.chdir(here)


def interval(found: dict, form: str) -> str:
    low, high = found["interval"]
    return f"{format(found['value'], form)} [{format(low, form)}, {format(high, form)}]"


def table(results: dict, methods: list[str]) -> str:
    sft = results["sft"]
    lines = ["| method | win rate over SFT [95% CI] | polite greetings | other tasks exact | additions exact | "
             "KL from SFT per token [95% CI] | wall time | peak memory |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| SFT model (the start) | 50% | {sft['preferred_style']:.0%} | {sft['other_exact']:.1%} | "
             f"{sft['arithmetic_exact']:.1%} | 0 | - | - |"]
    for name in methods:
        r = results[name]
        lines.append(f"| {LABELS[name]} | {interval(r['win_rate'], '.1%')} | {r['preferred_style']:.0%} | "
                     f"{r['other_exact']:.1%} | {r['arithmetic_exact']:.1%} | {interval(r['kl'], '.3f')} | "
                     f"{r['wall_seconds']:.0f} s | {r['peak_memory_mb']:.0f} MB |")
    return "\n".join(lines)


def main(args) -> None:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_ARGS]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHOD_ARGS)})")
    workdir = args.workdir or scratch_dir("methods-")
    results = compare(workdir, methods, lambda text: print(text, flush=True))
    text = table(results, methods)
    print("\n" + text)
    base = os.path.join(ROOT, "benchmarks", "results", "methods")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".json", "w") as handle:
        json.dump(results, handle, indent=2)
    with open(base + ".md", "w") as handle:
        handle.write("Smoke preset: each method at align.py's smoke defaults from one SFT model (the smoke model "
                     "taught the arithmetic task), measured on the SFT run's 200 held-out prompts and 200 held-out "
                     "additions; greedy answers. On 2 CPU cores.\n\n" + text + "\n")
    print(f"\nwritten: {base}.json and .md")


if __name__ == "__main__":
    from tuning import cli

    main(cli.parse_or_exit(cli.build_parser(sys.modules[__name__]), lambda a: None))
