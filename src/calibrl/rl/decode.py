"""The rollout decode loop: G samples per prompt on one shared prompt prefill.

Why not ``model.generate``: on the default workload (SmolLM2-135M, 8 prompts x 8 samples, 128
tokens, 2 CPU cores) the profile of HF ``generate`` spent more time around the model than in it:
``torch.multinomial`` draws an exponential variate for every vocabulary entry of every row at
every step (~50 ms a step here), rows that have finished keep running to the end, and
``num_return_sequences`` runs every prompt's prefill G times. This loop keeps HF's model
forward, its ``DynamicCache`` and its stop-string criterion, and changes those things:

1. **Shared prefill.** The B distinct prompts go through the model once; the KV cache is then
   repeated to the ``B*G`` rows (``DynamicCache.batch_select_indices``), so row ``b*G + g`` is
   sample g of prompt b, as with ``num_return_sequences=G``. Exact: the cache rows equal what
   each row's own prefill would hold.
2. **Inverse-CDF sampling.** One uniform number per row and a ``searchsorted`` on the cumulative
   probabilities, instead of one exponential per vocabulary entry; the same distribution
   (temperature, then nucleus/top-p as HF's ``TopPLogitsWarper``: the smallest set of most
   likely tokens whose mass reaches ``top_p``).
3. **Finished rows leave the batch.** A row that sampled EOS or completed the stop string is
   removed from the cache (``batch_select_indices``) once a quarter of the batch has finished,
   so the model runs on live rows only; its remaining positions hold the pad token, as in
   ``generate``.
4. **Preallocated output.** Sampled tokens go into one ``[B*G, max_new_tokens]`` tensor.

Measured and not kept: HF's ``StaticCache`` (no per-step concatenation of the cache, but its
``index_copy_`` write cost as much here, and attention then runs over the full length every
step), and ``torch.compile`` of the decode forward (minutes of compilation, recompiles as the
batch shrinks, and slower than eager afterwards on this CPU).

Positions follow the attention mask (``cumsum - 1`` over the left-padded prompt, then +1 per
token), as ``generate`` computes them, so a completion's log-probs under
:func:`calibrl.rl.rollout.completion_logprobs` are those it was sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, StopStringCriteria

__all__ = ["sample_next_tokens", "decode_groups"]

# Compact the batch once this share of its rows has finished: each compaction copies the whole
# KV cache, so doing it for every finished row would cost more than the forwards it saves.
_COMPACT_SHARE = 0.25


def sample_next_tokens(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True) -> torch.Tensor:
    """Next token of each row from its logits.

    Args:
        logits: float ``[N, V]`` next-token logits (any float dtype; softmax in float32).
        temperature: > 0; logits are divided by it before the softmax (sampling only).
        top_p: in ``(0, 1]``; nucleus sampling keeps the smallest set of most likely tokens whose
            probability mass reaches ``top_p`` (at least one token), as HF's ``TopPLogitsWarper``.
        do_sample: ``False``: greedy (``argmax``; temperature and top-p ignored).

    Returns:
        LongTensor ``[N]`` of token ids in ``[0, V)``; a token of probability 0 is never drawn.

    Raises:
        ValueError: ``temperature <= 0`` or ``top_p`` outside ``(0, 1]`` when sampling.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float() if temperature == 1 else logits.float() / temperature
    probs = torch.softmax(logits, dim=-1)  # [N, V]
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep a token while the mass before it is still short of top_p (the first always stays)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = probs.cumsum(dim=-1)  # [N, V], cdf[:, -1] = total mass (1 up to rounding)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    # first index whose cdf exceeds u: probs there > 0 (cdf strictly rises at it)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(cdf.shape[1] - 1)


@dataclass
class _LiveRows:
    """The rows still being decoded, in the KV cache's row order.

    Attributes:
        cache: the KV cache of these rows.
        live: LongTensor ``[n_live]``, the output row (``b*G + g``) of each.
        mask: ``[n_live, P + t]``, attention mask over prompt and tokens so far.
        next_pos: ``[n_live, 1]``, position of each row's next token.
        finished: BoolTensor ``[n_live]``; a finished row stays until the next compaction.
    """

    cache: DynamicCache
    live: torch.Tensor
    mask: torch.Tensor
    next_pos: torch.Tensor
    finished: torch.Tensor

    def advance(self, model: Any, step: torch.Tensor) -> torch.Tensor:
        """Feed each row its sampled token ``step`` (``[n_live]``), first dropping the finished
        rows once :data:`_COMPACT_SHARE` of them have finished; the next-token logits
        ``[n_live, V]`` of the rows that remain."""
        if int(self.finished.sum()) >= _COMPACT_SHARE * len(self.live):
            keep = torch.nonzero(~self.finished).flatten()
            self.cache.batch_select_indices(keep)
            self.live, self.mask, self.next_pos, self.finished = (
                self.live[keep], self.mask[keep], self.next_pos[keep], self.finished[keep])
            step = step[keep]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = model(input_ids=step[:, None], attention_mask=self.mask, position_ids=self.next_pos, cache=self.cache,
                    use_cache=True, logits_to_keep=1)
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1]


