"""Constitutional AI (Bai et al., 2022): preference data from a model's own judgement, guided by written principles
(a constitution file), instead of human labels.

    python constitution.py --stage revise   # distilgpt2-alpaca answers red-team prompts, then critiques and revises
                                            # each answer -> distilgpt2-alpaca-cai/revisions.jsonl (train.py reads it)
    python constitution.py --stage label --model distilgpt2-alpaca-sl-cai
                                            # two sampled answers per prompt, labelled by the feedback model
                                            # -> distilgpt2-alpaca-cai/pairs.jsonl (reward.py and align.py read it)
    python constitution.py --smoke --stage revise   # offline, after `python train.py --smoke`

revise (SL-CAI): the model answers each prompt; the feedback model critiques the answer against a principle drawn at
random, then rewrites it (--revisions rounds). Fine-tuning on the last revisions is the supervised stage.
label (RL-CAI): the model samples two answers per prompt; the feedback model is asked which better follows a
principle, (A) or (B), in both orders, and its next-token probabilities of "A" and "B" give a soft label.
The feedback model is --model itself unless --feedback-model names another (any causal LM, or an instruct model,
asked in its chat template). Running the same command again after an interruption goes on where it stopped.
"""

from __future__ import annotations

import os
import sys

# ---- settings (each has a flag: BATCH_SIZE -> --batch-size) ----
STAGE = "revise"  # revise|label: critiques and revisions (an SFT dataset), or AI-labelled preference pairs
MODEL = "distilgpt2-alpaca"  # the model that answers the prompts (train.py's output dir; for label, the SL-CAI model)
FEEDBACK_MODEL = ""  # the model that critiques, revises and labels: "" = --model itself; or any causal LM dir or Hub id
CONSTITUTION = "constitutions/harmless.json"  # the principles: a JSON file you edit (see constitutions/)
PROMPTS = "Anthropic/hh-rlhf:harmless-base"  # Hub id[:data_dir] or .json/.jsonl(.gz) of pairs (first human turn), instructions or conversations
NUM_PROMPTS = -1  # use the first N prompts; -1 = all
OUTPUT_DIR = "distilgpt2-alpaca-cai"  # revisions.jsonl (revise); labels.jsonl, pairs.jsonl, labels.png (label); summaries
REVISIONS = 1  # revise: critique-and-revision rounds per answer, each with a principle drawn at random; >= 1
PRINCIPLES_PER_PAIR = 4  # label: principles asked per pair, drawn at random (each in both answer orders); >= 1
MIN_CONFIDENCE = 0.6  # label: pairs whose label gives the chosen answer less than this stay out of pairs.jsonl; in [0.5, 1]
MAX_NEW_TOKENS = 128  # most tokens of each answer, critique and revision; >= 1
SAMPLE = False  # revise: sample the answers, critiques and revisions (at --temperature) instead of greedy decoding
TEMPERATURE = 1.0  # sampling temperature (label always samples its two answers); > 0
BATCH_SIZE = 16  # prompts generated together, and comparisons scored together; >= 1
SEED = 42  # seed of the principles drawn and of the sampling
SKIP_INVALID = True  # drop malformed prompt records (counted, the first named); --no-skip-invalid stops at one
RESUME = True  # go on where an interrupted run with the same settings stopped; --no-resume starts over
DEVICE = "auto"  # auto|cuda|mps|cpu: auto picks CUDA, then Apple MPS, then CPU
SMOKE = False  # offline preset: the smoke models, the smoke constitution and greetings, to smoke-run/constitution/

# A run's identity: going on with any of these changed would mix two different runs in one file.
IDENTITY = ("stage", "model", "feedback_model", "constitution", "constitution_sha256", "prompts", "num_prompts",
            "revisions", "principles_per_pair", "max_new_tokens", "sample", "temperature", "batch_size", "seed")
# What each stage writes: its journal (one line per prompt, appended batch by batch), and its summary (last).
JOURNAL = {"revise": "revisions.jsonl", "label": "labels.jsonl"}
# label: the pairs confident enough to train on; revise: how many examples of an answer, its critique and its
# revision are printed at the end; label: below this share of the next-token probability on the option letters, a
# feedback model is warned about (it would start its reply otherwise, so its A/B ratio means little).
PAIRS_FILE, SHOWN_CHANGED, LOW_LETTER_MASS = "pairs.jsonl", 1, 0.5


