"""The chat template: how a conversation becomes text, and which of its tokens carry the loss.

    template = chat_template_for(tokenizer, "seed", conversations=True)   # the tokenizer's, else our own
    tokenizer.chat_template = template                                   # saved with the model
    example = tokenize_conversation(messages, tokenizer, 512)            # input_ids, labels (assistant turns)

A tokenizer that brings a chat template (Llama-3, Qwen2.5, SmolLM2 instruct) is trained with it. GPT-2 and
DistilGPT2 bring none, so the project writes its own from the prompt template (templates.py): a single-turn
conversation renders byte for byte as the prompt template renders the same instruction, followed by the
answer and EOS, so a model trained on Alpaca records and one trained on conversations speak alike:

    ### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}<EOS>### Instruction:\\n...

The EOS closes each assistant turn (the end-of-turn token: generation stops there). The assistant's answers
sit inside `{% generation %}` markers, so the trained tokens come from the template itself, through
`apply_chat_template(..., return_assistant_tokens_mask=True)`, never from searching the text. Every run
saves its template in the tokenizer files, so `tokenizer.apply_chat_template(messages,
add_generation_prompt=True)` in plain transformers gives the prompt training used.

Data floor: imports templates.
"""

from __future__ import annotations

import functools
import re

from tuning.data.templates import TEMPLATES, Template, bos_prefix, encode_prompt, format_prompt, template_of

TRAIN_ON = "all_assistant"  # the default: loss on every assistant turn and its end-of-turn token
IGNORE_INDEX = -100  # label of tokens without loss (PyTorch cross-entropy's ignore_index); fixed, so not a flag

USER_MARK = "### Instruction:\n"  # where a user turn starts in our templates
ASSISTANT_MARK = "### Response:\n"  # where an assistant turn starts (the generation prompt)


def template_parts(template: str | Template) -> tuple[str, str, str]:
    """(default system text, user turn before the content, user turn after it) of a prompt template, read from
    its no-input form: "{preamble}### Instruction:\\n{instruction}\\n\\n### Response:\\n"."""
    head, tail = template_of(template).no_input.split("{instruction}")
    if not head.endswith(USER_MARK) or not tail.endswith(ASSISTANT_MARK):
        raise ValueError(f"template {template!r} does not end its prompt with {ASSISTANT_MARK!r}")
    return head[:-len(USER_MARK)], USER_MARK, tail[:-len(ASSISTANT_MARK)]


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def own_chat_template(template: str | Template = "seed", tokenizer=None) -> str:
    """Our Jinja chat template for a prompt template: a system turn (else the template's preamble, as the
    'alpaca' template's "Below is an instruction ...") and a blank line, then each user turn as an
    instruction, each assistant turn as a response ending in EOS, inside generation markers. For a
    `tokenizer` that puts BOS before a text (Llama, OPT; not GPT-2), the text starts with it, as
    templates.encode_prompt's prompts do."""
    return _own_chat_template(template_of(template), bool(tokenizer is not None and bos_prefix(tokenizer)))


@functools.lru_cache(maxsize=16)
def _own_chat_template(template: Template, bos: bool) -> str:
    preamble, user_head, user_tail = template_parts(template)
    system = ("{{ bos_token }}" if bos else "") + (
        "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}"
        + (f"{{%- else -%}}{{{{ {_jinja_string(preamble)} }}}}" if preamble else "") + "{%- endif -%}")
    return (system
            + "{%- for message in messages -%}"
            + f"{{%- if message['role'] == 'user' -%}}{{{{ {_jinja_string(user_head)} + message['content'] + "
              f"{_jinja_string(user_tail)} }}}}"
            + f"{{%- elif message['role'] == 'assistant' -%}}{{{{ {_jinja_string(ASSISTANT_MARK)} }}}}"
              "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
            + "{%- endif -%}{%- endfor -%}"
            + f"{{%- if add_generation_prompt -%}}{{{{ {_jinja_string(ASSISTANT_MARK)} }}}}{{%- endif -%}}")


def is_ours(chat_template: str | None, tokenizer=None) -> bool:
    """Whether a chat template is one this project writes (for any prompt template), not a tokenizer's own."""
    bos = bool(tokenizer is not None and bos_prefix(tokenizer))
    return any(chat_template == _own_chat_template(template_of(name), bos) for name in TEMPLATES)


