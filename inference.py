"""Compare the base and the fine-tuned model's answers to the same instruction, side by side.

    python inference.py --prompt "Write a tweet about open-source LLMs."
    python inference.py --prompt "Summarize this." --input "Some text ..." --sample --temperature 0.7
    python inference.py --prompts-file prompts.jsonl --json > answers.jsonl
    python inference.py --smoke          # the tiny model from `python train.py --smoke`, on held-out prompts
    python inference.py --chat           # a conversation in the terminal, each model with its own history
    python inference.py --messages-file chat.jsonl --json   # the next assistant turn of each conversation
    python inference.py --web            # a local web page: type prompts, read the answers side by side (web.py)

Prompts are formatted with the template saved with the fine-tuned model, exactly as in training.
"""

from __future__ import annotations

import json
import os
import sys

from tuning.cli import UserError
from tuning.data.templates import load_template  # noqa: F401  (the saved template; tests and scripts use it from here)

# ---- settings (each has a flag: MAX_NEW_TOKENS -> --max-new-tokens) ----
BASE = "distilgpt2"  # Hub id or local directory of the model before fine-tuning
FINETUNED = "distilgpt2-alpaca"  # directory written by train.py (or any checkpoint-N inside it)
ALIGNED = ""  # optional third model: a directory written by align.py, answered beside the other two
PROMPT = "Give three tips for staying healthy."  # the instruction to answer
INPUT = ""  # optional input / context for the instruction
PROMPTS_FILE = ""  # many prompts: .json/.jsonl Alpaca records or a .txt file with one instruction per line
MESSAGES_FILE = ""  # conversations to answer: a .json conversation (a list of turns), or a .jsonl of them
CHAT = False  # a conversation in the terminal: each model answers with its own history; /reset starts over
TEMPLATE = "auto"  # auto|seed|alpaca: auto = the template saved with the fine-tuned model
ONLY = "both"  # both|base|finetuned: which model(s) to run
MAX_NEW_TOKENS = 128  # most tokens generated per answer; >= 1
SAMPLE = False  # sample instead of greedy decoding
TEMPERATURE = 0.7  # sampling temperature (with --sample); > 0
TOP_P = 0.9  # nucleus sampling: keep the smallest set of tokens with this much probability; in (0, 1]
TOP_K = 50  # sample only among the K likeliest tokens; 0 = no limit
REPETITION_PENALTY = 1.0  # > 1 discourages repeating tokens; 1 = off
NO_REPEAT_NGRAM_SIZE = 0  # forbid repeating any n-gram of this size; 0 = off
SEED = 42  # seed set before each model generates, so both get the same random draws
BATCH_SIZE = 16  # prompts generated together (left-padded) with --prompts-file; >= 1
JSON = False  # print one JSON object per prompt instead of the side-by-side view
DEVICE = "auto"  # auto|cuda|mps|cpu
SMOKE = False  # use smoke-run/ from `python train.py --smoke` and its held-out prompts
WEB = False  # serve a web page that compares the models side by side (Gradio) instead of printing answers
HOST = "127.0.0.1"  # --web: the address to serve on (0.0.0.0 = every network interface)
PORT = 0  # --web: the port to serve on; 0 = a free one (printed)


def smoke_prompts() -> list[dict]:
    """The held-out validation records of the smoke run, rebuilt from its run_config.json."""
    from tuning import smoke
    from tuning.data.records import held_out_records

    model_dir = os.path.join(smoke.OUTPUT_DIR, "model")
    if not os.path.isfile(os.path.join(model_dir, "run_config.json")):
        raise UserError("no smoke run found. Run `python train.py --smoke` first.")
    return held_out_records(model_dir)[0]


def print_side_by_side(record: dict, answers: dict, names: dict) -> None:
    print("=" * 78)
    print(f"Instruction: {record['instruction']}")
    if record.get("input"):
        print(f"Input:       {record['input']}")
    print_answers(answers, names, record.get("output") or None)


def print_conversation(item: dict, answers: dict, names: dict) -> None:
    print("=" * 78)
    for turn in item["messages"]:
        print(f"{turn['role']}: {turn['content']}")
    print_answers(answers, names, item.get("reference"))


