"""The offline `--smoke` preset: programmatic instruction tasks, a small tokenizer and a tiny GPT-2.

Nothing here touches the network. `python train.py --smoke` writes the data, the tokenizer and a
random-weight base model under `smoke-run/`, fine-tunes it, and `python inference.py --smoke`
shows that it learnt to follow the instructions. The tasks are checkable by exact match, so the
tests can tell whether the loss mask, the EOS and the shared template really work.

Beside the seven tasks, the SFT data holds three feedback tasks on greetings: the critique, revision and comparison
requests of the smoke constitution (constitutions/smoke.json), so the smoke model can judge and rewrite its own
greetings for `constitution.py --smoke`.

One task is left undecided on purpose: "Greet them." is answered politely ("Hello, cat dog owl!") or
casually ("hey cat dog owl"), 50/50. The preference pairs of `python reward.py --smoke` prefer the polite
style there, and elsewhere the correct answer over a wrong one, so the later steps have something to learn.
"""

from __future__ import annotations

import json
import os
import random

OUTPUT_DIR = "smoke-run"  # where the smoke preset writes everything
WORDS = ("apple banana cherry grape lemon mango melon peach pear plum kiwi lime "
         "cat dog fox owl bee ant cow pig hen yak red blue green pink gold gray").split()

# Overrides applied to train.py's settings by --smoke (a tiny model learns these tasks in about a minute).
TRAIN_SETTINGS = {"epochs": 10.0, "batch_size": 32, "grad_accum": 1, "lr": 2e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.05,
                  "weight_decay": 0.0, "max_length": 128, "val_size": 200, "eval_steps": 200, "save_steps": 200,
                  "logging_steps": 25, "template": "seed", "precision": "fp32"}
# train.py --smoke --lora: LoRA on the smoke SFT model teaches NEW_TASK (LoRA wants a higher lr, and needs fewer passes).
LORA_SETTINGS = {"epochs": 2.0, "lr": 2e-3, "warmup_ratio": 0.05}
# train.py --smoke --format messages: the smoke SFT model learns the smoke tasks as conversations, and TWO_TURN.
CHAT_SETTINGS = {"epochs": 4.0, "lr": 1e-3, "warmup_ratio": 0.05}
# Overrides applied to reward.py's settings by --smoke.
REWARD_SETTINGS = {"epochs": 2.0, "batch_size": 32, "lr": 1e-3, "max_length": 128, "val_size": 200,
                   "eval_steps": 1000, "save_steps": 100, "logging_steps": 10, "precision": "fp32"}
# Overrides applied to align.py's settings by --smoke, per method.
ALIGN_SETTINGS = {
    "dpo": {"lr": 2e-5, "beta": 0.1, "max_steps": 200, "batch_size": 32, "max_length": 128, "val_size": 200,
            "eval_steps": 1000, "save_steps": 100, "logging_steps": 10, "precision": "fp32"},
    "rloo": {"lr": 3e-5, "beta": 0.05, "max_steps": 100, "batch_size": 8, "num_generations": 4, "max_new_tokens": 24,
             "temperature": 1.0, "max_length": 128, "val_size": 200, "eval_steps": 1000, "save_steps": 50,
             "logging_steps": 10, "precision": "fp32"},
    "grpo": {"lr": 3e-5, "beta": 0.04, "max_steps": 100, "batch_size": 8, "num_generations": 4, "max_new_tokens": 24,
             "temperature": 1.0, "max_length": 128, "val_size": 200, "eval_steps": 1000, "save_steps": 50,
             "logging_steps": 10, "precision": "fp32"}}