def chat_template_for(tokenizer, template: str | Template, conversations: bool) -> str:
    """The chat template a run trains with and saves: for conversations, the tokenizer's own where it brings one
    (Llama-3, Qwen2.5 instruct), else ours for `template` (also when the tokenizer's is ours, from an earlier run
    here: --template decides). Alpaca records are always trained in our format, so ours describes them."""
    own = getattr(tokenizer, "chat_template", None)
    foreign = isinstance(own, str) and own and not is_ours(own, tokenizer)
    return own if conversations and foreign else own_chat_template(template, tokenizer)


def saved_or_ours(tokenizer, template: str | Template) -> str:
    """The chat template a model was saved with, else ours for its prompt template: what its conversations are
    rendered with at inference and evaluation."""
    saved = getattr(tokenizer, "chat_template", None)
    return saved if isinstance(saved, str) and saved else own_chat_template(template, tokenizer)


def prompt_of(record: dict, template: str | Template, chat_template: str | None = None, tokenizer=None):
    """What a model is asked for a single-turn record {instruction, input}: the prompt template's text, or, for a
    model trained with a tokenizer's own chat template, the record as one user turn (generate renders it with
    that template), so a prompt is never in a format the model was not trained on."""
    if chat_template is None or is_ours(chat_template, tokenizer):
        return format_prompt(record, template)
    given = record.get("input") or ""
    return [{"role": "user", "content": record["instruction"] + (f"\n\n{given}" if given.strip() else "")}]


GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # Jinja's {% generation %}, with any trim marks


def has_generation_markers(chat_template: str) -> bool:
    return bool(GENERATION_MARK.search(chat_template))