def print_answers(answers: dict, names: dict, reference: str | None) -> None:
    """Each model's answer under its name, with its length and whether it stopped at EOS; then the reference."""
    for role, answer in answers.items():
        note = "" if answer["stopped_at_eos"] else "  [no EOS: cut at --max-new-tokens]"
        count = answer["new_tokens"]
        print(f"\n--- {role} ({names[role]}), {count} token{'' if count == 1 else 's'}{note}\n{answer['text']}")
    if reference is not None:
        print(f"\n--- reference\n{reference}")


def chat(models: dict, names: dict, chat_template: str, gen_kwargs: dict, seed: int) -> None:
    """--chat: a conversation in the terminal. Each model keeps its own history (its own answers), and
    answers streamed, one after the other; /reset starts over, /quit or Ctrl-D ends."""
    from transformers import TextStreamer

    from tuning.generation.chat import add_user_turn
    from tuning.generation.generate import generate

    histories = {role: [] for role in models}
    print("Chat with " + ", ".join(f"{role} ({names[role]})" for role in models)
          + ". /reset starts over; /quit or Ctrl-D ends.")
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
            print()
            return
        if not sys.stdin.isatty():  # typed by a pipe: shown, so the transcript reads as a conversation
            print(line)
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            histories = {role: [] for role in models}
            print("(every history cleared)")
            continue
        if not line.strip():
            continue
        for role, (lm, tokenizer) in models.items():
            history = histories[role]
            dropped = add_user_turn(history, line, lm, tokenizer, chat_template, gen_kwargs["max_new_tokens"])
            if dropped is None:
                print(f"--- {role}: the message alone is longer than the model's context; not sent")
                continue
            trimmed = f" (oldest {dropped} turns dropped to fit)" if dropped else ""
            print(f"--- {role} ({names[role]}){trimmed}", flush=True)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            [answer] = generate(lm, tokenizer, [history], gen_kwargs, seed, 1, streamer, chat_template=chat_template)
            if not answer["stopped_at_eos"]:
                print("  [no EOS: cut at --max-new-tokens]")
            history.append({"role": "assistant", "content": answer["text"]})


def validate_args(args) -> None:
    from tuning.cli import check_all
    from tuning.generation.generate import decoding_problems

    problems = decoding_problems(args)
    if args.batch_size < 1:
        problems.append(f"--batch-size must be >= 1 (got {args.batch_size})")
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in [0, 65535] (got {args.port})")
    check_all(problems)


def check_sampling_flags(args, explicit: set) -> None:
    """Sampling settings without --sample would be silently ignored by greedy decoding: refuse them."""
    unused = [f"--{name.replace('_', '-')}" for name in ("temperature", "top_p", "top_k") if name in explicit]
    if unused and not args.sample:
        verb = "applies" if len(unused) == 1 else "apply"
        raise UserError(f"{', '.join(unused)} only {verb} when sampling; add --sample (greedy decoding ignores "
                        f"{'it' if len(unused) == 1 else 'them'})")


def check_web_flags(args, explicit: set) -> None:
    """--host/--port only serve the page; the page takes its prompts from the browser, not from flags."""
    given = [f"--{name.replace('_', '-')}" for name in (("prompt", "input", "prompts_file", "json") if args.web
                                                         else ("host", "port")) if name in explicit]
    if given:
        why = "not used with --web (type prompts on the page)" if args.web else "only with --web"
        raise UserError(f"{', '.join(given)}: {why}")
    sources = [f"--{name.replace('_', '-')}" for name in ("prompt", "prompts_file", "messages_file", "chat", "web")
               if name in explicit and getattr(args, name)]
    if len(sources) > 1:
        raise UserError(f"{' and '.join(sources)}: give one of them (each is a different way to ask)")
    if args.chat and args.json:
        raise UserError("--json: not with --chat (a conversation in the terminal); use --messages-file for JSON")


