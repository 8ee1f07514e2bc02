"""Rollouts: sampling G completions per prompt, and per-token log-probs of completions.

Layout: prompts are left-padded, completions right-padded, concatenated as
``[prompt | completion]``; positions follow the attention mask (``cumsum - 1``) so that the
training forward sees the same positions as ``generate`` did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Rollout", "generate_rollout", "completion_logprobs"]


@dataclass
class Rollout:
    """G completions for each of B prompts, laid out group by group.

    Attributes:
        prompt_ids: LongTensor ``[B*G, P]``, left-padded.
        prompt_mask: LongTensor ``[B*G, P]``, 1 on prompt tokens.
        completion_ids: LongTensor ``[B*G, L]``, right-padded.
        completion_mask: LongTensor ``[B*G, L]``, 1 on sampled tokens (up to and including the
            EOS token, or the token that completed a stop string).
        texts: ``B*G`` decoded completions (special tokens removed).
        group_size: G.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    group_size: int

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, idx: slice) -> "Rollout":
        """Rows ``idx`` (a micro-batch), keeping tensors' trailing dims."""
        return Rollout(
            self.prompt_ids[idx],
            self.prompt_mask[idx],
            self.completion_ids[idx],
            self.completion_mask[idx],
            self.texts[idx],
            self.group_size,
        )


def _completion_mask(ids: torch.Tensor, texts_upto_eos: list[str], eos_id: int, stop: str | None) -> torch.Tensor:
    # ids: [N, L]. Keep tokens up to and including the first EOS. generate() pads rows that ended
    # on a stop string with pad (== EOS for many tokenizers): that EOS was never sampled, so drop it.
    n, length = ids.shape
    is_eos = ids == eos_id
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full((n,), length))
    for i, text in enumerate(texts_upto_eos):
        if stop and first[i] < length and text.rstrip().endswith(stop):
            first[i] -= 1
    keep = torch.arange(length).unsqueeze(0) <= first.unsqueeze(1)
    return keep.long()


@torch.no_grad()
def generate_rollout(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    stop_string: str | None = "</confidence>",
    autocast_dtype: torch.dtype | None = None,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt with ``model.generate``.

    Args:
        prompts: B chat-formatted prompt strings.
        group_size: G completions per prompt (G=1 with ``do_sample=False`` for greedy eval).
        max_new_tokens: completion length cap, in tokens.
        stop_string: generation stops once it has been written (saves tokens after the format).
        autocast_dtype: e.g. ``torch.bfloat16`` for CPU autocast, ``None`` for full precision.

    Returns:
        A :class:`Rollout` of ``B*G`` completions.
    """
    was_training = model.training
    model.eval()
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=group_size,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if do_sample:
        gen_kwargs |= dict(temperature=temperature, top_p=top_p, top_k=0)
    else:
        gen_kwargs |= dict(temperature=None, top_p=None, top_k=None)
    if stop_string:
        gen_kwargs |= dict(stop_strings=[stop_string], tokenizer=tokenizer)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **gen_kwargs)
    model.train(was_training)
    p = enc.input_ids.shape[1]
    completion_ids = out[:, p:]
    eos = tokenizer.eos_token_id
    upto_eos = []
    for row in completion_ids.tolist():
        cut = row.index(eos) if eos in row else len(row)
        upto_eos.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    mask = _completion_mask(completion_ids, upto_eos, eos, stop_string)
    return Rollout(
        prompt_ids=enc.input_ids.repeat_interleave(group_size, dim=0),
        prompt_mask=enc.attention_mask.repeat_interleave(group_size, dim=0),
        completion_ids=completion_ids,
        completion_mask=mask,
        texts=upto_eos,
        group_size=group_size,
    )


def completion_logprobs(model: Any, rollout: Rollout) -> torch.Tensor:
    """Log-probabilities of the completion tokens under ``model``.

    Only the last ``L + 1`` positions' logits are computed (``logits_to_keep``), and the
    log-softmax is taken by ``logsumexp`` on those alone, so ``[N, P+L, V]`` log-probs are
    never materialised.

    Args:
        rollout: N completions (any micro-batch of a rollout).

    Returns:
        float32 ``[N, L]`` log-probs in nats (meaningless where ``completion_mask`` is 0).
    """
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # [N, P+L]
    attn = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    positions = (attn.cumsum(dim=1) - 1).clamp_min(0)
    length = rollout.completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, logits_to_keep=length + 1).logits
    logits = logits[:, :-1].float()  # [N, L, V]: position t predicts completion token t
    token_logits = logits.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    return token_logits - torch.logsumexp(logits, dim=-1)
