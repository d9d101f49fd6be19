"""Does faster batching learn as much from the same examples? Held-out exact match after the same steps.

    python benchmarks/learning_order.py           # 3 smoke trainings of ~2.5 min each on 2 CPU cores

Trains the `--smoke` model three times with identical settings, data and steps, changing only how
batches are formed: the project default (random order, packed), dynamic padding in random order, and
length-grouped order. Then it scores greedy answers on the 200 held-out prompts. Length grouping saves
padding, but batches of similar length are batches of similar tasks, and the model learns less.
Results go to benchmarks/results/learning-order.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import scratch_dir  # noqa: E402  (a temporary directory removed at exit)

# ---- settings (each has a flag: SEEDS -> --seeds) ----
SEEDS = "42"  # comma-separated training seeds; each variant is trained once per seed
MAX_STEPS = -1  # optimizer steps per training; -1 = the smoke preset's epochs

VARIANTS = {"default (random order, packed)": [], "dynamic padding, random order": ["--packing", "none"],
            "length-grouped order": ["--order", "length", "--packing", "none"]}


def score(workdir: str, run: str) -> dict:
    import torch

    from tuning.data import records, templates
    from tuning.generation import generate
    from tuning import smoke

    model_dir = os.path.join(workdir, run)
    held_out, _ = records.held_out_records(model_dir)
    lm, tok = generate.load_for_generation(model_dir, torch.device("cpu"), "finetuned")
    prompts = [templates.format_prompt(r, templates.load_template(model_dir)) for r in held_out]
    answers = generate.generate(lm, tok, prompts, {"max_new_tokens": 32, "do_sample": False}, batch_size=50)
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    return {"exact_match": sum(smoke.is_right(r, a["text"]) for a, r in zip(answers, held_out)) / len(held_out),
            "eval_loss": metrics["eval_loss_after"], "tokens_per_s": metrics["train_tokens_per_second"],
            "steps": metrics["global_step"]}


def main(args) -> None:
    workdir = scratch_dir("learning-order-")
    results = []
    for seed in args.seeds.split(","):
        for name, flags in VARIANTS.items():
            run = f"run-{len(results)}"
            print(f"training: {name}, seed {seed} ...", flush=True)
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--smoke", "--seed", seed, "--output-dir", run,
                   "--max-steps", str(args.max_steps), *flags]
            out = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            results.append({"variant": name, "seed": int(seed), **score(workdir, run)})
            print(f"  exact match {results[-1]['exact_match']:.1%}, eval loss {results[-1]['eval_loss']:.4f}")
    lines = ["| batching | seed | optimizer steps | held-out exact match | held-out loss | real tokens/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['variant']} | {r['seed']} | {r['steps']} | {r['exact_match']:.1%} | {r['eval_loss']:.4f} "
              f"| {r['tokens_per_s']:.0f} |" for r in results]
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    base = os.path.join(ROOT, "benchmarks", "results", "learning-order")
    with open(base + ".json", "w") as handle:
        json.dump(results, handle, indent=2)
    with open(base + ".md", "w") as handle:
        handle.write("Smoke preset (tiny GPT-2, generated tasks), same data, settings and steps; 200 held-out "
                     "prompts, greedy decoding.\n\n" + table + "\n")
    print(f"\nwritten: {base}.json and .md")


if __name__ == "__main__":
    from tuning import cli

    main(cli.parse_or_exit(cli.build_parser(sys.modules[__name__]), lambda a: None))
