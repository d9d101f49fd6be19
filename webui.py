"""The web page of `python inference.py --web`: one instruction, each model's answer side by side.

    python inference.py --web                          # base and fine-tuned, on http://127.0.0.1:<free port>
    python inference.py --web --aligned distilgpt2-alpaca-aligned --port 7860 --host 0.0.0.0
    python inference.py --web --smoke                  # after `python train.py --smoke`

A Gradio page with the instruction and input boxes, inference.py's decoding settings, a Generate button,
and one column per model (base, fine-tuned, and aligned with --aligned). Each answer streams in as it is
generated, then shows its token count and whether it stopped at EOS; its final text is exactly what
`inference.py --json` prints for the same prompt and settings (the same `inference.generate`). The example
prompts are the fine-tuned run's held-out records. Mistakes reach the page as messages: an empty
instruction, or a model that failed to load (its column says why; the others still answer).

Generation layer: it imports inference.py and the ground floor, never training code.
"""

from __future__ import annotations

import os
import socket
import threading

from cli import UserError

ROLES = {"base": "Base", "finetuned": "Fine-tuned", "aligned": "Aligned"}  # the columns, in order
MAX_EXAMPLES = 8  # example prompts on the page, from the held-out split
# Where each setting is capped on the page (inference.py's flags set the starting values).
LIMITS = {"max_new_tokens": 1024, "temperature": 2.0, "top_k": 200, "repetition_penalty": 2.0}


