"""The web page of `python inference.py --web`: each model's answers side by side, to one instruction or in a chat.

    python inference.py --web                          # base and fine-tuned, on http://127.0.0.1:<free port>
    python inference.py --web --aligned distilgpt2-alpaca-aligned --port 7860 --host 0.0.0.0
    python inference.py --web --smoke                  # after `python train.py --smoke`

A Gradio page with inference.py's decoding settings and two tabs, each with one column per model (base,
fine-tuned, and aligned with --aligned):
- Compare: the instruction and input boxes and a Generate button. Each answer streams in as it is
  generated, then shows its token count and whether it stopped at EOS; its final text is exactly what
  `inference.py --json` prints for the same prompt and settings (the same `generate.generate`). The example
  prompts are the fine-tuned run's held-out records.
- Chat: a message box, Send and Reset. Each model keeps its own history, as in `inference.py --chat`
  (generation/chat.py), and each turn streams in, one model after the other.
Mistakes reach the page as messages: an empty instruction or message, or a model that failed to load (its
column says why; the others still answer).

Generation floor, above generate.py: it imports generation and the floors below, never training code.
"""

from __future__ import annotations

import os
import socket
import threading

from tuning.cli import UserError

ROLES = {"base": "Base", "finetuned": "Fine-tuned", "aligned": "Aligned"}  # the columns, in order
MAX_EXAMPLES = 10  # example prompts on the page, from the held-out split (one of each smoke task)
# Each setting's range on the page, widened to take inference.py's flag values, which set where they start.
RANGES = {"temperature": (0.05, 2.0), "top_p": (0.05, 1.0), "top_k": (0, 200), "max_new_tokens": (1, 1024),
          "repetition_penalty": (0.5, 2.0), "no_repeat_ngram_size": (0, 10)}


# A model's name stays on one line (cut with an ellipsis), so the columns' answer boxes and status lines align.
PAGE_CSS = ".model-name p { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; margin: 0; }"


