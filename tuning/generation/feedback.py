"""AI feedback, as Constitutional AI asks a feedback model for it: critiques and revisions of answers (generated),
and preference labels read from the model's next-token probabilities of the option letters (never parsed from
generated text).

    asked = ask(feedback_tokenizer, texts, template, chat_template)        # each request as the model's prompt
    critiques = generate(feedback_lm, feedback_tokenizer, asked, gen_kwargs)
    probs = option_probabilities(feedback_lm, feedback_tokenizer, asked_comparisons, chat_template, ids)
    # [((pA, pB), the letters' share of the next token)]
    label = soft_label([probs_ab], [probs_ba])      # P(the first answer is better), both orders averaged

A comparison is asked twice, with the answers in both orders, so a model that favours a position (always "A")
gives 0.5, not a confident label.

Generation floor: imports the data and models floors; never training code.
"""

from __future__ import annotations

from tuning.cli import UserError
from tuning.data.principles import OPTIONS

BATCH_SIZE = 16  # the default comparisons scored together


def ask(tokenizer, texts: list[str], template, chat_template: str | None) -> list:
    """Each request text as the feedback model is asked an instruction: in its prompt template, or, for a model
    with a chat template of its own (an instruct model), as one user turn that template renders."""
    from tuning.data.chat_template import prompt_of
    from tuning.data.preferences import foreign

    own = foreign(chat_template, tokenizer) if chat_template else None  # decided once for the set, as for pairs
    return [prompt_of({"instruction": text, "input": ""}, template, own, tokenizer) for text in texts]


def option_ids(tokenizer, prompt, chat_template: str | None, model: str) -> list[int]:
    """The token that starts each option letter's reply after `prompt` (as SFT tokenizes an answer there); a
    UserError naming --feedback-model when two letters start with the same token, so can't be told apart."""
    from tuning.data.chat_template import answer_tokens

    ids = [answer_tokens(tokenizer, prompt, letter, chat_template)[0] for letter in OPTIONS]
    if len(set(ids)) < len(ids):
        raise UserError(f"--feedback-model {model}: its tokenizer starts the replies {' and '.join(OPTIONS)} with the "
                        f"same token ({ids[0]}), so a comparison's answer can't be read from it; use a feedback model "
                        "whose tokenizer has the letters")
    return ids


def option_probabilities(lm, tokenizer, prompts: list, chat_template: str | None, ids: list[int],
                         batch_size: int = BATCH_SIZE) -> list[tuple[tuple[float, ...], float]]:
    """For each comparison prompt, (the feedback model's next-token probabilities of the option tokens `ids`,
    normalised to sum to 1; their sum before normalising, the share of the model's next token the letters hold).
    Rows are left-padded with positions counted from each prompt's first token (GPT-2 would otherwise number them
    from the padding), and the output layer runs at the last position only."""
    import torch

    from tuning.data.chat_template import encode_prompts

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in range(0, len(prompts), batch_size):
        encoded = encode_prompts(tokenizer, prompts[start:start + batch_size], chat_template)
        width = max(map(len, encoded))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in encoded], device=lm.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in encoded], device=lm.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = lm(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False,
                        logits_to_keep=1).logits[:, -1].float()
        chosen = torch.log_softmax(logits, dim=-1)[:, ids]
        out += [(tuple(row), mass) for row, mass in zip(torch.softmax(chosen, dim=-1).tolist(),
                                                        chosen.exp().sum(-1).tolist())]
    return out


def soft_label(first_orders: list[tuple[float, float]], second_orders: list[tuple[float, float]]) -> float:
    """P(the first answer is the better one): the mean, over the principles asked, of the probability of "A" when
    it was shown first and of "B" when the order was swapped."""
    votes = [p[0] for p in first_orders] + [p[1] for p in second_orders]
    return sum(votes) / len(votes)


def orders_agree(first: tuple[float, float], second: tuple[float, float]) -> bool:
    """Whether both orders of one comparison prefer the same answer (position bias makes them disagree)."""
    return (first[0] > 0.5) == (second[1] > 0.5)


def fits(tokenizer, prompts: list, chat_template: str | None, room: int) -> list[bool]:
    """Whether each prompt, as the model's tokens, fits in `room` tokens."""
    from tuning.data.chat_template import encode_prompts

    return [len(ids) <= room for ids in encode_prompts(tokenizer, prompts, chat_template)]
