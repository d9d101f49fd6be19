"""Evaluation report: what fine-tuning changed, measured on the validation split train.py held out.

    python evaluation.py                 # distilgpt2 vs distilgpt2-alpaca/ -> distilgpt2-alpaca/eval/
    python evaluation.py --smoke         # the tiny model from `python train.py --smoke`
    python evaluation.py --limit 200 --num-generations 100 --max-new-tokens 96

Writes report.json (every figure, and each prompt's), report.md (a table with 95% intervals, and samples) and
report.png (a bar chart). Two models are compared on the same prompts, so each difference comes with a paired
bootstrap interval, and is called better (or worse) only when that interval excludes zero.
(Named evaluation.py, not evaluate.py, so it doesn't shadow the `evaluate` package.)
"""

from __future__ import annotations

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
REWARD_MODEL = ""  # a reward.py output dir: each model's mean reward, and the raw and length-controlled win rates
BOOTSTRAP = 1000  # resamples of the prompts behind each 95% interval (both models' answers drawn together); >= 100
BOOTSTRAP_SEED = 0  # seed of those resamples: the same seed, the same intervals; >= 0
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
# report.png: the first model's bars (and a model reported alone), then the second's by its verdict
COLORS = {"first": "tab:blue", "better": "tab:green", "worse": "tab:red", "no clear difference": "tab:gray"}


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


def answer_values(answers: list[dict], token_ids: list[list[int]], references: list[str],
                  reference_lengths: list[int]) -> dict[str, list]:
    """Each prompt's figures of one model's answers, kept (in report.json too) so that any set of prompts, such
    as a bootstrap resample, gets its metrics from them (answer_metrics)."""
    return {"stopped_at_eos": [float(a["stopped_at_eos"]) for a in answers],
            "length": [a["new_tokens"] for a in answers],
            "characters": [len(a["text"]) for a in answers],  # (the length control's: tokenizer-free)
            "reference_length": list(reference_lengths),
            "repeated_4gram_share": [repeated_ngram_share(t) for t in token_ids],
            "distinct_2": [distinct_n(t) for t in token_ids],
            "rouge_l_f1": [rouge_l_f1(a["text"], r) for a, r in zip(answers, references)]}


def answer_metrics(values: dict, rows) -> dict:
    """The generation metrics (and the mean reward, when judged) over each row of `rows` (k, n), indices into the
    prompts: means, but the length gap, |mean answer length - mean reference length| (a gap of the means, so
    answers too long and too short don't cancel within a prompt but do across prompts, as in the mean length)."""
    import numpy as np

    def mean(key):
        return np.asarray(values[key], float)[rows].mean(-1)

    return {"reference_mean_length": mean("reference_length"), "eos_rate": mean("stopped_at_eos"),
            "mean_length": mean("length"), "length_gap": np.abs(mean("length") - mean("reference_length")),
            **{key: mean(key) for key in ("repeated_4gram_share", "distinct_2", "rouge_l_f1")},
            **({"mean_reward": mean("reward")} if "reward" in values else {})}


def loss_metrics(values: dict, rows) -> dict:
    """Response loss and perplexity over each row of `rows` (k, n), indices into the perplexity examples: the
    token-weighted mean, the summed losses over the summed response tokens, as over the whole split."""
    import numpy as np

    from tuning.generation.confidence import per_token

    loss = per_token(values["loss_sum"], values["loss_tokens"], rows)
    return {"response_loss": loss, "response_perplexity": np.exp(np.minimum(loss, 50))}


def whole(metrics, values: dict, n: int) -> dict:
    """`metrics` (answer_metrics or loss_metrics) over all n prompts or examples, as plain numbers."""
    import numpy as np

    return {key: float(value[0]) for key, value in metrics(values, np.arange(n)[None]).items()}


def win_rate(finetuned: list[float], base: list[float]) -> float:
    """Share of prompts whose fine-tuned answer scores higher than the base answer; ties count half."""
    from tuning.generation.confidence import outcomes

    return float(outcomes(finetuned, base).mean())


def metrics_of(report: dict) -> dict:
    """The metrics this report has: METRICS, and the mean reward when a reward model judged it."""
    return {**METRICS, **(REWARD if "mean_reward" in report["finetuned"] else {})}