def validate_args(args) -> None:
    from tuning.cli import check_all

    problems = [f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})"
                for name in ("revisions", "principles_per_pair", "max_new_tokens", "batch_size")
                if getattr(args, name) < 1]
    if args.num_prompts < 1 and args.num_prompts != -1:
        problems.append(f"--num-prompts must be >= 1, or -1 for all (got {args.num_prompts})")
    if not 0.5 <= args.min_confidence <= 1:
        problems.append(f"--min-confidence must be in [0.5, 1] (got {args.min_confidence})")
    if args.temperature <= 0:
        problems.append(f"--temperature must be > 0 (got {args.temperature})")
    check_all(problems)


def apply_smoke(args, explicit: set) -> None:
    """--smoke: the smoke constitution, the smoke greetings as prompts, the smoke SFT model (for both stages: the
    SL-CAI model already answers every greeting politely, so its two samples would agree) and settings, except for
    flags given on the command line."""
    from tuning import smoke
    from tuning.cli import UserError

    for name, value in {**smoke.CONSTITUTION_SETTINGS, **smoke.CONSTITUTION_STAGES[args.stage]}.items():
        if name not in explicit:
            setattr(args, name, value)
    if not os.path.isfile(os.path.join(smoke.OUTPUT_DIR, "model", "config.json")):
        raise UserError(f"no smoke SFT model in {smoke.OUTPUT_DIR}/model/: run `python train.py --smoke` first")
    smoke.prepare_constitution(smoke.OUTPUT_DIR)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UserError(f"--model {args.model}: no model there yet; the smoke pipeline runs `python train.py --smoke "
                        f"--dataset {smoke.OUTPUT_DIR}/constitution/revisions.jsonl --output-dir {args.model}` first")


def smoke_dir() -> str:
    from tuning import smoke

    return smoke.OUTPUT_DIR


def check_models(args) -> None:
    """--model is a finished model (not a reward model), and the output dir is none of the models' dirs."""
    from tuning.cli import UserError
    from tuning.models import lora
    from tuning import rundir

    for flag, path in (("--model", args.model), ("--feedback-model", args.feedback_model)):
        if path and os.path.realpath(path) == os.path.realpath(args.output_dir):
            raise UserError(f"--output-dir {args.output_dir} is the {flag} directory; constitution.py needs its own")
    if not os.path.isdir(args.model) and args.model == MODEL:
        raise UserError(f"--model {args.model}: no SFT model there. Run `python train.py` first (or the smoke steps: "
                        "`python train.py --smoke`, then `python constitution.py --smoke`).")
    for flag, path in (("--model", args.model), ("--feedback-model", args.feedback_model)):
        if path and os.path.isdir(path) and not lora.is_model_dir(path):
            last = rundir.find_checkpoint(path)
            hint = f"; its training did not finish (pass {flag} {last}, or resume it)" if last else ""
            raise UserError(f"{flag} {path}: no model there{hint}")


def load_prompts(args) -> tuple[list[dict], dict]:
    """The prompts to answer, each a normalized prompt (preferences.load_prompts): a pair's dialogue reduced to its
    first human turn (HH-RLHF's red-team request), an instruction, or a conversation up to its last user turn."""
    from tuning.data.principles import first_turn
    from tuning.data.preferences import PROMPT_FIELDS
    from tuning.data.preferences import load_prompts as read
    from tuning.data.records import read_raw

    import json

    rows = read_raw(args.prompts)
    first = next((record for _, record in rows if isinstance(record, dict)), {})
    prompts, report = read(args.prompts, args.skip_invalid, rows=rows)
    prompts = [{key: prompt[key] for key in PROMPT_FIELDS} for prompt in prompts]  # what is asked, nothing else
    if "chosen" in first or "rejected" in first:
        prompts = [first_turn(prompt) for prompt in prompts]
    seen, unique = set(), []
    for prompt in prompts:  # (HH-RLHF opens many dialogues with the same request)
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(prompt)
    report["duplicates_dropped"] = len(prompts) - len(unique)
    if args.num_prompts > 0:
        unique = unique[:args.num_prompts]
    return unique, report


