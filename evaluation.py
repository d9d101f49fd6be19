"""Evaluation report: what fine-tuning changed, measured on the validation split train.py held out.

    python evaluation.py                 # distilgpt2 vs distilgpt2-alpaca/ -> distilgpt2-alpaca/eval/
    python evaluation.py --smoke         # the tiny model from `python train.py --smoke`
    python evaluation.py --limit 200 --num-generations 100 --max-new-tokens 96

Writes report.json (every figure), report.md (a table and samples) and report.png (a bar chart).
(Named evaluation.py, not evaluate.py, so it doesn't shadow the `evaluate` package.)
"""

from __future__ import annotations

import math
import os
import sys

# ---- settings (each has a flag: NUM_GENERATIONS -> --num-generations) ----
BASE = "distilgpt2"  # the model before fine-tuning, Hub id or dir; for an align.py output, the SFT model it started from
FINETUNED = "distilgpt2-alpaca"  # directory written by train.py (its run_config.json names the split)
DATASET = ""  # records to split; empty = the dataset recorded in the fine-tuned model's run_config.json
OUTPUT_DIR = ""  # where the report goes; empty = FINETUNED/eval
ONLY = "both"  # both|finetuned: compare with the base model, or report the fine-tuned one alone (--init scratch runs)
LIMIT = 0  # validation examples for perplexity; 0 = the whole split
NUM_GENERATIONS = 100  # held-out prompts to generate answers for; >= 1
NUM_SAMPLES = 5  # prompts shown with both answers and the reference in report.md; >= 0
MAX_NEW_TOKENS = 128  # most tokens generated per answer; >= 1
BATCH_SIZE = 16  # prompts (or perplexity examples) per batch; >= 1
REWARD_MODEL = ""  # a reward.py output dir: adds each model's mean reward and the win rate, with the RM as judge
DEVICE = "auto"  # auto|cuda|mps|cpu
SMOKE = False  # evaluate smoke-run/ from `python train.py --smoke`

# metric: (label, which way is better). "length gap" is |mean answer length - mean reference length|.
METRICS = {
    "response_loss": ("response loss", "lower"), "response_perplexity": ("response perplexity", "lower"),
    "eos_rate": ("stops at EOS", "higher"), "length_gap": ("length gap to reference (tokens)", "lower"),
    "repeated_4gram_share": ("repeated 4-grams", "lower"), "distinct_2": ("distinct-2", "higher"),
    "rouge_l_f1": ("ROUGE-L F1", "higher"),
}


REWARD = {"mean_reward": ("mean reward (reward model)", "higher")}  # with --reward-model

LABELS = {"base": "base", "finetuned": "fine-tuned"}
STAGE_LABELS = {"base": "SFT", "finetuned": "aligned"}  # when the fine-tuned model is an align.py output
COLORS = {"base": "tab:gray", "finetuned": "tab:green"}  # the fine-tuned bar where it is better
WORSE = "tab:red"  # the fine-tuned bar where it is not better