# ---------------------------------------------------------------- how sure the comparison is
def compare(first: dict, second: dict, resamples: int, seed: int) -> dict:
    """For each metric (METRICS, and the mean reward when both were judged): the second model's figure minus the
    first's, with its interval and verdict (better, worse or no clear difference: confidence.verdict), from each
    model's per-prompt values. A paired bootstrap: the perplexity examples and the generation prompts are each
    resampled, the same draws for both models, so the two answers to one prompt stay together."""
    from tuning.generation import confidence

    ways = {key: way for key, (_, way) in {**METRICS, **(REWARD if "reward" in second else {})}.items()}
    found = {}
    for metrics, n in ((loss_metrics, len(first["loss_sum"])), (answer_metrics, len(first["length"]))):
        found.update(confidence.bootstrap(lambda rows: difference(metrics(second, rows), metrics(first, rows)), n,
                                          resamples, seed))
    return {key: {**found[key], "verdict": confidence.verdict(found[key]["interval"], way)}
            for key, way in ways.items()}


def difference(second: dict, first: dict) -> dict:
    return {key: second[key] - first[key] for key in second}


def judged_win_rates(first: dict, second: dict, resamples: int, seed: int) -> dict:
    """The reward model's win rate of the second model over the first (ties half) and the length-controlled one
    (confidence.length_controlled_win_rates, on the answers' lengths in characters), each with its interval and
    verdict against 50%, over the same resampled prompts; the method named, and why it fell back to the raw rate
    where it did."""
    import numpy as np

    from tuning.generation import confidence

    wins = confidence.outcomes(second["reward"], first["reward"])
    longer = np.subtract(second["characters"], first["characters"])
    found = confidence.bootstrap(lambda rows: confidence.win_rates(wins, longer, rows), len(wins), resamples, seed)
    rates = {key: {**value, "verdict": confidence.verdict(value["interval"], "higher", 0.5)}
             for key, value in found.items()}
    rates["length_controlled"]["method"] = confidence.LENGTH_CONTROL
    degenerate = confidence.length_control_degenerate(wins, longer)
    if degenerate:
        rates["length_controlled"]["note"] = degenerate
    return rates


def drift(kl_sums: list[float], kl_tokens: list[int], first: dict, second: dict, resamples: int, seed: int) -> dict:
    """How far the second model moved from the first where it answers: the mean KL per token of its answers
    (kl_per_prompt's sums over their token counts), and the change in mean answer length (tokens), each with its
    interval over the same resampled prompts."""
    import numpy as np

    from tuning.generation import confidence

    first_length, second_length = np.asarray(first["length"], float), np.asarray(second["length"], float)
    found = confidence.bootstrap(lambda rows: {
        "kl": confidence.per_token(kl_sums, kl_tokens, rows),
        "length_change": second_length[rows].mean(-1) - first_length[rows].mean(-1)}, len(kl_sums), resamples, seed)
    return {"kl": {**found["kl"], "tokens": int(sum(kl_tokens))}, "length_change": found["length_change"]}


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


def held_out_examples(tokenizer, records: list[dict], template, chat_template: str, config: dict) -> list:
    """The records as training tokenized them, labels and all: Alpaca records with the prompt template,
    conversations with the chat template (their assistant turns, as the run's --train-on chose); None for a
    record training would drop, so that the i-th example is the i-th record's for both models alike."""
    from tuning.data.chat_template import TRAIN_ON, tokenize_conversations
    from tuning.data.conversations import is_conversation
    from tuning.data.sft import tokenize_example

    max_length = config["max_length"]
    if records and is_conversation(records[0]):
        examples = tokenize_conversations([r["messages"] for r in records], tokenizer, chat_template, max_length,
                                          config.get("train_on", TRAIN_ON))
        return [example if example["length"] else None for example in examples]
    return [tokenize_example(r, tokenizer, template, max_length) or None for r in records]


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