def say_prompts(args, prompts: list[dict], report: dict) -> None:
    """What was read: the prompts kept, and what was left out (malformed records, the first named; empty ones;
    repeated ones)."""
    skipped = report.get("skipped") or []
    first = f" ({skipped[0]}{'; ...' if len(skipped) > 1 else ''})" if skipped else ""
    left = [f"{len(skipped)} malformed{first}" if skipped else "",
            f"{len(report['empty_dropped'])} empty" if report.get("empty_dropped") else "",
            f"{report['duplicates_dropped']} repeated" if report.get("duplicates_dropped") else ""]
    left = [part for part in left if part]
    print(f"Prompts: {len(prompts)} from {args.prompts}" + (f"; left out: {', '.join(left)}" if left else ""))


def prompt_field(prompt: dict) -> str:
    """The field a prompt came from, for messages about it."""
    return "messages" if prompt.get("messages") is not None else "prompt" if prompt.get("prompt") is not None \
        else "instruction"


class Side:
    """One model as constitution.py uses it: loaded for generation, with its template and chat template."""

    def __init__(self, path: str, device, flag: str):
        from tuning.cli import UserError
        from tuning.data.chat_template import saved_or_ours
        from tuning.data.templates import TEMPLATE, TEMPLATES, load_template
        from tuning.generation.generate import load_for_generation
        from tuning.models.loading import context_limit

        self.path, self.flag = path, flag
        self.lm, self.tokenizer = load_for_generation(path, device, flag.lstrip("-"))
        vocabulary = self.lm.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocabulary:
            raise UserError(f"{flag} {path}: its tokenizer has {len(self.tokenizer)} tokens but config.json's "
                            f"vocab_size is {vocabulary}: the tokenizer is not this model's")
        self.template = load_template(path) if os.path.isdir(path) else TEMPLATES[TEMPLATE]  # a Hub model: ours
        self.chat_template = saved_or_ours(self.tokenizer, self.template)
        self.context = context_limit(self.lm.config) or 10 ** 9

    def asked(self, prompts: list[dict]) -> list:
        """What this model is asked for each prompt, in its own format (preferences.pair_prompt)."""
        from tuning.data.preferences import foreign, pair_prompt

        own = foreign(self.chat_template, self.tokenizer)
        return [pair_prompt(prompt, self.template, own, self.tokenizer) for prompt in prompts]

    def generate(self, prompts: list, args, seed: int, sample: bool) -> list[str]:
        from tuning.generation.generate import generate

        kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": sample}
        if sample:
            kwargs.update(temperature=args.temperature, top_k=0)
        return [answer["text"] for answer in generate(self.lm, self.tokenizer, prompts, kwargs, seed=seed,
                                                      batch_size=len(prompts) or 1, chat_template=self.chat_template)]


def requests_that_fit(args, prompts: list[dict], policy: Side, feedback: Side, principles: list[dict]) -> None:
    """Every prompt, its answers and the longest request built from it fit both models' contexts: a UserError naming
    the prompts file, the prompt and its field for the first that does not. A request holds the prompt, then up to
    two generated texts of --max-new-tokens each (revise: the answer and its critique; label: two answers), and
    leaves room for the reply."""
    from tuning.cli import UserError
    from tuning.data.principles import prompt_text, request
    from tuning.data.chat_template import encode_prompts
    from tuning.generation.feedback import ask

    fields = ("critique", "revision") if args.stage == "revise" else ("comparison",)
    room = 2 * args.max_new_tokens + (args.max_new_tokens if args.stage == "revise" else 1)
    own = encode_prompts(policy.tokenizer, policy.asked(prompts), policy.chat_template)
    for index, ids in enumerate(own):
        if len(ids) + args.max_new_tokens > policy.context:
            raise UserError(f"{args.prompts}: prompt {index}, field '{prompt_field(prompts[index])}': {len(ids)} "
                            f"tokens, and an answer of --max-new-tokens {args.max_new_tokens} does not fit the "
                            f"{policy.context} positions of --model {policy.path}; lower --max-new-tokens or leave "
                            "such prompts out")
    for principle in principles:
        for field in fields:
            texts = [request(principle, field, prompt=prompt_text(p), answer="", critique="", answer_a="",
                             answer_b="") for p in prompts]
            lengths = map(len, encode_prompts(feedback.tokenizer, ask(feedback.tokenizer, texts, feedback.template,
                                                                      feedback.chat_template), feedback.chat_template))
            for index, n in enumerate(lengths):
                if n + room > feedback.context:
                    raise UserError(
                        f"{args.prompts}: prompt {index}, field '{prompt_field(prompts[index])}': principle "
                        f"'{principle['name']}' asks it in a {field} request of {n} tokens, and with room for the "
                        f"texts it holds and the reply ({room} tokens at --max-new-tokens {args.max_new_tokens}) that "
                        f"is more than the {feedback.context} positions of the feedback model {feedback.path}; lower "
                        "--max-new-tokens or leave such prompts out")