# ---------------------------------------------------------------- metric functions (pure)
def repeated_ngram_share(tokens: list, n: int = 4) -> float:
    """Share of an answer's n-grams that repeat an earlier n-gram of the same answer (0 = none)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(tokens: list, n: int = 2) -> float:
    """Unique n-grams / n-grams within an answer (1 = no repetition; answers too short count as 1)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def lcs_length(a: list, b: list) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace words."""
    cand, ref = candidate.lower().split(), reference.lower().split()
    if not cand or not ref:
        return 0.0
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(answers: list[dict], token_ids: list[list[int]], references: list[str],
                       reference_lengths: list[int]) -> dict:
    n = len(answers)
    mean_length = sum(a["new_tokens"] for a in answers) / n
    return {"reference_mean_length": sum(reference_lengths) / n,
        "eos_rate": sum(a["stopped_at_eos"] for a in answers) / n,
        "mean_length": mean_length,
        "length_gap": abs(mean_length - sum(reference_lengths) / n),
        "repeated_4gram_share": sum(repeated_ngram_share(t) for t in token_ids) / n,
        "distinct_2": sum(distinct_n(t) for t in token_ids) / n,
        "rouge_l_f1": sum(rouge_l_f1(a["text"], r) for a, r in zip(answers, references)) / n,
    }


def win_rate(finetuned: list[float], base: list[float]) -> float:
    """Share of prompts whose fine-tuned answer scores higher than the base answer; ties count half."""
    return sum(1.0 if f > b else 0.5 if f == b else 0.0 for f, b in zip(finetuned, base)) / len(finetuned)


def metrics_of(report: dict) -> dict:
    """The metrics this report has: METRICS, and the mean reward when a reward model judged it."""
    return {**METRICS, **(REWARD if "mean_reward" in report["finetuned"] else {})}


# ---------------------------------------------------------------- model-side measurements
def rewards(judge, records: list[dict], answers: dict, batch_size: int) -> dict:
    """Each role's scores by the reward model `judge` = (model, tokenizer, template) of its answers (as decoded,
    unstripped: as align.py scores them), each prompt in the RM's own format (an instruction in its template, a
    conversation in its chat template), and cut to its context as align.py cuts them (scoring.within_context).
    Each distinct (prompt, answer) is scored once, so two roles' identical answers get the very same score, a tie,
    whatever batch shapes they would have been scored in."""
    import json

    from tuning.data.chat_template import prompt_of, saved_or_ours
    from tuning.data.conversations import is_conversation
    from tuning.models import scoring

    rm, tokenizer, template = judge
    chat_template = saved_or_ours(tokenizer, template)
    prompts = [r["messages"][:-1] if is_conversation(r) else prompt_of(r, template, chat_template, tokenizer)
               for r in records]
    keys = [json.dumps(prompt) for prompt in prompts]  # (a conversation, a list, can't be a set's member)
    distinct = sorted({(key, answer["raw_text"]) for texts in answers.values() for key, answer in zip(keys, texts)})
    asked = dict(zip(keys, prompts))
    values = scoring.score_texts(rm, tokenizer, [asked[key] for key, _ in distinct], [a for _, a in distinct],
                                 batch_size, cut=True, chat_template=chat_template)
    score = dict(zip(distinct, values))
    return {role: [score[key, answer["raw_text"]] for key, answer in zip(keys, texts)]
            for role, texts in answers.items()}


def judged_conversations(reward_model: str) -> bool:
    """Whether a reward model learnt from pairs in a conversation (its run_config.json's data report), or can't be
    told (an older run, a model from elsewhere)."""
    from tuning.rundir import read_run_config

    formats = ((read_run_config(reward_model) or {}).get("data_report") or {}).get("formats")
    return formats is None or formats.get("conversation", 0) + formats.get("dialogue", 0) > 0


def held_out_examples(tokenizer, records: list[dict], template, chat_template: str, config: dict) -> list[dict]:
    """The records as training tokenized them, labels and all: Alpaca records with the prompt template,
    conversations with the chat template (their assistant turns, as the run's --train-on chose)."""
    from tuning.data.chat_template import TRAIN_ON, tokenize_conversations
    from tuning.data.conversations import is_conversation
    from tuning.data.sft import tokenize_example

    max_length = config["max_length"]
    if records and is_conversation(records[0]):
        examples = tokenize_conversations([r["messages"] for r in records], tokenizer, chat_template, max_length,
                                          config.get("train_on", TRAIN_ON))
        return [example for example in examples if example["length"]]
    return [ex for ex in (tokenize_example(r, tokenizer, template, max_length) for r in records) if ex]


def prompt_and_reference(record: dict, template) -> tuple[str | list, str]:
    """What a model answers and the answer it is compared with: an Alpaca record's formatted prompt and output,
    or a conversation up to its last assistant turn (a list of turns, generate renders it) and that turn."""
    from tuning.data.conversations import is_conversation
    from tuning.data.templates import format_prompt

    if is_conversation(record):
        return record["messages"][:-1], record["messages"][-1]["content"]
    return format_prompt(record, template), record["output"]  # (a run on Alpaca records: trained in this format)


def sample_of(record: dict) -> dict:
    """How report.md shows a held-out record: its instruction and input; a conversation's last user turn, with
    the turns before it as its input."""
    from tuning.data.conversations import is_conversation

    if not is_conversation(record):
        return {"instruction": record["instruction"], "input": record["input"]}
    *history, asked, _ = record["messages"]
    return {"instruction": asked["content"], "input": "\n".join(f"{t['role']}: {t['content']}" for t in history)}


def response_loss(lm, tokenizer, examples: list[dict], batch_size: int) -> float:
    """Mean cross-entropy per response token (the labelled ones), over all the examples."""
    import torch
    import torch.nn.functional as F

    from tuning.data.collate import SFTCollator

    collate = SFTCollator(tokenizer.pad_token_id, "none")
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size])
        with torch.no_grad():
            logits = lm(input_ids=batch["input_ids"].to(lm.device),
                        attention_mask=batch["attention_mask"].to(lm.device)).logits[:, :-1]
        targets = batch["labels"][:, 1:].to(lm.device)
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    return total / max(1, count)