def response_losses(lm, tokenizer, examples: list, batch_size: int) -> dict[str, list]:
    """Each example's summed cross-entropy over its response tokens (the labelled ones) and their count, (0, 0)
    for a record training drops: the loss over any set of examples is then the sum over the count, the mean per
    response token, for the whole split as for each bootstrap resample (loss_metrics)."""
    import torch
    import torch.nn.functional as F

    from tuning.data.collate import SFTCollator

    collate = SFTCollator(tokenizer.pad_token_id, "none")
    kept = [i for i, example in enumerate(examples) if example]
    sums, counts = [0.0] * len(examples), [0] * len(examples)
    for start in range(0, len(kept), batch_size):
        rows = kept[start:start + batch_size]
        batch = collate([examples[i] for i in rows])
        with torch.no_grad():
            logits = lm(input_ids=batch["input_ids"].to(lm.device),
                        attention_mask=batch["attention_mask"].to(lm.device)).logits[:, :-1]
        targets = batch["labels"][:, 1:].to(lm.device)
        losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=-100, reduction="none").view(targets.shape)
        for i, loss, count in zip(rows, losses.sum(-1).tolist(), (targets != -100).sum(-1).tolist()):
            sums[i], counts[i] = loss, count
    return {"loss_sum": sums, "loss_tokens": counts}


def vocabulary_mismatch(first, second) -> str:
    """Why two (model, tokenizer) pairs' next-token distributions can't be compared token by token ("" when they
    can): tokenizers that map tokens to other ids, or output layers of other widths."""
    (first_lm, first_tokenizer), (second_lm, second_tokenizer) = first, second
    if first_tokenizer.get_vocab() != second_tokenizer.get_vocab():
        return (f"the two models' tokenizers have different vocabularies ({len(first_tokenizer)} and "
                f"{len(second_tokenizer)} tokens), so their next-token distributions are over different tokens")
    widths = [lm.get_output_embeddings().weight.shape[0] for lm in (first_lm, second_lm)]
    if widths[0] != widths[1]:
        return f"the two models' output layers differ in width ({widths[0]} and {widths[1]} logits)"
    return ""


def kl_per_prompt(first_lm, second_lm, sequences: list[tuple[list[int], list[int]]], pad_id: int,
                  batch_size: int) -> tuple[list[float], list[int]]:
    """For each (prompt ids, answer ids) the second model generated: the sum over the answer's tokens (its stop
    token included) of the exact KL(second || first) = sum over the vocabulary of p2 (log p2 - log p1), the two
    models' next-token distributions where that token was chosen; and the number of tokens. Both models read the
    same ids (teacher forcing), laid out as generate() laid them out: prompts left-padded to end at one column,
    positions counted from each row's first token (from the mask), the answer after it. The output layer runs at
    the answer's columns only (logits_to_keep), so a batch holds batch x longest answer x vocabulary logits per
    model, never the prompts' (--batch-size sets how many rows)."""
    import torch

    sums, counts = [], []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width, longest = max(len(p) for p, _ in chunk), max(len(a) for _, a in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p + a + [pad_id] * (longest - len(a)) for p, a in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * (len(p) + len(a)) + [0] * (longest - len(a))
                             for p, a in chunk])
        answered = torch.tensor([[1.0] * len(a) + [0.0] * (longest - len(a)) for _, a in chunk])
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        with torch.no_grad():
            second, first = (answer_log_probs(lm, inputs, longest).to(second_lm.device) for lm in (second_lm, first_lm))
            kl = (second.exp() * (second - first)).sum(-1) * answered.to(second_lm.device)
        sums += kl.sum(-1).tolist()
        counts += [len(a) for _, a in chunk]
    return sums, counts


def answer_log_probs(lm, inputs: dict, longest: int):
    """log p(next token), over the vocabulary, at the columns that predict the answer tokens: column width - 1 + j
    predicts answer token j, so the last longest + 1 columns but the very last (what would follow the answer)."""
    import torch.nn.functional as F

    logits = lm(**{k: v.to(lm.device) for k, v in inputs.items()}, use_cache=False,
                logits_to_keep=longest + 1).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1)