def main(args, explicit: set) -> None:
    from tuning import smoke
    from tuning.data.records import read_prompts
    from tuning.data.chat_template import prompt_of
    from tuning.generation.chat import conversation_template
    from tuning.generation.generate import generate, generation_kwargs, load_for_generation, require_finetuned
    from tuning.models.devices import get_device
    from tuning.models.loading import offline_unless_hub_reachable
    from tuning.rundir import starting_model

    check_sampling_flags(args, explicit)
    check_web_flags(args, explicit)
    if not args.prompt.strip() and ("prompt" in explicit or not (args.prompts_file or args.messages_file or args.chat
                                                                 or args.smoke or args.web)):
        raise UserError("--prompt is empty; give an instruction or a --prompts-file")
    if args.smoke:
        smoke.use_smoke_models(args, explicit)
    else:
        offline_unless_hub_reachable([args.base if args.only != "finetuned" else "", args.finetuned, args.aligned])
    if args.messages_file:
        from tuning.data.conversations import read_conversations_to_answer

        records = read_conversations_to_answer(args.messages_file)
    elif args.prompts_file:
        records = read_prompts(args.prompts_file)
    elif args.smoke and "prompt" not in explicit:
        records = smoke_prompts()
    else:
        records = [{"instruction": args.prompt, "input": args.input}]
    device = get_device(args.device)
    if "base" not in explicit and not args.smoke and starting_model(args.finetuned):
        args.base = starting_model(args.finetuned)  # the model the fine-tuned run started from
    roles = {"base": args.base, "finetuned": args.finetuned}
    roles = {role: path for role, path in roles.items() if args.only in ("both", role)}
    roles.update({"aligned": args.aligned} if args.aligned else {})
    template = load_template(args.finetuned if os.path.isdir(args.finetuned) else "", args.template)
    if args.web:  # the page reports a model that can't load in its column
        from tuning.generation import web

        return web.serve(args, roles, template, device)
    for role in ("finetuned", "aligned"):
        if role in roles:
            require_finetuned(roles[role], role)
    models = {role: load_for_generation(path, device, role)
              for role, path in roles.items()}
    gen_kwargs = generation_kwargs(args)
    chat_template = conversation_template(models, template)  # (tuning/generation/chat.py)
    if args.chat:
        return chat(models, roles, chat_template, gen_kwargs, args.seed)
    asked = models.get("finetuned", models.get("aligned", next(iter(models.values()))))[1]
    prompts = [r["messages"] if "messages" in r else prompt_of(r, template, chat_template, asked) for r in records]

    answers = {}
    stream = len(records) == 1 and not args.json and not args.prompts_file and not args.messages_file
    if stream:
        from transformers import TextStreamer

        print_side_by_side(records[0], {}, roles)
    for role, (lm, tokenizer) in models.items():
        if stream:
            print(f"\n--- {role} ({roles[role]})", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        answers[role] = generate(lm, tokenizer, prompts, gen_kwargs, args.seed, args.batch_size, streamer,
                                 progress=not stream, chat_template=chat_template)
        if stream and not answers[role][0]["stopped_at_eos"]:
            print("  [no EOS: cut at --max-new-tokens]")
    if stream:
        return
    for i, record in enumerate(records):
        per_prompt = {role: answers[role][i] for role in answers}
        if "messages" in record:  # a conversation: its next assistant turn
            if args.json:
                print(json.dumps({"messages": record["messages"], **per_prompt,
                                  **({"reference": record["reference"]} if record["reference"] is not None else {})}))
            else:
                print_conversation(record, per_prompt, roles)
            continue
        if args.json:
            print(json.dumps({"instruction": record["instruction"], "input": record.get("input", ""),
                              **per_prompt, **({"reference": record["output"]} if "output" in record else {})}))
        else:
            print_side_by_side(record, per_prompt, roles)
    if not args.json:
        for role in answers:
            eos = sum(a["stopped_at_eos"] for a in answers[role])
            line = f"{role}: {eos}/{len(records)} answers stopped at EOS"
            references = [r.get("output", r.get("reference")) for r in records]
            if all(reference is not None for reference in references):
                exact = sum(a["text"] == ref.strip() for a, ref in zip(answers[role], references))
                line += f"; exact match with the reference: {exact}/{len(records)}"
            print(line)


if __name__ == "__main__":
    from tuning import cli

    cli.run(sys.modules[__name__], main, validate_args)