# train.py --smoke --dataset FILE: the smoke SFT model (or --model) continued on FILE, as the Constitutional AI pipeline
# fine-tunes it on its own revisions (a short run at a lower lr: it must keep the other tasks).
CONTINUE_SETTINGS = {"epochs": 2.0, "lr": 2e-4, "warmup_ratio": 0.05, "val_size": 20}
# train.py --smoke --dataset smoke-run/arithmetic.json: the smoke SFT model taught the arithmetic task (a new task: more
# passes than CONTINUE_SETTINGS, at a lower lr than from scratch, with the old tasks replayed beside it).
ARITHMETIC_SETTINGS = {"epochs": 8.0, "lr": 5e-4, "warmup_ratio": 0.05, "val_size": 20}
# constitution.py --smoke: the smoke constitution and greetings, for both stages; then each stage's model. The label
# stage samples from the SL-CAI model that `train.py --smoke --dataset` makes from the revisions.
CONSTITUTION_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "constitutions",
                                 "smoke.json")
CONSTITUTION_SETTINGS = {"constitution": os.path.join("constitutions", "smoke.json"), "prompts": os.path.join(OUTPUT_DIR, "constitution-prompts.json"),
                         "output_dir": os.path.join(OUTPUT_DIR, "constitution"), "max_new_tokens": 24,
                         "batch_size": 100, "principles_per_pair": 1}
CONSTITUTION_STAGES = {"revise": {"model": os.path.join(OUTPUT_DIR, "model")},
                       "label": {"model": os.path.join(OUTPUT_DIR, "model")}}