def answers_kl(models: dict, prompts: list, answers: list[dict], chat_template: str,
               batch_size: int) -> tuple[tuple[list, list] | None, str]:
    """(kl_per_prompt at the fine-tuned model's greedy answers, each prompt encoded as generate() encoded it, "")
    from models = {role: (model, tokenizer)}; or (None, why not) when the two models' vocabularies differ."""
    from tuning.data.chat_template import prompt_ids

    problem = vocabulary_mismatch(models["base"], models["finetuned"])
    if problem:
        return None, problem
    (first_lm, _), (second_lm, tokenizer) = models["base"], models["finetuned"]
    sequences = [(prompt_ids(tokenizer, prompt, chat_template), answer["token_ids"])
                 for prompt, answer in zip(prompts, answers)]
    return kl_per_prompt(first_lm, second_lm, sequences, tokenizer.pad_token_id, batch_size), ""


def evaluate_model(role, lm, tokenizer, records, config, args, template, chat_template) -> tuple[dict, list[dict]]:
    """One model's figures and answers; its per-prompt values (and per-example losses) under "per_prompt"."""
    from tuning.generation.generate import generate

    ppl_records = records[: args.limit] if args.limit else records
    examples = held_out_examples(tokenizer, ppl_records, template, chat_template, config)
    losses = response_losses(lm, tokenizer, examples, args.batch_size)
    gen_records = records[: args.num_generations]
    prompts, references = zip(*(prompt_and_reference(r, template) for r in gen_records))
    answers = generate(lm, tokenizer, list(prompts), {"max_new_tokens": args.max_new_tokens, "do_sample": False},
                       batch_size=args.batch_size, progress=True, desc=f"Generating ({role})", raw=True,
                       chat_template=chat_template)
    token_ids = [tokenizer(a["text"], add_special_tokens=False, verbose=False)["input_ids"] for a in answers]
    ref_lengths = [len(tokenizer(r, add_special_tokens=False, verbose=False)["input_ids"])
                   for r in references]  # (lengths only: a text past the context is counted, never run)
    values = {**losses, **answer_values(answers, token_ids, list(references), ref_lengths)}
    metrics = {**whole(loss_metrics, values, len(examples)),
               "perplexity_examples": sum(1 for example in examples if example), "generations": len(gen_records),
               **whole(answer_metrics, values, len(answers)), "per_prompt": values}
    return metrics, answers


# ---------------------------------------------------------------- report
def comparison(first: dict, second: dict, kl: tuple[list, list] | None, kl_problem: str, resamples: int,
               seed: int) -> dict:
    """The report's keys that compare the second model with the first, from their per-prompt values: each
    metric's difference with its interval and verdict, finetuned_better (True where the verdict is better), the
    win rates when a reward model judged both, and the KL with the length change (None, with the reason, where
    `kl` could not be measured)."""
    from tuning.generation.confidence import INTERVAL

    differences = compare(first, second, resamples, seed)
    report = {"bootstrap": {"method": INTERVAL, "resamples": resamples, "seed": seed}, "differences": differences,
              "finetuned_better": {key: found["verdict"] == "better" for key, found in differences.items()}}
    if "reward" in second:
        report.update(win_rate=win_rate(second["reward"], first["reward"]),
                      win_rates=judged_win_rates(first, second, resamples, seed))
    report.update(drift(*kl, first, second, resamples, seed) if kl else
                  {"kl": None, "length_change": None, "kl_not_measured": kl_problem})
    return report


def interval_text(estimate: dict, form: str = "+.3g") -> str:
    """A value and its interval as report.md's table and report.png show them: +0.0123 [+0.004, +0.021]."""
    low, high = estimate["interval"]
    return f"{estimate['value']:{form}} [{low:{form}}, {high:{form}}]"


def span(estimate: dict, form: str) -> str:
    """An interval as report.md's prose gives it: 50.5% to 56.0%."""
    low, high = estimate["interval"]
    return f"{low:{form}} to {high:{form}}"


