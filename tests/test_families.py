"""Every causal-LM family the README lists: packing keeps examples apart or is refused, response-only logits
give the model's own loss and gradients or are refused, and prompts begin with the tokenizer's own BOS."""

import copy

import pytest
import torch

from tuning.data import sft, templates
import families
from tuning.models import loading, response_logits
import train
from tuning.data.collate import SFTCollator
from tuning.models.packing_checks import packed_loss_matches

RECORDS = [{"instruction": "Name a color.", "input": "", "output": "Blue."},
           {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
           {"instruction": "Write a short sentence about the sea.", "input": "", "output": "The sea is wide and deep."},
           {"instruction": "Give the last word.", "input": "cat dog owl", "output": "owl"}]
# What each family is known to do (see tests/families.py for where the facts come from).
PACKING_KEEPS_APART = {"gpt2": True, "llama": True, "qwen2": True, "gemma2": True, "granite": True,
                       "opt": False, "bloom": False}  # OPT's mask ignores position_ids; BLOOM's ALiBi has none
OWN_LOSS_REPRODUCED = {"gpt2": True, "llama": True, "qwen2": True, "opt": True, "bloom": True,
                       "gemma2": False, "granite": False}  # soft-capped / scaled logits


def build(family):
    lm, tok, bos = families.build(family)
    return lm, loading.ready_tokenizer(tok, family), bos


def examples(tokenizer):
    return [sft.tokenize_example(r, tokenizer, "seed", 128) for r in RECORDS]


@pytest.mark.parametrize("family", families.FAMILIES)
def test_template_tokens_begin_with_the_right_bos(family, tmp_path):
    _, tok, expected = families.build(family)
    tok.save_pretrained(tmp_path)
    tok = loading.load_tokenizer(str(tmp_path))  # as train.py and inference.py load it
    ids = templates.encode_prompt(tok, templates.format_prompt(RECORDS[0], "seed"))
    assert ids[:len(expected)] == expected
    if not expected and tok.bos_token_id is not None:
        assert ids[0] != tok.bos_token_id
    assert ids[len(expected):] == tok(templates.format_prompt(RECORDS[0], "seed"), add_special_tokens=False)["input_ids"]
    assert examples(tok)[0]["input_ids"][:len(ids)] == ids  # training tokenizes the prompt the same way


@pytest.mark.parametrize("family", families.FAMILIES)
def test_packing_is_kept_apart_or_refused(family):
    lm, tok, _ = build(family)
    exs = examples(tok)
    same, padded, packed = packed_loss_matches(lm, exs, tok.pad_token_id)
    assert same == PACKING_KEEPS_APART[family], (padded, packed)
    notes = []
    chosen = train.choose_packing(lm, exs, "rows", False, tok.pad_token_id, notes.append)
    assert chosen == ("rows" if same else "none")
    assert bool(notes) != same  # a fallback is always explained
    if not same:
        with pytest.raises(loading.UserError, match="--packing rows: .* use --packing none"):
            train.choose_packing(lm, exs, "rows", True, tok.pad_token_id, print)


@pytest.mark.parametrize("family", families.FAMILIES)
def test_response_only_logits_give_the_models_own_loss_and_gradients(family):
    own, tok, _ = build(family)
    mode = "rows" if PACKING_KEEPS_APART[family] else "none"
    batch = {k: v for k, v in SFTCollator(tok.pad_token_id, mode)(examples(tok)).items() if k != "num_real_tokens"}
    sparse = copy.deepcopy(own)
    enabled = response_logits.enable_response_only_logits(sparse, batch)
    assert enabled == OWN_LOSS_REPRODUCED[family]
    own.train(), sparse.train()
    loss_own, loss_sparse = own(**batch).loss, sparse(**batch).loss
    assert torch.allclose(loss_own, loss_sparse, rtol=1e-5, atol=1e-6)  # enabled or not, the loss is the model's
    loss_own.backward()
    loss_sparse.backward()
    for (name, p_own), p_sparse in zip(own.named_parameters(), sparse.parameters()):
        if p_own.grad is not None:
            assert torch.allclose(p_own.grad, p_sparse.grad, rtol=1e-4, atol=1e-6), name
    if enabled:
        shapes = []
        sparse.get_output_embeddings().register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
        sparse(**batch)
        assert shapes[0][0] == int((batch["labels"][:, 1:] != -100).sum())  # only the positions with a label


def test_configs_that_transform_logits_are_known_without_a_forward():
    """Soft-capping at 30 changes random-weight logits too little to see, so the config decides first."""
    from transformers import GPT2Config, Gemma2Config, GraniteConfig

    assert response_logits.transforms_logits(Gemma2Config(final_logit_softcapping=30.0))
    assert not response_logits.transforms_logits(Gemma2Config(final_logit_softcapping=None))
    assert response_logits.transforms_logits(GraniteConfig(logits_scaling=8.0))
    assert not response_logits.transforms_logits(GraniteConfig(logits_scaling=1.0))
    assert not response_logits.transforms_logits(GPT2Config())


@pytest.mark.parametrize("family", [f for f, same in OWN_LOSS_REPRODUCED.items() if not same])
def test_the_forward_check_alone_catches_transformed_logits(family, monkeypatch):
    monkeypatch.setattr(response_logits, "LOGIT_TRANSFORMS", {})  # as for a family whose config says nothing
    lm, tok, _ = build(family)
    batch = SFTCollator(tok.pad_token_id, "none")(examples(tok))
    assert not response_logits.enable_response_only_logits(lm, batch)
