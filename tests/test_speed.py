"""The speed features must not change what is learnt: response-only logits, isolated packing,
gradient accumulation and evaluation give the same losses as the plain computation."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tuning.models import response_logits
from tuning.data.collate import SFTCollator, pack_bins

VOCAB = 300


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, n_positions=128, use_cache=False,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    return model


def examples(n=6, seed=1):
    """Examples of different lengths whose first tokens (the 'prompt') carry no loss."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + (i * 7) % 17
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        prompt = 2 + i % 4
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "num_real_tokens"}


def test_response_only_logits_equal_plain_loss_and_gradients():
    dense = tiny_gpt2()
    sparse = copy.deepcopy(dense)
    batch = model_inputs(SFTCollator(0, "none")(examples()))
    assert response_logits.enable_response_only_logits(sparse, batch)
    loss_d, loss_s = dense(**batch).loss, sparse(**batch).loss
    assert torch.allclose(loss_d, loss_s, atol=1e-6)
    loss_d.backward()
    loss_s.backward()
    for p_d, p_s in zip(dense.parameters(), sparse.parameters()):
        assert torch.allclose(p_d.grad, p_s.grad, atol=1e-6)


def test_response_only_logits_never_build_full_logits(monkeypatch):
    sparse = tiny_gpt2()
    batch = model_inputs(SFTCollator(0, "none")(examples()))
    response_logits.enable_response_only_logits(sparse, batch)
    shapes = []
    head = sparse.get_output_embeddings()
    head.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape)))
    sparse(**batch)
    n_loss = int((batch["labels"][:, 1:] != -100).sum())
    assert shapes == [(n_loss, VOCAB)]  # one row per position with a label, not batch x length


def test_response_only_logits_under_bf16_autocast_match_plain():
    dense = tiny_gpt2()
    sparse = copy.deepcopy(dense)
    batch = model_inputs(SFTCollator(0, "none")(examples()))
    response_logits.enable_response_only_logits(sparse, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.allclose(dense(**batch).loss, sparse(**batch).loss, atol=1e-2)


def test_gradient_accumulation_equals_larger_batch():
    """Two micro-batches with the Trainer's num_items_in_batch give the big batch's loss and gradients."""
    big, accum = tiny_gpt2(), tiny_gpt2()
    exs = examples(8)
    collate = SFTCollator(0, "none")
    for m in (big, accum):
        assert response_logits.enable_response_only_logits(m, model_inputs(collate(exs)))
    full = model_inputs(collate(exs))
    big(**full).loss.backward()
    halves = [model_inputs(collate(exs[:4])), model_inputs(collate(exs[4:]))]
    items = sum(int((h["labels"][:, 1:] != -100).sum()) for h in halves)
    total = 0.0
    for half in halves:
        loss = accum(**half, num_items_in_batch=items).loss
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(big(**full).loss.item(), abs=1e-5)
    for p_b, p_a in zip(big.parameters(), accum.parameters()):
        assert torch.allclose(p_b.grad, p_a.grad, atol=1e-5)


@pytest.mark.parametrize("mode", ["rows", "flat"])
def test_each_packed_example_loss_equals_its_unpacked_loss(mode):
    model = tiny_gpt2()
    exs = examples(7)
    packed = model_inputs(SFTCollator(0, mode)(exs))
    assert packed["input_ids"].shape[0] < len(exs) and "attention_mask" not in packed
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
    rows, starts = _locate(packed, exs)
    for ex, row, start in zip(exs, rows, starts):
        n = len(ex["input_ids"])
        alone = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            expected = model(input_ids=alone, labels=torch.tensor([ex["labels"]])).loss
        got = torch.nn.functional.cross_entropy(logits[row, start:start + n - 1],
                                                torch.tensor(ex["labels"][1:]), ignore_index=-100)
        assert torch.allclose(expected, got, atol=1e-5)


def test_packing_without_isolation_would_differ():
    """Control: the same packed rows with a plain causal mask (no position_ids) give other losses."""
    model = tiny_gpt2()
    exs = examples(7)
    packed = model_inputs(SFTCollator(0, "rows")(exs))
    with torch.no_grad():
        isolated = model(**packed).loss
        leaky = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss
    assert not torch.allclose(isolated, leaky, atol=1e-4)


def _locate(packed, exs):
    rows, starts = [], []
    ids, pos = packed["input_ids"].tolist(), packed["position_ids"].tolist()
    used = set()
    for ex in exs:
        n = len(ex["input_ids"])
        for r, row in enumerate(ids):
            found = next((s for s in range(len(row) - n + 1) if pos[r][s] == 0 and (r, s) not in used
                          and row[s:s + n] == ex["input_ids"]), None)
            if found is not None:
                used.add((r, found))
                rows.append(r)
                starts.append(found)
                break
    assert len(rows) == len(exs)
    return rows, starts


def test_pack_bins_respects_capacity_and_keeps_every_example():
    lengths = [9, 3, 7, 2, 5, 9, 1]
    bins = pack_bins(lengths, 9)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 9 for b in bins)
    assert len(bins) == 4  # 36 tokens in rows of 9: as tight as it gets


def test_packed_labels_never_cross_examples():
    batch = SFTCollator(0, "rows")([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]},
                                    {"input_ids": [4, 5], "labels": [4, 5]}])
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]


def test_sparse_eval_loss_matches_trainer_standard(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from tuning.runs.trainer import InstructTrainer

    data = Dataset.from_list(examples(10))
    losses = []
    for sparse in (False, True):
        model = tiny_gpt2()
        if sparse:
            assert response_logits.enable_response_only_logits(model, SFTCollator(0, "rows")(examples(4)))
        args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none",
                                 use_cpu=True, remove_unused_columns=False, prediction_loss_only=True)
        trainer = InstructTrainer(model=model, args=args, eval_dataset=data, data_collator=SFTCollator(0, "rows"))
        losses.append(trainer.evaluate()["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