def tokenize_conversations(conversations: list[list[dict]], tokenizer, chat_template: str, max_length: int,
                           train_on: str = TRAIN_ON, train_on_prompt: bool = False) -> list[dict]:
    """One example per conversation: {input_ids, labels, length, truncated}, the ids of the rendered
    conversation (cut to max_length) and labels that keep the assistant tokens (every turn's, or the last
    turn's with train_on="last_assistant"; every token with train_on_prompt), and `spans`, the [start, end) of
    each assistant turn's trained tokens, for the audit. An example the cut leaves without a trained token comes
    back empty (length 0), for the caller to drop as too long; one that has none uncut is kept, for the audit to
    stop on."""
    out = tokenizer.apply_chat_template(conversations, chat_template=chat_template, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    examples = []
    for ids, mask in zip(out["input_ids"], out["assistant_masks"]):
        ids, mask = list(ids), list(mask)
        if train_on == "last_assistant":
            mask = last_span(mask)
        labels = list(ids) if train_on_prompt else [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
        truncated = len(ids) > max_length
        ids, labels, mask = ids[:max_length], labels[:max_length], mask[:max_length]
        if truncated and all(label == IGNORE_INDEX for label in labels[1:]):
            ids, labels, mask = [], [], []  # (the first label is never predicted: nothing comes before it)
        found = spans(mask)
        examples.append({"input_ids": ids, "labels": labels, "length": len(ids), "truncated": truncated,
                         "prompt_length": found[0][0] if found else len(ids), "spans": found})
    return examples


def spans(mask: list[int]) -> list[list[int]]:
    """[start, end) of each run of 1s in a 0/1 mask."""
    found, start = [], None
    for position, value in enumerate(list(mask) + [0]):
        if value and start is None:
            start = position
        elif not value and start is not None:
            found.append([start, position])
            start = None
    return found


def last_span(mask: list[int]) -> list[int]:
    """The mask with only its last run of 1s kept."""
    found = spans(mask)
    if not found:
        return list(mask)
    start, end = found[-1]
    return [1 if start <= position < end else 0 for position in range(len(mask))]


def chat_prompt_ids(tokenizer, messages: list[dict], chat_template: str | None = None) -> list[int]:
    """The token ids of a conversation's next-assistant-turn prompt, as plain transformers makes them
    (`apply_chat_template(messages, add_generation_prompt=True)`): with `chat_template`, else the tokenizer's."""
    out = tokenizer.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                        tokenize=True, return_dict=True)
    return list(out["input_ids"])


def render_prompts(tokenizer, conversations: list[list[dict]], chat_template: str | None = None) -> list[str]:
    """The next-assistant-turn prompt text of each conversation: tokenized without special tokens, each gives
    chat_prompt_ids (plain transformers renders, then tokenizes so)."""
    if not conversations:
        return []
    return list(tokenizer.apply_chat_template(conversations, chat_template=chat_template, add_generation_prompt=True,
                                              tokenize=False))


PROBE = "Z7q"  # an assistant turn's content that no template changes, for answer_end_ids


def answer_end_ids(tokenizer, chat_template: str | None = None) -> list[int]:
    """The ids a chat template puts after an assistant turn's content: the end-of-turn that closes an answer (ours:
    EOS; ChatML's: <|im_end|> and a newline). Each trained assistant turn ends so, so a preference pair's answers
    and a reward model's scored answers end so too."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}]
    text = tokenizer.apply_chat_template(probe, chat_template=chat_template, tokenize=False)
    if PROBE not in text:
        raise ValueError("the chat template does not render an assistant turn's content")
    return tokenizer(text[text.rindex(PROBE) + len(PROBE):], add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt, chat_template: str | None = None) -> list[int]:
    """The token ids of a prompt: a text as training and inference encode it (templates.encode_prompt), or a
    conversation (a list of turns) as chat_prompt_ids renders its next assistant turn's prompt."""
    if isinstance(prompt, list):
        return chat_prompt_ids(tokenizer, prompt, chat_template)
    return encode_prompt(tokenizer, prompt)


def encode_prompts(tokenizer, prompts: list, chat_template: str | None = None) -> list[list[int]]:
    """prompt_ids of each prompt (texts and conversations, mixed), batched: a text's ids after the BOS that
    encode_prompt adds, a conversation's as the template renders them (with its own BOS, if any)."""
    talks = [position for position, prompt in enumerate(prompts) if isinstance(prompt, list)]
    rendered = dict(zip(talks, render_prompts(tokenizer, [prompts[i] for i in talks], chat_template)))
    texts = [rendered.get(position, prompt) for position, prompt in enumerate(prompts)]
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    bos = bos_prefix(tokenizer)
    return [list(x) if position in rendered else bos + list(x) for position, x in enumerate(ids)]


def encode_answers(tokenizer, conversations: list[list[dict]], answers: list[str], chat_template: str | None = None,
                   prompts: list[list[int]] | None = None) -> list[list[int]]:
    """Each answer's ids as the next assistant turn of its conversation, exactly as SFT tokenizes the dialogue
    that ends with it (tokenize_conversations): the whole dialogue rendered and tokenized, and the ids after the
    prompt's (chat_prompt_ids), the template's end-of-turn included. A tokenizer that marks a word's start
    (SentencePiece's "▁") would give an answer tokenized alone other ids. Where the prompt's ids are not a prefix
    of the dialogue's (a template that renders earlier turns otherwise once answered), the answer is tokenized
    alone and closed by answer_end_ids. `prompts` takes the conversations' encode_prompts ids, where the caller
    has them already."""
    if not conversations:
        return []
    whole = tokenizer.apply_chat_template([talk + [{"role": "assistant", "content": answer}]
                                           for talk, answer in zip(conversations, answers)],
                                          chat_template=chat_template, tokenize=False)
    if prompts is None:
        prompts = tokenizer(render_prompts(tokenizer, conversations, chat_template), add_special_tokens=False,
                            verbose=False)["input_ids"]
    dialogues = tokenizer(list(whole), add_special_tokens=False, verbose=False)["input_ids"]
    out, end = [], None
    for prompt, dialogue, answer in zip(prompts, dialogues, answers):
        if dialogue[:len(prompt)] == prompt:
            out.append(list(dialogue[len(prompt):]))
        else:
            end = answer_end_ids(tokenizer, chat_template) if end is None else end
            out.append(tokenizer(answer, add_special_tokens=False, verbose=False)["input_ids"] + end)
    return out


def answer_tokens(tokenizer, prompt, answer: str, chat_template: str | None = None) -> list[int]:
    """An answer's ids after `prompt`, closed as the prompt's format closes an answer: after a text, tokenized
    apart from it (no merge across the boundary) and EOS; in a conversation, as the next assistant turn
    (encode_answers), ending with the template's end-of-turn."""
    if isinstance(prompt, list):
        return encode_answers(tokenizer, [prompt], [answer], chat_template)[0]
    return tokenizer(answer, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