# ---------------------------------------------------------------- the run's file, resumable
def run_config(args) -> dict:
    """Every setting of the run, the constitution's sha256 and the command: what {stage}_config.json keeps."""
    import hashlib

    with open(args.constitution, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    return {**vars(args), "constitution_sha256": digest, "command": " ".join(sys.argv)}


def check_same_run(args, config: dict) -> dict | None:
    """The settings of the run already in the output dir (None: none there, or --no-resume); a UserError when they
    differ from these, before any model loads."""
    from tuning import rundir
    from tuning.cli import UserError

    saved = rundir.read_json(os.path.join(args.output_dir, f"{args.stage}_config.json"))
    if saved and args.resume:
        changed = [key for key in IDENTITY if saved.get(key) != config.get(key)]
        if changed:
            raise UserError(f"{args.output_dir}/ holds a --stage {args.stage} run with other settings "
                            f"({', '.join(f'{k}: {saved.get(k)!r} there, {config.get(k)!r} now' for k in changed)}); "
                            "pass --no-resume to start over, or another --output-dir")
    return saved if args.resume else None


def open_run(args, config: dict, saved: dict | None, total: int) -> list[dict]:
    """Lock the output dir and return the records an interrupted run with the same settings already wrote (a cut
    last line is dropped); without one (or with --no-resume) the stage's earlier files are removed."""
    from tuning import rundir

    os.makedirs(args.output_dir, exist_ok=True)
    _lock.append(rundir.lock(args.output_dir))
    config_path, journal = (os.path.join(args.output_dir, name) for name in (f"{args.stage}_config.json",
                                                                            JOURNAL[args.stage]))
    if not saved:
        for name in (JOURNAL[args.stage], f"{args.stage}_summary.json", *((PAIRS_FILE, "labels.png")
                                                                          if args.stage == "label" else ())):
            if os.path.exists(os.path.join(args.output_dir, name)):
                os.remove(os.path.join(args.output_dir, name))
    rundir.write_json(config_path, config)
    return read_journal(journal, args.batch_size, total)


_lock: list = []  # the output dir's lock, held while the process runs


def read_journal(path: str, batch_size: int, total: int) -> list[dict]:
    """The whole batches of a run's file: a batch cut by a kill (a cut line, or fewer lines than a batch) is
    dropped and the file cut back to the batches before it, so the run redoes that batch exactly as an unbroken
    run does it (same prompts together, same seed)."""
    import json

    if not os.path.isfile(path):
        return []
    records, ends = [], [0]
    with open(path, "rb") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            ends.append(ends[-1] + len(line))
    whole = len(records) if len(records) >= total else len(records) // batch_size * batch_size  # (all done: kept)
    with open(path, "r+b") as handle:
        handle.truncate(ends[whole])
    return records[:whole]


def append(path: str, records: list[dict]) -> None:
    """A batch's records, written at once and flushed to disk before the next batch starts."""
    import json

    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        handle.flush()
        os.fsync(handle.fileno())


def batches(prompts: list[dict], done: int, size: int, desc: str):
    """(start, batch) of the prompts not yet done, under a progress bar that counts those done before."""
    from tqdm.auto import tqdm

    with tqdm(total=len(prompts), initial=done, desc=desc, unit="prompt", file=sys.stderr) as bar:
        for start in range(done, len(prompts), size):
            yield start, prompts[start:start + size]
            bar.update(len(prompts[start:start + size]))


def drawn(args, index: int, principles: list[dict], count: int, repeat: bool) -> list[dict]:
    """The principles for prompt `index`, drawn with --seed and the prompt's index, so a resumed run draws the
    same ones: `count` draws with repeats (revision rounds), or `count` different ones (a pair's questions)."""
    import random

    rng = random.Random(f"{args.seed}:{index}")
    if repeat:
        return [rng.choice(principles) for _ in range(count)]
    return rng.sample(principles, min(count, len(principles)))


# ---------------------------------------------------------------- revise
def revise_batch(args, batch: list[dict], start: int, policy: Side, feedback: Side, principles: list[dict]) -> list:
    """SFT records for a batch of prompts: the model's answer, then --revisions rounds of a critique and a revision
    by the feedback model, each against a principle drawn for the prompt; the last revision is the output. A
    request that does not fit the feedback model, or an empty revision, keeps the answer before it."""
    from tuning.data.principles import prompt_text, request
    from tuning.generation.feedback import ask, fits

    answers = policy.generate(policy.asked(batch), args, args.seed + start, args.sample)
    texts = [prompt_text(prompt) for prompt in batch]
    draws = [drawn(args, start + i, principles, args.revisions, repeat=True) for i in range(len(batch))]
    chains = [[] for _ in batch]
    current = list(answers)
    for round_ in range(args.revisions):
        asked = ask(feedback.tokenizer, [request(draws[i][round_], "critique", prompt=texts[i], answer=current[i])
                                         for i in range(len(batch))], feedback.template, feedback.chat_template)
        room = feedback.context - args.max_new_tokens
        fit = fits(feedback.tokenizer, asked, feedback.chat_template, room)
        critiques = dict(zip([i for i, ok in enumerate(fit) if ok],
                             feedback.generate([q for q, ok in zip(asked, fit) if ok], args,
                                               args.seed + start + 7919 * (2 * round_ + 1), args.sample)))
        asked = {i: ask(feedback.tokenizer, [request(draws[i][round_], "revision", prompt=texts[i],
                                                     answer=current[i], critique=critique)],
                        feedback.template, feedback.chat_template)[0] for i, critique in critiques.items()}
        fit = dict(zip(asked, fits(feedback.tokenizer, list(asked.values()), feedback.chat_template, room)))
        order = [i for i in asked if fit[i]]
        revisions = dict(zip(order, feedback.generate([asked[i] for i in order], args,
                                                      args.seed + start + 7919 * (2 * round_ + 2), args.sample)))
        for i in range(len(batch)):
            step = {"principle": draws[i][round_]["name"], "critique": critiques.get(i),
                    "revision": revisions.get(i)}
            if i not in revisions:
                step["kept"] = "the request did not fit the feedback model's context"
            elif not revisions[i].strip():
                step["kept"] = "the revision was empty"
            else:
                current[i] = revisions[i]
            chains[i].append(step)
    return [sft_record(prompt, current[i], answers[i], chains[i]) for i, prompt in enumerate(batch)]


def sft_record(prompt: dict, output: str, initial: str, critiques: list[dict]) -> dict:
    """A revision as a record train.py reads: Alpaca style for an instruction or a text prompt, a conversation for
    a conversation; with the first answer and every critique and revision, for reading."""
    extra = {"initial": initial, "critiques": critiques}
    if prompt.get("messages") is not None:
        return {"messages": prompt["messages"] + [{"role": "assistant", "content": output}], **extra}
    if prompt.get("prompt") is not None:
        return {"instruction": prompt["prompt"], "input": "", "output": output, **extra}
    return {"instruction": prompt["instruction"], "input": prompt["input"] or "", "output": output, **extra}


def revise_summary(records: list[dict]) -> dict:
    steps = [step for record in records for step in record["critiques"]]
    return {"prompts": len(records), "revised": sum(record_output(r) != r["initial"] for r in records),
            "rounds": len(steps), "kept_answer": sum("kept" in step for step in steps),
            "principles": {name: sum(step["principle"] == name for step in steps)
                           for name in sorted({step["principle"] for step in steps})}}


def record_output(record: dict) -> str:
    return record["messages"][-1]["content"] if "messages" in record else record["output"]


def print_revisions(records: list[dict], summary: dict, path: str, next_step: str) -> None:
    print(f"Revised {summary['revised']} of {summary['prompts']} answers ({summary['rounds']} critique-and-revision "
          f"rounds; {summary['kept_answer']} kept the answer before them); principles drawn: "
          + ", ".join(f"{name} {n}" for name, n in summary["principles"].items()))
    for record in [r for r in records if record_output(r) != r["initial"]][:SHOWN_CHANGED]:
        asked = record["messages"][-2]["content"] if "messages" in record else \
            record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        print(f"\nPrompt: {asked!r}\nAnswer: {record['initial']!r}")
        for step in record["critiques"]:
            print(f"Critique ({step['principle']}): {step['critique']!r}\nRevision: {step['revision']!r}")
    print(f"\nSFT records in {path}: `{next_step}` fine-tunes on the revisions")


# ---------------------------------------------------------------- label
def label_batch(args, batch: list[dict], start: int, policy: Side, feedback: Side, principles: list[dict],
                options: list) -> list[dict]:
    """Preference records for a batch of prompts: two answers sampled from the model, and the feedback model's soft
    label, P(chosen is better), averaged over --principles-per-pair principles in both orders; with the principles
    asked and each probability. Identical answers are not asked (label 0.5)."""
    from tuning.data.principles import OPTIONS, prompt_text, request
    from tuning.generation.feedback import ask, fits, option_ids, option_probabilities, orders_agree, soft_label

    asked = policy.asked(batch)
    samples = policy.generate([prompt for prompt in asked for _ in range(2)], args, args.seed + start, True)
    questions, owners = [], []
    for i, prompt in enumerate(batch):
        first, second = samples[2 * i], samples[2 * i + 1]
        if first.strip() == second.strip() or not first.strip() or not second.strip():
            continue
        for principle in drawn(args, start + i, principles, args.principles_per_pair, repeat=False):
            for order, (a, b) in (("AB", (first, second)), ("BA", (second, first))):
                questions.append(request(principle, "comparison", prompt=prompt_text(prompt), answer_a=a, answer_b=b))
                owners.append((i, principle["name"], order))
    comparisons = ask(feedback.tokenizer, questions, feedback.template, feedback.chat_template)
    fit = fits(feedback.tokenizer, comparisons, feedback.chat_template, feedback.context - 1)
    if comparisons and not options:
        options += option_ids(feedback.tokenizer, comparisons[0], feedback.chat_template, feedback.path)
    probabilities = option_probabilities(feedback.lm, feedback.tokenizer, [c for c, ok in zip(comparisons, fit) if ok],
                                         feedback.chat_template, options, args.batch_size) if any(fit) else []
    found = iter(probabilities)
    asked_of = {}
    for (i, name, order), ok in zip(owners, fit):
        asked_of.setdefault(i, {}).setdefault(name, {})[order] = next(found) if ok else None  # (probs, mass)
    out = []
    for i, prompt in enumerate(batch):
        first, second = samples[2 * i], samples[2 * i + 1]
        votes = {name: orders for name, orders in asked_of.get(i, {}).items()
                 if orders.get("AB") is not None and orders.get("BA") is not None}
        if not votes:
            why = "identical answers" if i not in asked_of and first.strip() == second.strip() else \
                "an empty answer" if i not in asked_of else "too long for the feedback model"
            out.append(pair_record(prompt, first, second, 0.5, [], why))
            continue
        p_first = soft_label([v["AB"][0] for v in votes.values()], [v["BA"][0] for v in votes.values()])
        chosen, rejected = (first, second) if p_first >= 0.5 else (second, first)
        record = pair_record(prompt, chosen, rejected, max(p_first, 1 - p_first), list(votes))
        shown_first = ("chosen", "rejected") if p_first >= 0.5 else ("rejected", "chosen")  # what (A) was, per order
        record["probabilities"] = [{"principle": name, "A_is": shown_first[k], **dict(zip(OPTIONS, v[order][0])),
                                    "letters": v[order][1]}
                                   for name, v in votes.items() for k, order in enumerate(("AB", "BA"))]
        record["orders_agree"] = sum(orders_agree(v["AB"][0], v["BA"][0]) for v in votes.values()) / len(votes)
        out.append(record)
    return out


def pair_record(prompt: dict, chosen: str, rejected: str, label: float, principles: list[str], why: str = "") -> dict:
    """A labelled pair in a format reward.py and align.py read: Alpaca style, a text prompt, or TRL's conversational
    pair; `label` is the feedback model's P(chosen is better)."""
    if prompt.get("messages") is not None:
        record = {"prompt": prompt["messages"], "chosen": [{"role": "assistant", "content": chosen}],
                  "rejected": [{"role": "assistant", "content": rejected}]}
    elif prompt.get("prompt") is not None:
        record = {"prompt": prompt["prompt"], "chosen": chosen, "rejected": rejected}
    else:
        record = {"instruction": prompt["instruction"], "input": prompt["input"] or "", "chosen": chosen,
                  "rejected": rejected}
    record.update(label=label, principles=principles)
    if why:
        record["not_asked"] = why
    return record


def label_summary(records: list[dict], min_confidence: float) -> dict:
    """What the label stage made: pairs asked, the distribution of their labels, how often both answer orders
    agreed, and the share left out of pairs.jsonl (not asked, or less confident than --min-confidence)."""
    asked = [r for r in records if "not_asked" not in r]
    kept = [r for r in asked if r["label"] >= min_confidence]
    bins = [0] * 5  # the chosen answer's probability: [0.5, 0.6), ..., [0.9, 1.0]
    for record in asked:
        bins[min(int((record["label"] - 0.5) * 10), 4)] += 1
    return {"prompts": len(records), "labelled": len(asked),
            "not_asked": {why: sum(r.get("not_asked") == why for r in records)
                          for why in sorted({r["not_asked"] for r in records if "not_asked" in r})},
            "label_bins": {f"{0.5 + k / 10:.1f}-{0.6 + k / 10:.1f}": n for k, n in enumerate(bins)},
            "mean_label": sum(r["label"] for r in asked) / len(asked) if asked else None,
            "orders_agree": sum(r["orders_agree"] for r in asked) / len(asked) if asked else None,
            "letter_mass": (sum(p["letters"] for r in asked for p in r["probabilities"])
                            / sum(len(r["probabilities"]) for r in asked)) if asked else None,
            "min_confidence": min_confidence, "kept": len(kept), "dropped": len(records) - len(kept),
            "dropped_share": (len(records) - len(kept)) / len(records) if records else 0.0}


def print_labels(records: list[dict], summary: dict, output_dir: str) -> None:
    from tuning.data.principles import OPTIONS

    not_asked = "; ".join(f"{n} with {why}" for why, n in summary["not_asked"].items())
    print(f"Labelled {summary['labelled']} of {summary['prompts']} pairs{f' (not asked: {not_asked})' if not_asked else ''}; "
          + (f"both answer orders agreed on {summary['orders_agree']:.1%} of the questions; mean P(chosen) "
             f"{summary['mean_label']:.3f}" if summary["labelled"] else "none could be asked"))
    print("P(chosen) " + ", ".join(f"{span}: {n}" for span, n in summary["label_bins"].items()))
    if summary["labelled"] and summary["letter_mass"] < LOW_LETTER_MASS:
        print(f"warning: the letters {' and '.join(OPTIONS)} held only {summary['letter_mass']:.1%} of the feedback "
              "model's next-token probability (it would start its replies otherwise), so its labels may mean little; "
              "a feedback model that answers the comparison with a letter (an instruct model) gives better ones")
    print(f"Kept {summary['kept']} pairs with P(chosen) >= {summary['min_confidence']} in "
          f"{os.path.join(output_dir, PAIRS_FILE)}; left out {summary['dropped']} ({summary['dropped_share']:.1%})")
    if not summary["kept"]:
        print("warning: no pair to train on: lower --min-confidence (0.5 keeps every labelled pair), or use more "
              "prompts or a stronger --feedback-model")
    for record in [r for r in records if "probabilities" in r][:1]:
        shown = {k: record[k] for k in ("instruction", "input", "prompt", "chosen", "rejected") if k in record}
        print(f"\nA labelled pair: {shown}")
        print(f"P(chosen is better) {record['label']:.3f}, from "
              + "; ".join(f"{p['principle']} with the {p['A_is']} answer as (A): P(A) {p['A']:.3f}, P(B) {p['B']:.3f}"
                          for p in record["probabilities"]))


def plot_labels(records: list[dict], min_confidence: float, path: str) -> None:
    """labels.png: a histogram of the soft labels, the feedback model's P(chosen is better), with the pairs that
    --min-confidence leaves out shaded."""
    from tuning.runs.plots import pyplot

    plt = pyplot()
    values = [r["label"] for r in records if "not_asked" not in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.hist(values, bins=[0.5 + i / 40 for i in range(21)], color="tab:blue", alpha=0.8)
    ax.axvspan(0.5, min_confidence, color="tab:gray", alpha=0.25, label=f"left out: P(chosen) < {min_confidence}")
    ax.set_xlim(0.5, 1)
    ax.set_xlabel("soft label: the feedback model's P(chosen is better), both answer orders averaged")
    ax.set_ylabel("pairs")
    ax.set_title(f"AI labels of {len(values)} pairs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- the run
def main(args, explicit: set) -> None:
    import json

    from tuning import rundir
    from tuning.data.principles import read_constitution
    from tuning.models.devices import get_device
    from tuning.models.loading import offline_unless_hub_reachable

    if args.smoke:
        apply_smoke(args, explicit)
    offline_unless_hub_reachable([args.model, args.feedback_model, args.prompts.split(":")[0]])
    check_models(args)
    given, shipped = args.constitution, os.path.join(os.path.dirname(os.path.abspath(__file__)), args.constitution)
    if not os.path.isfile(args.constitution) and os.path.isfile(shipped):  # constitutions/ of the checkout
        args.constitution = shipped
    principles = read_constitution(args.constitution)
    prompts, report = load_prompts(args)
    say_prompts(args, prompts, report)
    config = run_config(args)
    saved = check_same_run(args, config)
    device = get_device(args.device)
    policy = Side(args.model, device, "--model")
    feedback = policy if not args.feedback_model or os.path.realpath(args.feedback_model) == os.path.realpath(
        args.model) else Side(args.feedback_model, device, "--feedback-model")
    print(f"Constitution: {len(principles)} principle{'s' * (len(principles) > 1)} from "
          f"{given}; the answers from {args.model}, the "
          f"feedback from {feedback.path}{' (self-critique)' if feedback is policy else ''}; device: {device.type}")
    requests_that_fit(args, prompts, policy, feedback, principles)
    done = open_run(args, config, saved, len(prompts))
    journal = os.path.join(args.output_dir, JOURNAL[args.stage])
    if done:
        print(f"Going on after the {len(done)} prompts done in {journal}")
    options: list = []
    for start, batch in batches(prompts, len(done), args.batch_size,
                                "Critiquing and revising" if args.stage == "revise" else "Sampling and labelling"):
        made = (revise_batch(args, batch, start, policy, feedback, principles) if args.stage == "revise"
                else label_batch(args, batch, start, policy, feedback, principles, options))
        append(journal, made)
        done += made
    if args.stage == "revise":
        summary = revise_summary(done)
        rundir.write_json(os.path.join(args.output_dir, "revise_summary.json"), summary)
        next_step = (f"python train.py --smoke --dataset {journal} --output-dir {os.path.join(smoke_dir(), 'sl-cai')}"
                     if args.smoke else f"python train.py --model {args.model} --dataset {journal} --output-dir DIR")
        print_revisions(done, summary, journal, next_step)
        return
    summary = label_summary(done, args.min_confidence)
    with open(os.path.join(args.output_dir, PAIRS_FILE), "w", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done
                             if "not_asked" not in r and r["label"] >= args.min_confidence))
    plot_labels(done, args.min_confidence, os.path.join(args.output_dir, "labels.png"))
    rundir.write_json(os.path.join(args.output_dir, "label_summary.json"), summary)
    print_labels(done, summary, args.output_dir)


if __name__ == "__main__":
    from tuning import cli

    cli.run(sys.modules[__name__], main, validate_args)