def evaluate_model(role, path, device, records, config, args, template, chat_template) -> tuple[dict, list[dict]]:
    from tuning.generation.generate import generate, load_for_generation

    lm, tokenizer = load_for_generation(path, device, role)
    ppl_records = records[: args.limit] if args.limit else records
    examples = held_out_examples(tokenizer, ppl_records, template, chat_template, config)
    loss = response_loss(lm, tokenizer, examples, args.batch_size)
    gen_records = records[: args.num_generations]
    prompts, references = zip(*(prompt_and_reference(r, template) for r in gen_records))
    answers = generate(lm, tokenizer, list(prompts), {"max_new_tokens": args.max_new_tokens, "do_sample": False},
                       batch_size=args.batch_size, progress=True, desc=f"Generating ({role})", raw=True,
                       chat_template=chat_template)
    token_ids = [tokenizer(a["text"], add_special_tokens=False, verbose=False)["input_ids"] for a in answers]
    ref_lengths = [len(tokenizer(r, add_special_tokens=False, verbose=False)["input_ids"])
                   for r in references]  # (lengths only: a text past the context is counted, never run)
    metrics = {"response_loss": loss, "response_perplexity": math.exp(min(loss, 50)),
               "perplexity_examples": len(examples), "generations": len(gen_records),
               **generation_metrics(answers, token_ids, list(references), ref_lengths)}
    return metrics, answers


# ---------------------------------------------------------------- report
def compare(base: dict, finetuned: dict) -> dict:
    """For each metric: did fine-tuning make it better?"""
    metrics = {**METRICS, **(REWARD if "mean_reward" in finetuned else {})}
    return {key: (finetuned[key] < base[key]) if way == "lower" else (finetuned[key] > base[key])
            for key, (_, way) in metrics.items()}


def write_markdown(path: str, report: dict, samples: list[dict]) -> None:
    roles = [role for role in ("base", "finetuned") if role in report]
    fine, better, labels = report["finetuned"], report.get("finetuned_better"), report.get("labels", LABELS)
    title = " vs ".join(report[f"{role}_model"] for role in roles)
    lines = [f"# Evaluation: {title}", "",
             f"Held-out validation split of `{report['dataset']}` (seed {report['seed']}, size "
             f"{report['val_size']}): perplexity on {fine['perplexity_examples']} examples, greedy generations "
             f"for {fine['generations']} prompts, at most {report['max_new_tokens']} new tokens.", "",
             "| metric | better | " + " | ".join(labels[r] for r in roles) + (f" | {labels['finetuned']} better? |"
                                                                               if better else " |"),
             "| --- | --- |" + " ---: |" * len(roles) + (" --- |" if better else "")]
    for key, (label, way) in metrics_of(report).items():
        verdict = f" {'yes' if better[key] else 'no'} |" if better else ""
        lines.append(f"| {label} | {way} | " + " | ".join(f"{report[r][key]:.4g}" for r in roles) + f" |{verdict}")
    lines.append("| mean answer length (tokens) | - | " + " | ".join(f"{report[r]['mean_length']:.1f}" for r in roles)
                 + f" | reference: {report['reference_mean_length']:.1f} |")
    if "win_rate" in report:
        lines += ["", f"**Win rate of the {labels['finetuned']} model over the {labels['base']}: "
                  f"{report['win_rate']:.1%}** of "
                  f"{fine['generations']} prompts (ties count half), judged by the reward model "
                  f"`{report['reward_model']}`. This is AlpacaFarm's simulated preference with our reward model "
                  "as the judge: it is only as good as that reward model, not a human verdict."]
    lines += ["", "![report](report.png)", "", "## Samples", ""]
    for i, s in enumerate(samples, 1):
        lines += [f"### {i}. {s['instruction']}", ""]
        if s["input"]:
            lines += [f"**Input:** {s['input']}", ""]
        for role in (*roles, "reference"):
            lines += [f"**{role}:**", "", "```text", s[role] or "(empty)", "```", ""]
    with open(path, "w") as handle:
        handle.write("\n".join(lines))


def bar_colors(report: dict, key: str) -> list[str]:
    """The bars of one metric in report.png: the first model grey, the second green where it is better and red
    where it is not (green when it is reported alone)."""
    better = (report.get("finetuned_better") or {}).get(key, True)
    return [COLORS[role] if role == "base" or better else WORSE for role in ("base", "finetuned") if role in report]


