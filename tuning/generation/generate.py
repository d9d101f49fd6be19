"""Answers from a causal LM, as inference.py, the web page, evaluation.py and RLOO's held-out evaluation all
give them: a model loaded for generation (left padding, its stop ids), the decoding settings, and batched
greedy or sampled generation cut at the first stop token.

    lm, tokenizer = load_for_generation("distilgpt2-alpaca", device, "finetuned")
    answers = generate(lm, tokenizer, prompts, {"max_new_tokens": 128, "do_sample": False})

Generation floor: imports the data and models floors and rundir; never training code, never the web page.
"""

from __future__ import annotations

import sys

from tuning.cli import UserError

SEED = 42  # the default seed set before generating
BATCH_SIZE = 16  # the default prompts generated together


def require_finetuned(path: str, role: str = "finetuned") -> None:
    """A clear message, not a Hub error, when train.py has not produced the fine-tuned model yet."""
    from tuning.models import lora
    from tuning import rundir

    if lora.is_model_dir(path):
        return

    hint = ""
    ckpt = rundir.find_checkpoint(path)
    if ckpt:
        config = rundir.read_run_config(path) or {}
        command = config.get("command") or f"python train.py --output-dir {path}"
        hint = f" Training did not finish: resume it with `{command}`, or pass --{role} {ckpt}."
    if role == "aligned":
        raise UserError(f"--aligned {path}: no aligned model there. Run `python align.py` first.{hint}")
    raise UserError(f"no fine-tuned model in {path!r}. Run `python train.py` first "
                    f"(or `python train.py --smoke`, then `python inference.py --smoke`).{hint}")


def load_for_generation(name_or_path: str, device, role: str):
    """(model, tokenizer) in eval mode, tokenizer padding on the left for batched generation."""
    from transformers import AutoModelForCausalLM

    from tuning.models import lora
    from tuning.models import loading

    if role in ("finetuned", "aligned"):
        require_finetuned(name_or_path, role)
    flag = f"--{role}"
    loading.refuse_reward_model(name_or_path, flag)
    tokenizer = loading.load_tokenizer(name_or_path, flag=flag)
    tokenizer.padding_side = "left"
    try:
        lm = (loading.load_model(name_or_path) if lora.is_adapter_dir(name_or_path)  # base + adapter, merged
              else AutoModelForCausalLM.from_pretrained(name_or_path)).to(device).eval()
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"could not load the {role} model {name_or_path!r} ({type(err).__name__}: {err}). "
                        f"Offline? Pass a local directory with {flag}.") from None
    loading.set_generation_ids(lm, tokenizer)
    # generate() is given the pad id; the config's is read only by a padding check that misfires here: on a
    # batch without padding, transformers drops the all-ones mask, then a finished row's EOS (= pad) looks like
    # padding and a "we strongly recommend passing in an attention_mask" warning is printed for nothing.
    lm.config.pad_token_id = None
    return lm, tokenizer


def decoding_problems(args) -> list[str]:
    """What is wrong with the decoding settings (inference.py's flags, or the page's sliders)."""
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    if args.temperature <= 0:
        problems.append(f"--temperature must be > 0 (got {args.temperature})")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1] (got {args.top_p})")
    if args.top_k < 0 or args.no_repeat_ngram_size < 0:
        problems.append("--top-k and --no-repeat-ngram-size must be >= 0")
    if args.repetition_penalty <= 0:
        problems.append(f"--repetition-penalty must be > 0 (got {args.repetition_penalty})")
    return problems


def generation_kwargs(args) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
    if args.sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = args.repetition_penalty
    if args.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = args.no_repeat_ngram_size
    return kwargs


def generate(lm, tokenizer, prompts: list, gen_kwargs: dict, seed: int = SEED, batch_size: int = BATCH_SIZE,
             streamer=None, progress: bool = False, desc: str = "Generating", raw: bool = False,
             chat_template: str | None = None) -> list[dict]:
    """Answers to formatted prompts: {text, new_tokens, stopped_at_eos}, each cut at the first stop token
    (the tokenizer's EOS, or any other stop id of the model's generation config, as in Llama 3). With `raw`,
    also raw_text: the answer as decoded, unstripped, as a reward model scores it, and token_ids: the ids as
    generated, the stop token included (decoded and encoded again, a text need not give them back). A prompt may
    also be a conversation (a list of {role, content} turns): its next assistant turn is generated, the prompt
    rendered with `chat_template` (else the tokenizer's) as plain transformers renders it."""
    import torch
    from tqdm.auto import tqdm

    from tuning.models.loading import stop_token_ids
    from tuning.data.chat_template import prompt_ids

    stops, pad = stop_token_ids(lm, tokenizer), tokenizer.pad_token_id
    torch.manual_seed(seed)
    answers = []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress or len(prompts) <= batch_size,
               file=sys.stderr)
    for start in range(0, len(prompts), batch_size):
        encoded = [prompt_ids(tokenizer, p, chat_template) for p in prompts[start:start + batch_size]]
        width = max(map(len, encoded))
        # Left padding: every prompt ends at the same column, so generation continues right after it.
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in encoded], device=lm.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in encoded], device=lm.device)
        with torch.no_grad():
            out = lm.generate(input_ids=input_ids, attention_mask=mask, eos_token_id=stops, pad_token_id=pad,
                              streamer=streamer, **gen_kwargs)
        for row in out[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in stops), None)
            stopped = end is not None
            tokens = row[:end] if stopped else row
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            answers.append({"text": text.strip(), "new_tokens": len(tokens), "stopped_at_eos": stopped,
                            **({"raw_text": text, "token_ids": row[:end + 1] if stopped else row} if raw else {})})
        bar.update(len(encoded))
    bar.close()
    return answers