def free_port(host: str) -> int:
    """A port on `host` that nothing listens on now."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
            return probe.getsockname()[1]
    except OSError as error:
        raise UserError(f"--host {host}: can't serve on that address ({error})") from None


def load_models(paths: dict, device) -> tuple[dict, dict]:
    """({role: (model, tokenizer)}, {role: why it failed}): a model that can't load leaves its column with
    the reason instead of stopping the page."""
    from tuning.generation.generate import load_for_generation

    models, errors = {}, {}
    for role, path in paths.items():
        try:
            models[role] = load_for_generation(path, device, role)
        except UserError as error:
            errors[role] = str(error)
    return models, errors


def example_records(finetuned: str) -> list[dict]:
    """Up to MAX_EXAMPLES held-out records of the run that `finetuned` came from (its run_config.json, or
    its SFT model's for an align.py run), as many kinds of instruction as there are (kinds told apart by their
    first two words) before a second of any kind; none when the run names no split."""
    from tuning.data.records import held_out_records

    try:
        records, _ = held_out_records(finetuned)
    except (UserError, OSError, KeyError, ValueError):
        return []
    records = [record for record in records if "instruction" in record]  # (the page asks single-turn questions)
    kind = lambda record: " ".join(record["instruction"].split()[:2])  # noqa: E731
    firsts = list({kind(record): record for record in reversed(records)}.values())[::-1]
    return (firsts + [record for record in records if record not in firsts])[:MAX_EXAMPLES]


def settings(sample: bool, temperature: float, top_p: float, top_k, max_new_tokens, repetition_penalty,
             no_repeat_ngram_size=0) -> dict:
    """The page's decoding settings as inference.py's generate kwargs (generation_kwargs, same rules)."""
    from types import SimpleNamespace

    from tuning.cli import check_all
    from tuning.generation.generate import decoding_problems, generation_kwargs

    args = SimpleNamespace(max_new_tokens=int(max_new_tokens or 0), sample=bool(sample), temperature=float(temperature),
                           top_p=float(top_p), top_k=int(top_k or 0), repetition_penalty=float(repetition_penalty),
                           no_repeat_ngram_size=int(no_repeat_ngram_size or 0))
    try:
        check_all(decoding_problems(args))  # the flags' own checks, so the page refuses what the command line refuses
    except ValueError as error:
        raise UserError(str(error)) from None
    return generation_kwargs(args)


def stream_answer(lm, tokenizer, prompt, gen_kwargs: dict, seed: int, chat_template: str | None = None):
    """Yields the answer text so far while it is generated, then the answer as generate.generate returns it
    ({text, new_tokens, stopped_at_eos}). Closed early (the page was closed), it stops the generation. A prompt
    may be a conversation, rendered with `chat_template` (chat_template.prompt_of)."""
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    from tuning.generation.generate import generate

    streamer, closed, result = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), \
        threading.Event(), {}

    class Closed(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return closed.is_set()

    def run():
        try:
            stop = {"stopping_criteria": StoppingCriteriaList([Closed()])}
            result["answer"] = generate(lm, tokenizer, [prompt], {**gen_kwargs, **stop}, seed, 1, streamer,
                                        chat_template=chat_template)[0]
        except Exception as error:  # reported on the page, and the streamer released so the page never hangs
            result["error"] = error
            streamer.on_finalized_text("", stream_end=True)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        text = ""
        for chunk in streamer:
            text += chunk
            yield text
    finally:  # also when the page goes away mid-answer: the next generation must not run beside this one
        closed.set()
        worker.join()
    if "error" in result:
        raise result["error"]
    yield result["answer"]


def describe(answer: dict) -> str:
    ending = "stopped at EOS" if answer["stopped_at_eos"] else "no EOS: cut at max new tokens"
    return f"{answer['new_tokens']} token{'' if answer['new_tokens'] == 1 else 's'}, {ending}"


def compare(models: dict, errors: dict, roles: list, template, instruction: str, input_text: str, seed, **decoding):
    """The Generate button: yields every column's (answer, status) pair, as each answer streams in."""
    import gradio as gr

    from tuning.data.chat_template import prompt_of

    problem = "" if instruction.strip() else "The instruction is empty: type one (the input is optional)."
    try:
        gen_kwargs = settings(**decoding)
    except UserError as error:
        problem = problem or str(error)
    if problem:  # one message, and the columns keep what they show (an error would also mark each of them red)
        gr.Warning(problem, duration=8)
        yield [gr.skip()] * (2 * len(roles))
        return
    asked = (models.get("finetuned") or models.get("aligned") or next(iter(models.values())))[1]
    chat = getattr(asked, "chat_template", None)
    prompt = prompt_of({"instruction": instruction, "input": input_text}, template, chat, asked)
    shown = {role: ["", f"Could not load this model: {errors[role]}" if role in errors else "waiting ..."]
             for role in roles}
    yield [value for role in roles for value in shown[role]]
    for role in roles:
        if role not in models:
            continue
        shown[role][1] = "generating ..."
        try:
            for part in stream_answer(*models[role], prompt, gen_kwargs, int(seed or 0), chat):
                if isinstance(part, dict):
                    shown[role] = [part["text"], describe(part)]
                else:
                    shown[role][0] = part
                yield [value for role in roles for value in shown[role]]
        except Exception as error:  # a generation failure (out of memory, a bad setting) stays in its column
            shown[role][1] = f"Generation failed: {type(error).__name__}: {error}"
            yield [value for role in roles for value in shown[role]]