def plot_report(path: str, report: dict) -> None:
    """One small bar chart per metric (they have different scales), base vs fine-tuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = [role for role in ("base", "finetuned") if role in report]
    metrics = metrics_of(report)
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.1 * len(metrics), 3.4))
    for ax, (key, (label, way)) in zip(axes, metrics.items()):
        values = [report[role][key] for role in roles]
        bars = ax.bar([report.get("labels", LABELS)[role] for role in roles], values, color=bar_colors(report, key))
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_title(f"{label}\n({way} is better)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.margins(y=0.2)
    fig.suptitle(" vs ".join(report[f"{role}_model"] for role in roles) + " on held-out prompts", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def saved_chat_template(model_dir: str, template) -> str:
    """The chat template saved with the fine-tuned model (both models' conversations are rendered with it, as
    both models' prompts with its prompt template), else ours for its prompt template."""
    from tuning.data.chat_template import saved_or_ours
    from tuning.models.loading import load_tokenizer

    return saved_or_ours(load_tokenizer(model_dir), template)


def validate_args(args) -> None:
    from tuning.cli import check_all

    check_all([f"--{k.replace('_', '-')} must be >= {low} (got {getattr(args, k)})"
               for k, low in (("limit", 0), ("num_generations", 1), ("num_samples", 0), ("max_new_tokens", 1),
                              ("batch_size", 1)) if getattr(args, k) < low])


def check_base(args, config: dict, explicit: set) -> None:
    """A run trained from random weights (--init scratch) has no base model to compare with."""
    from tuning.cli import UserError

    if args.only == "both" and config.get("init") == "scratch" and "base" not in explicit:
        raise UserError(f"{args.finetuned} was trained from random weights (--init scratch), so there is no base "
                        "model to compare with: pass --only finetuned (or --base DIR to compare with another model)")


def main(args, explicit: set) -> dict:
    from tuning import smoke
    from tuning.data.conversations import is_conversation, load_training_records
    from tuning.data.records import held_out_records
    from tuning.data.templates import load_template
    from tuning.generation.generate import require_finetuned
    from tuning.models import scoring
    from tuning.models.devices import get_device
    from tuning.models.loading import offline_unless_hub_reachable
    from tuning.rundir import read_run_config, starting_model, write_json

    if args.smoke:
        smoke.use_smoke_models(args, explicit)
    else:
        offline_unless_hub_reachable([args.base if args.only == "both" else "", args.finetuned, args.dataset])
    require_finetuned(args.finetuned)
    output_dir = args.output_dir or os.path.join(args.finetuned, "eval")
    records, config = held_out_records(args.finetuned, args.dataset, load_training_records)
    sft_model = (read_run_config(args.finetuned) or {}).get("sft_model")  # set when align.py made it
    if "base" not in explicit and (sft_model or not args.smoke) and starting_model(args.finetuned):
        args.base = starting_model(args.finetuned)  # the model the run started from: for an aligned one, its SFT model
    if not sft_model:
        check_base(args, config, explicit)
    device = get_device(args.device)
    template = load_template(args.finetuned)
    chat_template = saved_chat_template(args.finetuned, template)
    # The judge loads first: a --reward-model that is no reward model is said before minutes of generating.
    judge = scoring.load_reward_model(args.reward_model, device) if args.reward_model else None
    if judge and records and is_conversation(records[0]) and not judged_conversations(args.reward_model):
        print(f"note: --reward-model {args.reward_model} was trained on no conversation pairs (its run_config.json), "
              "so its scores of answers in a dialogue may mean little", file=sys.stderr)
    roles = {"base": args.base, "finetuned": args.finetuned} if args.only == "both" else {"finetuned": args.finetuned}
    results, answers = {}, {}
    for role, path in roles.items():
        results[role], answers[role] = evaluate_model(role, path, device, records, config, args, template,
                                                      chat_template)
    gen_records = records[: args.num_generations]
    if args.reward_model:
        scores = rewards(judge, gen_records, answers, args.batch_size)
        for role, values in scores.items():
            results[role]["mean_reward"] = sum(values) / len(values)
    report = {**{f"{role}_model": path for role, path in roles.items()},
              "dataset": args.dataset or config["dataset"], "seed": config["seed"], "val_size": config["val_size"],
              "max_new_tokens": args.max_new_tokens,
              "reference_mean_length": results["finetuned"]["reference_mean_length"], **results}
    if "base" in results:
        report["finetuned_better"] = compare(results["base"], results["finetuned"])
    if sft_model and "base" in results and os.path.realpath(args.base) == os.path.realpath(sft_model):
        report["labels"] = STAGE_LABELS  # SFT vs aligned: the two stages of one pipeline
    if args.reward_model and "base" in results:
        report.update(reward_model=args.reward_model, win_rate=win_rate(scores["finetuned"], scores["base"]))
    samples = [{**sample_of(r), "reference": prompt_and_reference(r, template)[1],
                **{role: answers[role][i]["text"] for role in roles}}
               for i, r in enumerate(gen_records[: args.num_samples])]
    report["samples"] = samples
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "report.json"), report)
    write_markdown(os.path.join(output_dir, "report.md"), report, samples)
    plot_report(os.path.join(output_dir, "report.png"), report)
    print(open(os.path.join(output_dir, "report.md")).read().split("![report]")[0])
    print(f"Wrote report.json, report.md and report.png to {output_dir}/")
    return report


if __name__ == "__main__":
    from tuning import cli

    cli.run(sys.modules[__name__], main, validate_args)