def free_port(host: str) -> int:
    """A port on `host` that nothing listens on now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def load_models(paths: dict, device) -> tuple[dict, dict]:
    """({role: (model, tokenizer)}, {role: why it failed}): a model that can't load leaves its column with
    the reason instead of stopping the page."""
    from inference import load_for_generation

    models, errors = {}, {}
    for role, path in paths.items():
        try:
            models[role] = load_for_generation(path, device, role)
        except UserError as error:
            errors[role] = str(error)
    return models, errors


def example_records(finetuned: str) -> list[dict]:
    """Up to MAX_EXAMPLES held-out records of the run that `finetuned` came from (its run_config.json, or
    its SFT model's for an align.py run); none when it names no split."""
    from datasetup import held_out_records

    try:
        records, _ = held_out_records(finetuned)
    except (UserError, OSError, KeyError, ValueError):
        return []
    return records[:MAX_EXAMPLES]


def settings(sample: bool, temperature: float, top_p: float, top_k, max_new_tokens, repetition_penalty) -> dict:
    """The page's decoding settings as inference.py's generate kwargs (generation_kwargs, same rules)."""
    from types import SimpleNamespace

    from inference import generation_kwargs, validate_args

    args = SimpleNamespace(max_new_tokens=int(max_new_tokens or 0), sample=bool(sample), temperature=float(temperature),
                           top_p=float(top_p), top_k=int(top_k or 0), repetition_penalty=float(repetition_penalty),
                           no_repeat_ngram_size=0, batch_size=1, prompt="x", prompts_file="", smoke=False)
    try:
        validate_args(args)  # the flags' own checks, so the page refuses what the command line refuses
    except ValueError as error:
        raise UserError(str(error)) from None
    return generation_kwargs(args)


def stream_answer(lm, tokenizer, prompt: str, gen_kwargs: dict, seed: int):
    """Yields the answer text so far while it is generated, then the answer as inference.generate returns it
    ({text, new_tokens, stopped_at_eos})."""
    from transformers import TextIteratorStreamer

    from inference import generate

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    result: dict = {}

    def run():
        try:
            result["answer"] = generate(lm, tokenizer, [prompt], gen_kwargs, seed, 1, streamer)[0]
        except Exception as error:  # reported on the page, and the streamer released so the page never hangs
            result["error"] = error
            streamer.on_finalized_text("", stream_end=True)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    text = ""
    for chunk in streamer:
        text += chunk
        yield text
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

    from templates import format_prompt

    if not instruction.strip():
        raise gr.Error("The instruction is empty: type one (the input is optional).", duration=8)
    try:
        gen_kwargs = settings(**decoding)
    except UserError as error:
        raise gr.Error(str(error), duration=8) from None
    prompt = format_prompt({"instruction": instruction, "input": input_text}, template)
    shown = {role: ["", f"Could not load this model: {errors[role]}" if role in errors else "waiting ..."]
             for role in roles}
    yield [value for role in roles for value in shown[role]]
    for role in roles:
        if role not in models:
            continue
        shown[role][1] = "generating ..."
        try:
            for part in stream_answer(*models[role], prompt, gen_kwargs, int(seed or 0)):
                if isinstance(part, dict):
                    shown[role] = [part["text"], describe(part)]
                else:
                    shown[role][0] = part
                yield [value for role in roles for value in shown[role]]
        except Exception as error:  # a generation failure (out of memory, a bad setting) stays in its column
            shown[role][1] = f"Generation failed: {type(error).__name__}: {error}"
            yield [value for role in roles for value in shown[role]]


def build_page(models: dict, errors: dict, names: dict, template, examples: list[dict], defaults):
    """The Gradio Blocks page; `defaults` are inference.py's parsed flags (the settings' starting values)."""
    import gradio as gr

    from templates import TEMPLATES

    roles, template_name = list(names), next((n for n, t in TEMPLATES.items() if t == template), "saved")
    with gr.Blocks(title="distilgpt2-alpaca: compare the models", analytics_enabled=False) as page:
        gr.Markdown("## Compare the models\nThe same instruction, formatted with the fine-tuned model's template "
                    f"(`{template_name}`), answered by each model.")
        with gr.Row():
            with gr.Column(scale=3):
                instruction = gr.Textbox(label="Instruction", lines=2, elem_id="instruction",
                                         placeholder="Give three tips for staying healthy.")
                input_box = gr.Textbox(label="Input (optional)", lines=2, elem_id="input")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                sample = gr.Checkbox(label="Sample (off: greedy decoding)", value=defaults.sample, elem_id="sample")
                temperature = gr.Slider(0.05, LIMITS["temperature"], value=defaults.temperature, step=0.05,
                                        label="Temperature")
                top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
                top_k = gr.Slider(0, LIMITS["top_k"], value=defaults.top_k, step=1, label="Top-k (0: no limit)")
                max_new_tokens = gr.Slider(1, LIMITS["max_new_tokens"], value=defaults.max_new_tokens, step=1,
                                           label="Max new tokens", elem_id="max-new-tokens")
                penalty = gr.Slider(0.5, LIMITS["repetition_penalty"], value=defaults.repetition_penalty, step=0.05,
                                    label="Repetition penalty (1: off)")
                seed = gr.Number(value=defaults.seed, precision=0, label="Seed")
        outputs = []
        with gr.Row():
            for role in roles:
                with gr.Column():
                    outputs.append(gr.Textbox(label=f"{ROLES[role]}: {names[role]}", lines=8, interactive=False,
                                              elem_id=f"answer-{role}"))
                    outputs.append(gr.Markdown(f"Could not load this model: {errors[role]}" if role in errors
                                               else "", elem_id=f"status-{role}"))
        if examples:
            gr.Examples([[r["instruction"], r.get("input", "")] for r in examples], [instruction, input_box],
                        label="Held-out prompts (click one)")

        def run(instruction_text, input_text, sample_on, temp, p, k, tokens, rep, seed_value):
            yield from compare(models, errors, roles, template, instruction_text, input_text, seed_value,
                               sample=sample_on, temperature=temp, top_p=p, top_k=k, max_new_tokens=tokens,
                               repetition_penalty=rep)

        inputs = [instruction, input_box, sample, temperature, top_p, top_k, max_new_tokens, penalty, seed]
        button.click(run, inputs, outputs, concurrency_limit=1)  # one generation at a time: they share the models
    return page


def serve(args, paths: dict, template, device) -> None:
    """Loads the models, builds the page and serves it until Ctrl-C, printing its address."""
    models, errors = load_models(paths, device)
    for role, why in errors.items():
        print(f"{ROLES[role]} model not loaded (its column says why): {why}", flush=True)
    page = build_page(models, errors, paths, template, example_records(paths.get("finetuned", "")), args)
    port = args.port or free_port(args.host)
    print(f"Serving the comparison page on http://{args.host}:{port}/ (Ctrl-C stops it)", flush=True)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    page.queue().launch(server_name=args.host, server_port=port, share=False, inbrowser=False, quiet=True,
                        show_error=True)