def _prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             group_size: int) -> tuple[_LiveRows, torch.Tensor]:
    """Run the B prompts through the model once and repeat their cache to the ``B*G`` rows (row
    ``b*G + g`` <- prompt b): the rows, all live, and their next-token logits ``[B*G, V]``."""
    device = input_ids.device
    b = input_ids.shape[0]
    mask = attention_mask.long()
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)  # [B, P]
    # DeepSpeed's engine has a `config` of its own (a dict); the HF config is its module's.
    cache = DynamicCache(config=getattr(model, "module", model).config)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1)
    expand = torch.arange(b, device=device).repeat_interleave(group_size)  # row b*G + g <- prompt b
    cache.batch_select_indices(expand)
    n = b * group_size
    rows = _LiveRows(cache, torch.arange(n, device=device), mask[expand], positions[expand, -1:] + 1,
                     torch.zeros(n, dtype=torch.bool, device=device))
    return rows, out.logits[:, -1][expand]


def _record(tokens: torch.Tensor, logprobs: torch.Tensor | None, t: int, rows: _LiveRows, step: torch.Tensor,
            logits: torch.Tensor) -> None:
    """Write the rows' tokens ``step`` (``[n_live]``) at position ``t`` of ``tokens``
    (``[B*G, max_new_tokens]``) and, when kept, their log-probs under ``logits`` (``[n_live, V]``)
    into ``logprobs``, 0 on finished rows."""
    tokens[rows.live, t] = step
    if logprobs is not None:
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, step[:, None]).squeeze(1)
        logprobs[rows.live, t] = torch.where(rows.finished, 0.0, lp)


@torch.no_grad()
def decode_groups(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    group_size: int,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    stop_strings: list[str] | None = None,
    tokenizer: Any = None,
    return_logprobs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample ``group_size`` completions of each prompt (module docstring).

    Args:
        model: an HF causal LM (``model(input_ids, attention_mask, position_ids, cache,
            use_cache, logits_to_keep)``), or a wrapper that holds it as ``module`` (DeepSpeed's
            engine), in the dtype and autocast context the caller wants.
        input_ids: LongTensor ``[B, P]``, left-padded prompts, on the model's device.
        attention_mask: ``[B, P]``, 1 on prompt tokens.
        group_size: G completions per prompt.
        max_new_tokens: at most this many tokens per completion (>= 1).
        eos_token_id: a row that samples it has finished (the EOS is kept in its completion).
        pad_token_id: fills a row after it finished.
        temperature, top_p, do_sample: see :func:`sample_next_tokens`.
        stop_strings: a row that completes one of them has finished (HF's ``StopStringCriteria``,
            which needs ``tokenizer``).
        return_logprobs: also return each sampled token's log-probability under the model's
            logits (log-softmax before temperature and top-p: the policy's own distribution, the
            quantity :func:`calibrl.rl.rollout.completion_logprobs` recomputes).

    Returns:
        LongTensor ``[B*G, L]`` of completion tokens, row ``b*G + g`` = sample g of prompt b, on
        ``input_ids``' device; ``L <= max_new_tokens`` is the step at which the last row
        finished (or ``max_new_tokens``). After a row's last token (its EOS, or the token that
        completed a stop string) it holds ``pad_token_id``. With ``return_logprobs``, also float32
        ``[B*G, L]`` log-probs in nats (0 after a row's last token).

    Raises:
        ValueError: ``max_new_tokens < 1``, ``group_size < 1``, or stop strings without a tokenizer.
    """
    if max_new_tokens < 1 or group_size < 1:
        raise ValueError(f"max_new_tokens and group_size must be >= 1, got {max_new_tokens} and {group_size}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer")
    stop = StopStringCriteria(tokenizer, stop_strings) if stop_strings else None
    rows, logits = _prefill(model, input_ids, attention_mask, group_size)
    n, device = len(rows.live), input_ids.device
    tokens = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device) if return_logprobs else None
    for t in range(max_new_tokens):
        step = torch.where(rows.finished, pad_token_id, sample_next_tokens(logits, temperature, top_p, do_sample))
        _record(tokens, logprobs, t, rows, step, logits)
        done = step == eos_token_id
        if stop is not None:
            done |= stop(tokens[rows.live, : t + 1], None).to(device)
        rows.finished |= done
        if bool(rows.finished.all()) or t == max_new_tokens - 1:
            break  # the completions are t + 1 tokens long
        logits = rows.advance(model, step)
    if logprobs is not None:
        return tokens[:, : t + 1], logprobs[:, : t + 1]
    return tokens[:, : t + 1]
