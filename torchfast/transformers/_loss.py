"""The causal LM's training loss by linear_cross_entropy, from the last hidden state and lm_head's
weight, without the [tokens, vocab] logits.

The supported causal LMs all compute, in their forward:

    hidden = base_model(...).last_hidden_state[:, -logits_to_keep:]     (logits_to_keep=0: all)
    logits = lm_head(hidden)                  (Gemma 2: c * tanh(logits / c), c = final_logit_softcapping)
    loss = ForCausalLMLoss(logits, labels)    (labels shifted left by one, -100 ignored, mean; or a sum
                                               divided by num_items_in_batch when the Trainer passes it)

The fused forward below computes the same loss with logits=None in the output, and only when the model
is in training mode and labels are given. Otherwise (eval, generate, no labels) the class's own
forward runs, unchanged.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from torchfast.ops.cross_entropy import linear_cross_entropy

IGNORE_INDEX = -100  # transformers' ForCausalLMLoss default, also its label padding value


def shifted_labels(labels: torch.Tensor, shift_labels: torch.Tensor | None) -> torch.Tensor:
    """ForCausalLMLoss's targets: labels[:, 1:] with one ignored position appended (or the caller's
    shift_labels as they are)."""
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous()


def fused_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *, num_items_in_batch=None,
               shift_labels=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """transformers' ForCausalLMLoss(lm_head(hidden) [softcapped], labels) in float32, fused."""
    head = model.get_output_embeddings()
    target = shifted_labels(labels, shift_labels).to(hidden.device)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(hidden, head.weight, target, head.bias, ignore_index=ignore_index,
                                reduction=reduction, softcap=softcap)
    # transformers upcasts the logits to float32 before the loss; torchfast's math is float32 already
    # and returns the loss in the logits' dtype (bfloat16 under autocast), so it is upcast the same way.
    loss = loss.float()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def causal_lm_forward(cls_forward):
    """A forward for one model instance: the fused loss in training with labels, `cls_forward` (the
    class's forward) otherwise."""
    signature = inspect.signature(cls_forward)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    # wraps: inspect.signature(model.forward) stays the class's, which the Trainer reads (the columns it
    # keeps, whether the model takes num_items_in_batch).
    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        labels = bound.arguments.get("labels")
        if labels is None or not self.training:
            return cls_forward(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        del arguments["self"], arguments["labels"]
        extra = dict(arguments.pop(var_kw, {}) if var_kw else {})
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        return_dict = extra.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        outputs = self.base_model(**arguments, **extra)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        loss = fused_loss(self, hidden, labels, num_items_in_batch=extra.get("num_items_in_batch"),
                          shift_labels=extra.get("shift_labels"))
        out = _output(outputs, loss)
        return out if return_dict else out.to_tuple()

    return forward


def _output(outputs, loss):
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast

    fields = {"loss": loss, "logits": None, "hidden_states": outputs.hidden_states,
              "attentions": outputs.attentions}
    cache_name = "cache" if hasattr(outputs, "cache") else "past_key_values"
    fields[cache_name] = getattr(outputs, cache_name, None)
    if hasattr(outputs, "cross_attentions"):
        return CausalLMOutputWithCrossAttentions(cross_attentions=outputs.cross_attentions, **fields)
    return CausalLMOutputWithPast(**fields)