def chat_turn(models: dict, errors: dict, roles: list, chat_template: str, message: str, histories: dict, seed,
              **decoding):
    """The Send button: `message` joins every model's history ({role: turns}, each model's own), and each model's
    answer streams into its chat, one model after the other. Yields [each role's chat, each role's status, the
    histories, the message box] as the answers grow; a history that outgrows its model's context loses its
    oldest exchanges, and the status says so."""
    import gradio as gr

    from tuning.generation.chat import add_user_turn

    problem = "" if message.strip() else "The message is empty: type one."
    try:
        gen_kwargs = settings(**decoding)
    except UserError as error:
        problem = problem or str(error)
    if problem:
        gr.Warning(problem, duration=8)
        yield [gr.skip()] * (2 * len(roles) + 2)
        return
    histories = {role: list(histories.get(role, [])) for role in roles}
    status = {role: f"Could not load this model: {errors[role]}" if role in errors else "waiting ..." for role in roles}
    shown = {role: list(histories[role]) for role in roles}

    def state(box=""):
        return [shown[role] for role in roles] + [status[role] for role in roles] + [histories, box]

    for role in roles:
        if role in models:
            shown[role] = shown[role] + [{"role": "user", "content": message}]
    yield state()
    for role in roles:
        if role not in models:
            continue
        lm, tokenizer = models[role]
        history = histories[role]
        dropped = add_user_turn(history, message, lm, tokenizer, chat_template, gen_kwargs["max_new_tokens"])
        if dropped is None:
            status[role] = "The message alone is longer than this model's context: not sent."
            shown[role] = list(history)
            yield state()
            continue
        note = f"; the oldest {dropped} turns were dropped to fit the context" if dropped else ""
        status[role] = "generating ..."
        try:
            for part in stream_answer(lm, tokenizer, history, gen_kwargs, int(seed or 0), chat_template):
                text = part["text"] if isinstance(part, dict) else part
                shown[role] = history + [{"role": "assistant", "content": text}]
                if isinstance(part, dict):
                    history.append({"role": "assistant", "content": part["text"]})
                    status[role] = describe(part) + note
                yield state()
        except Exception as error:  # a generation failure stays in its column; the message is taken back
            history.pop()
            status[role] = f"Generation failed: {type(error).__name__}: {error}"
            yield state()


def build_page(models: dict, errors: dict, names: dict, template, examples: list[dict], defaults):
    """The Gradio Blocks page; `defaults` are inference.py's parsed flags (the settings' starting values)."""
    import gradio as gr

    from tuning.data.templates import TEMPLATES
    from tuning.generation.chat import conversation_template

    roles, template_name = list(names), next((n for n, t in TEMPLATES.items() if t == template), "saved")
    chat_template = conversation_template(models, template) if models else None
    loading_error = {role: f"Could not load this model: {errors[role]}" if role in errors else "" for role in roles}
    with gr.Blocks(title="distilgpt2-alpaca: compare the models", analytics_enabled=False) as page:
        gr.Markdown("## Compare the models\nThe same instruction, formatted with the fine-tuned model's template "
                    f"(`{template_name}`), or the same chat, each model with its own history, answered by each model.")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Compare", elem_id="tab-compare"):
                        instruction = gr.Textbox(label="Instruction", lines=2, elem_id="instruction",
                                                 placeholder="Type an instruction, or click a held-out prompt below")
                        input_box = gr.Textbox(label="Input (optional)", lines=2, elem_id="input")
                        button = gr.Button("Generate", variant="primary", elem_id="generate")
                        outputs = []
                        with gr.Row(equal_height=True):
                            for role in roles:
                                with gr.Column(min_width=200):  # alike: a one-line title, a fixed-height box, a status
                                    gr.Markdown(f"**{ROLES[role]}**: `{names[role]}`", elem_classes="model-name")
                                    outputs.append(gr.Textbox(show_label=False, lines=8, max_lines=8,
                                                              interactive=False, elem_id=f"answer-{role}"))
                                    outputs.append(gr.Markdown(loading_error[role], elem_id=f"status-{role}"))
                        if examples:
                            gr.Examples([[r["instruction"], r.get("input", "")] for r in examples],
                                        [instruction, input_box], label="Held-out prompts (click one)")
                    with gr.Tab("Chat", elem_id="tab-chat"):
                        chats, chat_status = [], []
                        with gr.Row(equal_height=True):
                            for role in roles:
                                with gr.Column(min_width=200):
                                    gr.Markdown(f"**{ROLES[role]}**: `{names[role]}`", elem_classes="model-name")
                                    chats.append(gr.Chatbot(show_label=False, height=360, elem_id=f"chat-{role}",
                                                            feedback_options=None, buttons=[]))
                                    chat_status.append(gr.Markdown(loading_error[role],
                                                                   elem_id=f"chat-status-{role}"))
                        message = gr.Textbox(label="Message", lines=1, elem_id="message",
                                             placeholder="Type a message; each model answers with its own history")
                        with gr.Row():
                            send = gr.Button("Send", variant="primary", elem_id="send")
                            reset = gr.Button("Reset", elem_id="reset")
                        histories = gr.State({})
            with gr.Column(scale=2):
                sample = gr.Checkbox(label="Sample (off: greedy decoding)", value=defaults.sample, elem_id="sample")

                def slider(name, step, label, **kwargs):
                    low, high = RANGES[name]
                    value = getattr(defaults, name)
                    return gr.Slider(min(low, value), max(high, value), value=value, step=step, label=label, **kwargs)

                sampling = {"interactive": defaults.sample}  # (greedy decoding ignores these)
                temperature = slider("temperature", 0.05, "Temperature (with Sample)", **sampling)
                top_p = slider("top_p", 0.05, "Top-p (with Sample)", **sampling)
                top_k = slider("top_k", 1, "Top-k (with Sample; 0: no limit)", **sampling)
                max_new_tokens = slider("max_new_tokens", 1, "Max new tokens", elem_id="max-new-tokens")
                penalty = slider("repetition_penalty", 0.05, "Repetition penalty (1: off)")
                no_repeat = slider("no_repeat_ngram_size", 1, "No repeated n-grams of this size (0: off)")
                seed = gr.Number(value=defaults.seed, precision=0, label="Seed")
        sample.change(lambda on: [gr.update(interactive=on)] * 3, sample, [temperature, top_p, top_k])
        decoding = [sample, temperature, top_p, top_k, max_new_tokens, penalty, no_repeat, seed]

        def run(instruction_text, input_text, sample_on, temp, p, k, tokens, rep, ngram, seed_value):
            yield from compare(models, errors, roles, template, instruction_text, input_text, seed_value,
                               sample=sample_on, temperature=temp, top_p=p, top_k=k, max_new_tokens=tokens,
                               repetition_penalty=rep, no_repeat_ngram_size=ngram)

        def talk(text, state, sample_on, temp, p, k, tokens, rep, ngram, seed_value):
            yield from chat_turn(models, errors, roles, chat_template, text, state, seed_value, sample=sample_on,
                                 temperature=temp, top_p=p, top_k=k, max_new_tokens=tokens, repetition_penalty=rep,
                                 no_repeat_ngram_size=ngram)

        # One generation at a time, in either tab: they share the models.
        button.click(run, [instruction, input_box, *decoding], outputs, concurrency_limit=1, concurrency_id="models")
        chat_outputs = [*chats, *chat_status, histories, message]
        turns = [event(talk, [message, histories, *decoding], chat_outputs, concurrency_limit=1,
                       concurrency_id="models") for event in (send.click, message.submit)]
        # Reset, and a chat's own clear button (which forgets that model's history), stop a turn being answered:
        # its next update would bring the histories back.
        reset.click(lambda: [[] for _ in roles] + [loading_error[role] for role in roles] + [{}, ""], None,
                    chat_outputs, cancels=turns)
        for role, chat in zip(roles, chats):
            chat.clear(lambda state, role=role: {**state, role: []}, histories, histories, cancels=turns)
    return page


