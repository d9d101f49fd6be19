"""Response-only logits: a training forward that runs the output layer and the loss only where labels are set.

Models floor: imports nothing of this project.
"""

from __future__ import annotations


class _ResponseOnlyLogits:
    """Mixed into a causal LM's class by enable_response_only_logits (see there).

    The forward reads the body and head of the module it is called on, so a replica made by
    nn.DataParallel or torch.nn.parallel.replicate computes with the replica's own weights.
    """

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                num_items_in_batch=None, **kwargs):
        if labels is None or kwargs.get("return_dict") is False:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        import torch.nn.functional as F
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("use_cache", None)
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False, **kwargs).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.get_output_embeddings()(hidden[:, :-1][keep]).float()  # only the positions that carry loss
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1))
        return CausalLMOutputWithPast(loss=loss)


def _response_only_class(cls):
    # Same name and module, so save_pretrained still writes the original architecture into config.json.
    return type(cls.__name__, (_ResponseOnlyLogits, cls), {"__module__": cls.__module__,
                                                           "__qualname__": cls.__qualname__})


def enable_response_only_logits(model, check_batch: dict) -> bool:
    """Make training forward passes compute the output layer and loss only where labels are not -100.

    With the loss on the response only, ~40% of positions carry no loss, and DistilGPT2's 50,257-word
    output layer is half its weights: skipping those positions saves their share of that cost and
    never builds the full batch x length x vocab logits. The loss is the same shifted cross-entropy
    (sum / num_items_in_batch during training, so gradient accumulation stays exact).

    Only models whose own loss it reproduces exactly are changed: `check_batch` (a collated training
    batch) goes through both forwards, and a model whose loss differs (logit scaling or soft-capping as
    in Granite and Gemma 2, an MoE router loss, ...) keeps its own forward. Returns whether it was enabled.
    """
    original = type(model)
    if isinstance(model, _ResponseOnlyLogits):
        return True
    if transforms_logits(model.config):  # known from the config, even where random weights would hide it
        return False
    model.__class__ = _response_only_class(original)  # a class, not an instance attribute: replicas follow it
    if not _same_loss(model, original.forward, check_batch):
        model.__class__ = original
        return False
    return True


# Config settings that change the logits after the output layer, with the value that leaves them alone.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logits_scaling": 1.0, "logit_scale": 1.0,
                    "lm_head_multiplier": 1.0, "output_logits_multiplier": 1.0}


def transforms_logits(config) -> bool:
    """Does the config say the model scales or soft-caps its logits (Gemma 2, Granite, Cohere, Falcon-H1)?"""
    return any(getattr(config, name, neutral) not in (neutral, None, 0) for name, neutral in LOGIT_TRANSFORMS.items())


def _same_loss(model, own_forward, batch: dict) -> bool:
    """Does `model` give the logits (where labels are set) and the loss of `own_forward` on `batch`?"""
    import torch

    inputs = {k: v for k, v in batch.items() if k != "num_real_tokens"}
    keep = inputs["labels"][:, 1:] != -100
    ours = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: ours.append(out))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            own = own_forward(model, **inputs)
            ours_loss = model(**inputs).loss
        own_logits = own.logits[:, :-1][keep].float()
        return (len(ours) == 2 and ours[1].shape == own_logits.shape  # [0] is the head inside own_forward
                and bool(torch.allclose(own_logits, ours[1].float(), rtol=1e-4, atol=1e-4))
                and bool(torch.allclose(own.loss.float(), ours_loss.float(), rtol=1e-5, atol=1e-6)))
    except torch.OutOfMemoryError:
        raise
    except Exception:  # a family whose body does not take these inputs: keep its own forward
        return False
    finally:
        hook.remove()
        model.train(was_training)