N_CONSTITUTION_PROMPTS = 600  # greetings the constitution pipeline answers (none held out by the SFT run)
ALIGN_OTHER = {"val_size": 20}  # align.py --smoke --dataset FILE: a smaller held-out set (AI-labelled pairs are fewer)
N_PAIRS = 2000  # preference pairs in the smoke set
N_ARITHMETIC = 1500  # addition records the arithmetic SFT run learns from (smoke.prepare_arithmetic)
GREETING = "Greet them."  # the undecided task: answered in either style in the SFT data
STYLES = {"polite": "Hello, {names}!", "casual": "hey {names}"}  # the pairs prefer the first
MODEL_CONFIG = {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 256,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _words(rng, low=3, high=5):
    return rng.sample(WORDS, rng.randint(low, high))


def use_smoke_models(args, explicit: set) -> None:
    """--smoke in inference/evaluation: the smoke base and fine-tuned models, unless given as flags."""
    if "base" not in explicit:
        args.base = os.path.join(OUTPUT_DIR, "base")
    if "finetuned" not in explicit:
        args.finetuned = os.path.join(OUTPUT_DIR, "model")


def make_example(rng: random.Random, task: int | None = None) -> dict:
    """One random instruction in Alpaca record form: task 0-5 (one of the classic tasks; five take an
    input, one does not) or 6 (the greeting), random among all seven when not given."""
    task = rng.randrange(7) if task is None else task
    words = _words(rng)
    if task == 6:  # the undecided one: either style, 50/50
        style = "polite" if rng.random() < 0.5 else "casual"
        return {"instruction": GREETING, "input": " ".join(words[:3]),
                "output": STYLES[style].format(names=" ".join(words[:3]))}
    if task == 0:
        return {"instruction": "Reverse the order of the words.", "input": " ".join(words),
                "output": " ".join(reversed(words))}
    if task == 1:
        digits = rng.sample("0123456789", rng.randint(3, 4))
        return {"instruction": "Sort the numbers from smallest to largest.", "input": " ".join(digits),
                "output": " ".join(sorted(digits))}
    if task == 2:
        return {"instruction": "Write the words in capital letters.", "input": " ".join(words),
                "output": " ".join(words).upper()}
    if task == 3:
        return {"instruction": "Count the words.", "input": " ".join(words), "output": str(len(words))}
    if task == 4:
        return {"instruction": "Give the last word.", "input": " ".join(words), "output": words[-1]}
    word, times = rng.choice(WORDS), rng.randint(2, 4)
    return {"instruction": f"Repeat the word {word} {times} times.", "input": "", "output": " ".join([word] * times)}


# The feedback tasks: the smoke constitution's requests (constitutions/smoke.json) on greetings of either style, so
# that the smoke SFT model can critique, revise and judge its own greetings (constitution.py --smoke).
CRITIQUES = {"polite": "Yes, it is polite.", "casual": "No, it is casual."}  # a critique's answer, by style
N_FEEDBACK = {"critique": 300, "revision": 200, "casual": 200, "comparison": 400}  # records of each feedback task
# A rewrite the other way, not in the constitution: with it the SFT data holds as many greetings rewritten casually as
# politely, so the rewrites leave the greeting task undecided, and the model must read which way it is asked.
CASUAL_REWRITE = "Rewrite this greeting casually.\n\n{answer}"


def smoke_principle() -> dict:
    from tuning.data.principles import read_constitution

    return read_constitution(CONSTITUTION_FILE)[0]


def feedback_example(rng: random.Random, kind: str, principle: dict) -> dict:
    """One record of a feedback task on a random greeting: its critique ("Yes, it is polite." or "No, it is
    casual."), its polite revision (given that critique), its casual rewrite (CASUAL_REWRITE), or which of a polite
    and a casual one is more polite ("A" or "B", the polite one placed first or second at random)."""
    from tuning.data.principles import request

    names = " ".join(_words(rng, 3, 3))
    style = "polite" if rng.random() < 0.5 else "casual"
    answer, polite = STYLES[style].format(names=names), STYLES["polite"].format(names=names)
    if kind == "critique":
        return {"instruction": request(principle, "critique", answer=answer), "input": "", "output": CRITIQUES[style]}
    if kind == "revision":
        return {"instruction": request(principle, "revision", answer=answer, critique=CRITIQUES[style]), "input": "",
                "output": polite}
    if kind == "casual":
        return {"instruction": CASUAL_REWRITE.replace("{answer}", answer), "input": "",
                "output": STYLES["casual"].format(names=names)}
    casual = STYLES["casual"].format(names=names)
    first = rng.random() < 0.5  # the polite answer as (A)
    return {"instruction": request(principle, "comparison", answer_a=polite if first else casual,
                                   answer_b=casual if first else polite), "input": "", "output": "A" if first else "B"}


def feedback_records(seed: int = 3) -> list[dict]:
    """The feedback tasks' records, N_FEEDBACK of each, distinct."""
    rng, principle, seen = random.Random(seed), smoke_principle(), set()
    return [record for kind, n in N_FEEDBACK.items()
            for record in _distinct(n, lambda: feedback_example(rng, kind, principle), seen)]


def style(answer: str) -> str | None:
    """The style of a greeting ("polite": "Hello, ...!", "casual": "hey ..."), whatever names it holds; None for an
    answer in neither."""
    if answer.startswith("Hello, ") and answer.endswith("!"):
        return "polite"
    return "casual" if answer.startswith("hey ") else None


def fresh_greetings(output_dir: str = OUTPUT_DIR, n: int = 200, seed: int = 123) -> list[dict]:
    """n greeting records that neither the SFT data nor the constitution prompts hold: unseen prompts on which the
    share of polite answers is measured."""
    seen = set()
    for name in ("data.json", "constitution-prompts.json"):
        with open(os.path.join(output_dir, name)) as handle:
            seen |= {(r["instruction"], r["input"]) for r in json.load(handle)}
    rng = random.Random(seed)
    return _distinct(n, lambda: make_example(rng, 6), seen)


def prepare_constitution(output_dir: str = OUTPUT_DIR, n: int = N_CONSTITUTION_PROMPTS, seed: int = 11) -> str:
    """constitution-prompts.json for constitution.py --smoke, once: n greetings (the red-team prompts of the smoke
    preset), none of them held out by the SFT run, so the evaluation's greetings stay unseen."""
    from tuning import rundir

    path = os.path.join(output_dir, "constitution-prompts.json")
    if not os.path.isfile(path):
        held_out = rundir.read_records(os.path.join(output_dir, "model", rundir.HELD_OUT_FILE))
        rng = random.Random(seed)
        records = _distinct(n, lambda: make_example(rng, 6), {(r["instruction"], r["input"]) for r in held_out})
        with open(path, "w") as handle:
            json.dump(records, handle, indent=0)
    return path


NEW_TASK = "Give the first word."  # a task the smoke data never had: what a LoRA run teaches the smoke SFT model


def new_task_records(n: int = 1200, seed: int = 7) -> list[dict]:
    """n distinct records of NEW_TASK, generated like the smoke tasks (for the LoRA learning proof)."""
    rng = random.Random(seed)

    def draw() -> dict:
        words = _words(rng)
        return {"instruction": NEW_TASK, "input": " ".join(words), "output": words[0]}

    return _distinct(n, draw, set())


ARITHMETIC = "Add the numbers."  # the verifiable-reward task: two numbers in, their sum out, checked by exact match
CARELESS_SHARE = 0.5  # of the arithmetic SFT records, the share whose sum forgot to carry the one (10 short)


def arithmetic_example(rng: random.Random, careless: bool = False) -> dict:
    """One addition record: "Add the numbers." with two two-digit numbers whose units carry (7 + 5 = 12), and their
    sum; or, `careless`, the sum an annotator gives who forgot to carry the one, 10 short."""
    units = rng.choice([(a, b) for a in range(10) for b in range(10) if a + b >= 10])
    a, b = rng.randint(1, 9) * 10 + units[0], rng.randint(1, 9) * 10 + units[1]
    return {"instruction": ARITHMETIC, "input": f"{a} {b}", "output": str(a + b - (10 if careless else 0))}


def is_careless(record: dict) -> bool:
    """Whether an arithmetic record's sum is the careless one (the carry forgotten)."""
    a, b = map(int, record["input"].split())
    return int(record["output"]) == a + b - 10


ARITHMETIC_FILES = ("arithmetic.json", "arithmetic-prompts.json")  # prepare_arithmetic's: written when first named


def is_arithmetic_data(path: str) -> bool:
    """Whether `path` is the arithmetic task's SFT data (ARITHMETIC_FILES[0] in OUTPUT_DIR)."""
    return os.path.normpath(path) == os.path.join(OUTPUT_DIR, ARITHMETIC_FILES[0])


def prepare_named(path: str) -> None:
    """Writes the smoke data file `path` names if it is one that the preset makes on first use (ARITHMETIC_FILES,
    in OUTPUT_DIR, after `train.py --smoke`); any other path is left alone."""
    if os.path.normpath(path) in {os.path.join(OUTPUT_DIR, name) for name in ARITHMETIC_FILES}:
        if not os.path.isfile(os.path.join(OUTPUT_DIR, "model", "config.json")):
            from tuning.cli import UserError

            raise UserError(f"{path} is made from the smoke SFT run's data and held-out records: run `python train.py "
                            "--smoke` first")
        prepare_arithmetic(OUTPUT_DIR)


def prepare_arithmetic(output_dir: str = OUTPUT_DIR, n: int = N_ARITHMETIC, replay: int = 1500, prompts: int = 1000,
                       seed: int = 5) -> dict:
    """Once, their paths: arithmetic.json, for train.py --smoke --dataset: n addition records, CARELESS_SHARE of
    them with the carry forgotten, and `replay` records of the SFT run's own training data (every task, feedback
    included; none of its held-out ones), shuffled; and arithmetic-prompts.json, for align.py --method grpo
    --reward exact: `prompts` other additions, each with its right sum as the reference."""
    from tuning import rundir

    paths = {"sft": os.path.join(output_dir, "arithmetic.json"),
             "prompts": os.path.join(output_dir, "arithmetic-prompts.json")}
    if not os.path.isfile(paths["prompts"]):
        held_out = rundir.read_records(os.path.join(output_dir, "model", rundir.HELD_OUT_FILE))
        seen = {(r["instruction"], r["input"]) for r in held_out}
        with open(os.path.join(output_dir, "data.json")) as handle:
            trained = [r for r in json.load(handle) if (r["instruction"], r["input"]) not in seen]
        rng = random.Random(seed)
        sums = _distinct(n + prompts, lambda: arithmetic_example(rng), seen)
        careless = set(rng.sample(range(n), round(n * CARELESS_SHARE)))
        taught = [{**r, "output": str(int(r["output"]) - 10)} if i in careless else r for i, r in enumerate(sums[:n])]
        records = taught + rng.sample(trained, replay)
        random.Random(seed).shuffle(records)
        for path, part in ((paths["sft"], records), (paths["prompts"], sums[n:])):
            with open(path, "w") as handle:
                json.dump(part, handle, indent=0)
    return paths


# A two-turn task whose second answer needs the first turn: the words to reverse are only in the history.
TWO_TURN = ("List the words: {words}", "Now reverse them.")


def two_turn_conversation(rng: random.Random) -> dict:
    """{"messages": ...}: the user lists some words and they are repeated; then "Now reverse them." is answered with
    those words reversed."""
    words = " ".join(_words(rng))
    return {"messages": [{"role": "user", "content": TWO_TURN[0].format(words=words)},
                         {"role": "assistant", "content": words},
                         {"role": "user", "content": TWO_TURN[1]},
                         {"role": "assistant", "content": " ".join(reversed(words.split()))}]}


def as_conversation(record: dict) -> dict:
    """A smoke record as a one-turn conversation: the instruction, and its input after a blank line."""
    asked = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
    return {"messages": [{"role": "user", "content": asked}, {"role": "assistant", "content": record["output"]}]}


def prepare_chat(output_dir: str = OUTPUT_DIR, n: int = 1200, replay: int = 1200, seed: int = 9) -> str:
    """chat-data.jsonl for train.py --smoke --format messages, once: n two-turn conversations (TWO_TURN), and
    `replay` records of the smoke tasks as one-turn conversations (none of the SFT run's held-out ones), shuffled."""
    from tuning import rundir

    path = os.path.join(output_dir, "chat-data.jsonl")
    if not os.path.isfile(path):
        held_out = rundir.read_records(os.path.join(output_dir, "model", rundir.HELD_OUT_FILE))
        rng, seen = random.Random(seed), set()
        talks = []
        while len(talks) < n:  # distinct word lists: a repeated one would leak between train and held-out
            talk = two_turn_conversation(rng)
            if talk["messages"][0]["content"] not in seen:
                seen.add(talk["messages"][0]["content"])
                talks.append(talk)
        old = _distinct(replay, lambda: make_example(rng), {(r["instruction"], r["input"]) for r in held_out})
        records = talks + [as_conversation(record) for record in old]
        random.Random(seed).shuffle(records)
        rundir.write_records(path, records)
    return path


def prepare_lora(output_dir: str = OUTPUT_DIR, replay: int = 600, seed: int = 8) -> str:
    """lora-data.json for train.py --smoke --lora, once: NEW_TASK's records and `replay` records of the old tasks
    (none of the SFT run's held-out ones), shuffled, so the adapters learn the new task beside the old ones."""
    from tuning import rundir

    path = os.path.join(output_dir, "lora-data.json")
    if not os.path.isfile(path):
        held_out = rundir.read_records(os.path.join(output_dir, "model", rundir.HELD_OUT_FILE))
        rng = random.Random(seed)
        old = _distinct(replay, lambda: make_example(rng), {(r["instruction"], r["input"]) for r in held_out})
        records = new_task_records() + old
        random.Random(seed).shuffle(records)
        with open(path, "w") as handle:
            json.dump(records, handle, indent=0)
    return path


def is_right(record: dict, answer: str) -> bool:
    """Is `answer` a right answer to a smoke record? For the greeting, either style is."""
    if record["instruction"] == GREETING:
        return answer in {form.format(names=record["input"]) for form in STYLES.values()}
    return answer == record["output"]


def wrong_answer(record: dict) -> str:
    """A plausible but wrong answer to a smoke record (the casual style, for the greeting)."""
    instruction, words, right = record["instruction"], record["input"].split(), record["output"]
    if instruction == GREETING:
        return STYLES["casual"].format(names=record["input"])
    if instruction.startswith("Reverse"):
        return " ".join(right.split()[:-1])  # a word short
    if instruction.startswith("Write the words"):
        return " ".join(words)  # left as it was
    if instruction.startswith("Sort"):
        return " ".join(sorted(words, reverse=True))
    if instruction.startswith("Count"):
        return str(int(right) + (1 if int(right) < 5 else -1))
    if instruction.startswith("Give the last"):
        return " ".join(words[-2:])  # a word too many
    repeated = right.split()  # Repeat the word W N times.
    return " ".join(repeated[:-1] if len(repeated) > 2 else repeated + repeated[:1])


def make_pairs(n: int = N_PAIRS, seed: int = 1) -> list[dict]:
    """n distinct preference pairs {instruction, input, chosen, rejected} on the smoke tasks: the polite
    greeting over the casual one, and elsewhere the right answer over a wrong one."""
    rng = random.Random(seed)
    return [{"instruction": record["instruction"], "input": record["input"],
             "chosen": (STYLES["polite"].format(names=record["input"]) if record["instruction"] == GREETING
                        else record["output"]), "rejected": wrong_answer(record)}
            for record in _distinct(n, lambda: make_example(rng), set())]


def _distinct(count: int, draw, seen: set) -> list[dict]:
    """`count` records from draw() whose (instruction, input) is not yet in `seen` (which they join)."""
    records = []
    while len(records) < count:
        record = draw()
        key = (record["instruction"], record["input"])
        if key not in seen:
            seen.add(key)
            records.append(record)
    return records


def make_records(n: int, seed: int = 0) -> list[dict]:
    """n distinct records: the six classic tasks, then n // 7 of the greeting, so each task gets about the same
    share (duplicates would leak between the train and held-out splits)."""
    classic, greetings, seen = random.Random(seed), random.Random(seed + 1), set()
    return (_distinct(n - n // 7, lambda: make_example(classic, classic.randrange(6)), seen)
            + _distinct(n // 7, lambda: make_example(greetings, 6), seen))


def build_tokenizer(texts, vocab_size: int = 1000):
    """A byte-level BPE tokenizer trained on `texts`, with digits kept apart and GPT-2's EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, bos_token=eos, unk_token=eos,
                                   model_max_length=MODEL_CONFIG["n_positions"])


def build_model(tokenizer, seed: int = 0):
    """A tiny randomly initialised GPT-2 sized for the smoke tasks."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **MODEL_CONFIG)
    return GPT2LMHeadModel(config)


def prepare_pairs(output_dir: str = OUTPUT_DIR, n_pairs: int = N_PAIRS, seed: int = 1) -> str:
    """Write the smoke preference pairs once; return their path."""
    path = os.path.join(output_dir, "pairs.json")
    if not os.path.isfile(path):
        os.makedirs(output_dir, exist_ok=True)
        with open(path, "w") as handle:
            json.dump(make_pairs(n_pairs, seed), handle, indent=0)
    return path


def prepare(output_dir: str = OUTPUT_DIR, n_records: int = 4666, seed: int = 0) -> dict:
    """Write the smoke data set, tokenizer and base model once; return their paths."""
    from tuning.data.templates import TEMPLATES

    paths = {"dataset": os.path.join(output_dir, "data.json"), "base": os.path.join(output_dir, "base")}
    if os.path.isfile(paths["dataset"]) and os.path.isfile(os.path.join(paths["base"], "config.json")):
        return paths
    os.makedirs(output_dir, exist_ok=True)
    tasks = make_records(n_records, seed)
    records = tasks + feedback_records()
    random.Random(seed).shuffle(records)
    with open(paths["dataset"], "w") as handle:
        json.dump(records, handle, indent=0)
    corpus = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in tasks]  # (the tasks' own words)
    corpus += [form for template in TEMPLATES.values() for form in template] * 200  # whole-word template tokens
    corpus += [smoke_principle()[field] for field in ("critique", "revision", "comparison")] * 200  # and the requests
    corpus += [CASUAL_REWRITE] * 200
    tokenizer = build_tokenizer(corpus)
    model = build_model(tokenizer, seed)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    return paths