def serve(args, paths: dict, template, device) -> None:
    """Loads the models, builds the page and serves it until Ctrl-C, printing its address."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise UserError("--web needs Gradio: pip install -r requirements.txt")
    port = args.port or free_port(args.host)
    models, errors = load_models(paths, device)
    if not models:  # a page with nothing to answer: say why at once, instead of serving it
        raise UserError("no model could be loaded, so there is no page to serve: "
                        + "; ".join(f"{ROLES[role].lower()}: {why}" for role, why in errors.items()))
    for role, why in errors.items():
        print(f"{ROLES[role]} model not loaded (its column says why): {why}", flush=True)
    examples = example_records(args.finetuned if os.path.isdir(args.finetuned) else paths.get("aligned", ""))
    page = build_page(models, errors, paths, template, examples, args)
    try:
        page.queue().launch(server_name=args.host, server_port=port, share=False, inbrowser=False, quiet=True,
                            show_error=True, prevent_thread_lock=True, css=PAGE_CSS)
    except OSError as error:
        raise UserError(f"--host {args.host} --port {port}: can't serve there (in use, or not allowed: {error}); "
                        "pick another --port, or leave it out for a free one") from None
    shown = "localhost" if args.host == "0.0.0.0" else f"[{args.host}]" if ":" in args.host else args.host
    print(f"Serving the comparison page on http://{shown}:{port}/ (Ctrl-C stops it)", flush=True)
    page.block_thread()
