"""A conversation with several models at once, as `inference.py --chat` and the web page's chat hold it: each
model keeps its own history (its own earlier answers), rendered with one chat template, and a history that
outgrows the model's context loses its oldest exchanges (a system turn stays).

    chat_template = conversation_template(models, template)
    dropped = add_user_turn(history, "Name a color.", lm, tokenizer, chat_template, max_new_tokens=128)
    [answer] = generate(lm, tokenizer, [history], gen_kwargs, chat_template=chat_template)
    history.append({"role": "assistant", "content": answer["text"]})

Generation floor: it imports the data floor and loading, never training code.
"""

from __future__ import annotations


def conversation_template(models: dict, template) -> str:
    """The chat template every model's conversations are rendered with, as --prompt's use the fine-tuned model's
    prompt template: the one saved with the fine-tuned (else aligned, else base) model, else ours. (A --prompt
    is rendered with it too where it is a tokenizer's own: chat_template.prompt_of.) `models` maps a role to
    (model, tokenizer)."""
    from tuning.data.chat_template import saved_or_ours

    tokenizers = [models[role][1] for role in ("finetuned", "aligned", "base") if role in models]
    return saved_or_ours(next((t for t in tokenizers if getattr(t, "chat_template", None)), tokenizers[0]), template)


def fit_history(history: list[dict], tokenizer, chat: str, room: int) -> bool:
    """Drops the oldest user/assistant exchanges (a system turn stays) until the next prompt fits in `room`
    tokens; False when even the last message alone does not fit."""
    from tuning.data.chat_template import chat_prompt_ids

    first = 1 if history and history[0]["role"] == "system" else 0
    while len(chat_prompt_ids(tokenizer, history, chat)) > room:
        if len(history) - first <= 2:  # the last message, and no whole exchange before it
            return False
        del history[first:first + 2]
    return True


def add_user_turn(history: list[dict], message: str, lm, tokenizer, chat: str, max_new_tokens: int) -> int | None:
    """Appends the user's `message` to a model's history, then drops its oldest exchanges until the prompt leaves
    room for `max_new_tokens` in the model's context: the number of turns dropped, or None (the history left as it
    was) when the message alone does not fit."""
    from tuning.models.loading import context_limit

    trial = history + [{"role": "user", "content": message}]  # trimmed apart: a message that can't fit costs nothing
    if not fit_history(trial, tokenizer, chat, (context_limit(lm.config) or 10 ** 9) - max_new_tokens):
        return None
    dropped = len(history) + 1 - len(trial)
    history[:] = trial
    return dropped