def confidence_prose(report: dict, first: str, second: str) -> list[str]:
    """report.md's paragraphs under the table, for a comparison: how the intervals were made, the win rates (with a
    reward model) and the KL, each with its method named."""
    if "differences" not in report:
        return []
    generations, method = report["finetuned"]["generations"], report["bootstrap"]
    lines = ["", f"Each difference is the {second} model's figure minus the {first}'s, with a {method['method']} "
             f"interval: the {generations} prompts (for the loss and perplexity, the examples) drawn again with "
             f"replacement {method['resamples']} times (seed {method['seed']}), the same draws for both models, so "
             "each prompt keeps its two answers together. A difference is called better or worse only when its "
             "interval excludes zero; otherwise there is no clear difference."]
    if "win_rate" in report:
        raw, controlled = report["win_rates"]["raw"], report["win_rates"]["length_controlled"]
        lines += ["", f"**Win rate of the {second} model over the {first}: {report['win_rate']:.1%}** of {generations} "
                  f"prompts (95% interval {span(raw, '.1%')}: {raw['verdict']}; ties count half), judged by the "
                  f"reward model `{report['reward_model']}`. This is AlpacaFarm's simulated preference with our "
                  "reward model as the judge: it is only as good as that reward model, not a human verdict. A win "
                  "rate is called better only when its interval is above 50% (worse when below).", "",
                  f"**Length-controlled win rate: {controlled['value']:.1%}** (95% interval {span(controlled, '.1%')}: "
                  f"{controlled['verdict']}): whether the win survives once answer length is accounted for. Method: "
                  f"{controlled['method']}." + (f" Here {controlled['note']}." if "note" in controlled else "")]
    kl, change = report["kl"], report["length_change"]
    if not kl:
        return lines + ["", f"**KL({second} ‖ {first}): not measured**, nor the change in answer length in tokens: "
                        f"{report['kl_not_measured']}."]
    return lines + ["", f"**KL({second} ‖ {first}): {kl['value']:.3g} nats per token** (95% interval "
                    f"{span(kl, '.3g')}): the exact KL divergence over the vocabulary between the two models' "
                    f"next-token distributions at each of the {kl['tokens']} tokens of the {second} model's greedy "
                    "answers (stop tokens included), both models reading the same prompt and answer; 0 where they "
                    f"agree on every next token. Its answers' mean length changed by {interval_text(change)} "
                    "tokens."]


def write_markdown(path: str, report: dict, samples: list[dict]) -> None:
    roles = [role for role in ("base", "finetuned") if role in report]
    fine, labels, differences = report["finetuned"], report.get("labels", LABELS), report.get("differences")
    first, second = labels["base"], labels["finetuned"]
    title = " vs ".join(report[f"{role}_model"] for role in roles)
    head = ["metric", "better", *(labels[r] for r in roles)]
    head += [f"{second} - {first} (95% interval)", f"{second} better?"] if differences else []
    lines = [f"# Evaluation: {title}", "",
             f"Held-out validation split of `{report['dataset']}` (seed {report['seed']}, size "
             f"{report['val_size']}): perplexity on {fine['perplexity_examples']} examples, greedy generations "
             f"for {fine['generations']} prompts, at most {report['max_new_tokens']} new tokens.", "",
             "| " + " | ".join(head) + " |",
             "| --- | --- |" + " ---: |" * len(roles) + (" ---: | --- |" if differences else "")]
    for key, (label, way) in metrics_of(report).items():
        row = [label, way, *(f"{report[r][key]:.4g}" for r in roles)]
        row += [interval_text(differences[key]), differences[key]["verdict"]] if differences else []
        lines.append("| " + " | ".join(row) + " |")
    row = ["mean answer length (tokens)", "-", *(f"{report[r]['mean_length']:.1f}" for r in roles)]
    if differences:
        row.append(interval_text(report["length_change"]) if report["length_change"] else "not measured")
    lines.append("| " + " | ".join(row + [f"reference: {report['reference_mean_length']:.1f}"]) + " |")
    lines += confidence_prose(report, first, second)
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
    """The bars of one metric in report.png: the first model's blue; the second's green where it is better, red
    where it is worse, grey where its interval can't tell (blue too when it is reported alone)."""
    verdict = (report.get("differences") or {}).get(key, {}).get("verdict")
    return [COLORS[verdict] if role == "finetuned" and verdict else COLORS["first"]
            for role in ("base", "finetuned") if role in report]


def plot_win_rates(ax, report: dict) -> None:
    """The raw and the length-controlled win rate, with their intervals, against the 50% of two equal models."""
    rates = report["win_rates"]
    estimates = [rates["raw"], rates["length_controlled"]]
    values = [estimate["value"] for estimate in estimates]
    errors = [[max(0.0, v - e["interval"][0]) for v, e in zip(values, estimates)],  # (a percentile interval of
              [max(0.0, e["interval"][1] - v) for v, e in zip(values, estimates)]]  # the LC rate may miss it)
    bars = ax.bar(["raw", "length-\ncontrolled"], values, yerr=errors, capsize=3,
                  color=[COLORS[e["verdict"]] for e in estimates])
    ax.bar_label(bars, labels=[f"{v:.1%}" for v in values], fontsize=7, padding=2)
    ax.axhline(0.5, color="black", linestyle="--", linewidth=0.8)
    ax.set_ylim(0, 1.15)
    ax.set_title(f"win rate over {report.get('labels', LABELS)['base']}\n(reward model; 50% = even)", fontsize=8)
    ax.tick_params(labelsize=7)


def plot_report(path: str, report: dict) -> None:
    """One small bar chart per metric (they have different scales), base vs fine-tuned, each difference and its
    interval under it; and the win rates when a reward model judged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = [role for role in ("base", "finetuned") if role in report]
    metrics = metrics_of(report)
    panels = len(metrics) + ("win_rates" in report)
    fig, axes = plt.subplots(1, panels, figsize=(2.1 * panels, 3.6))
    for ax, (key, (label, way)) in zip(axes, metrics.items()):
        values = [report[role][key] for role in roles]
        bars = ax.bar([report.get("labels", LABELS)[role] for role in roles], values, color=bar_colors(report, key))
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_title(f"{label}\n({way} is better)", fontsize=8)
        if "differences" in report:
            ax.set_xlabel(f"difference {interval_text(report['differences'][key])}", fontsize=6)
        ax.tick_params(labelsize=7)
        ax.margins(y=0.2)
    if "win_rates" in report:
        plot_win_rates(axes[-1], report)
    title = " vs ".join(report[f"{role}_model"] for role in roles) + " on held-out prompts"
    if "differences" in report:
        title += ("\nsecond model green where better, red where worse, grey where its 95% interval holds no change "
                  "(difference [interval] under each chart)")
    fig.suptitle(title, fontsize=9)
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
                              ("batch_size", 1), ("bootstrap", 100), ("bootstrap_seed", 0))
               if getattr(args, k) < low])


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
    from tuning.generation.generate import load_for_generation, require_finetuned
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
    # Both models are loaded before either generates: the KL pass reads them side by side (and a model that can't
    # load is said before minutes of generating).
    models = {role: load_for_generation(path, device, role) for role, path in roles.items()}
    results, answers = {}, {}
    for role, (lm, tokenizer) in models.items():
        results[role], answers[role] = evaluate_model(role, lm, tokenizer, records, config, args, template,
                                                      chat_template)
    gen_records = records[: args.num_generations]
    if args.reward_model:
        scores = rewards(judge, gen_records, answers, args.batch_size)
        for role, values in scores.items():
            results[role]["mean_reward"] = sum(values) / len(values)
            results[role]["per_prompt"]["reward"] = values
    report = {**{f"{role}_model": path for role, path in roles.items()},
              "dataset": args.dataset or config["dataset"], "seed": config["seed"], "val_size": config["val_size"],
              "max_new_tokens": args.max_new_tokens,
              "reference_mean_length": results["finetuned"]["reference_mean_length"], **results}
    if sft_model and "base" in results and os.path.realpath(args.base) == os.path.realpath(sft_model):
        report["labels"] = STAGE_LABELS  # SFT vs aligned: the two stages of one pipeline
    if args.reward_model and "base" in results:
        report["reward_model"] = args.reward_model
    if "base" in results:
        prompts = [prompt_and_reference(r, template)[0] for r in gen_records]
        kl, kl_problem = answers_kl(models, prompts, answers["finetuned"], chat_template, args.batch_size)
        report.update(comparison(results["base"]["per_prompt"], results["finetuned"]["per_prompt"], kl, kl_problem,
                                 args.bootstrap, args.bootstrap_seed))
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
