"""Rollouts: sampling G completions per prompt, and per-token log-probs of completions.

Layout: prompts are left-padded, completions right-padded, concatenated as
``[prompt | completion]``; positions follow the attention mask (``cumsum - 1``) so that the
training forward sees the same positions as the decode loop (:mod:`calibrl.rl.decode`) did.

Devices: a :class:`Rollout` lives on the CPU (parsing, rewards and metrics read it there); the
model's inputs are moved to the model's device (:func:`calibrl.device.module_device`), and
log-probs come back on that device.

Out of memory during generation: :func:`generate_rollout` retries the prompts in two halves (and
those in halves, ...) down to ``min_prompts`` prompts per decode call, and concatenates the
parts into the rollout one call would have made (same rows in the same order, groups kept whole;
only the padding widths can differ, which positions and masks make invisible to the model).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from calibrl.device import autocast, module_device
from calibrl.lora import is_peft, merged_lora_weights, merged_model
from calibrl.rl.decode import decode_groups

__all__ = ["CompletionForward", "Rollout", "SamplingCopy", "concat_rollouts", "generate_rollout", "completion_forward",
           "completion_logprobs", "is_out_of_memory",
           "sample_from_ids"]

log = logging.getLogger(__name__)

# What a failed allocation says: CUDA/MPS ("... out of memory"), the CPU allocator ("can't allocate memory").
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


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
        group_index: LongTensor ``[B*G]``, the prompt (group) each completion answers; rows
            with the same index share the same prompt tokens.
        truncated: BoolTensor ``[B*G]``, the row hit ``max_new_tokens`` without an EOS token or
            the stop string (it did not finish); ``None`` (hand-built rollouts): none truncated.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    group_index: torch.Tensor
    truncated: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, idx: slice | torch.Tensor) -> "Rollout":
        """Rows ``idx`` (a slice or a LongTensor of row indices)."""
        rows = range(len(self))[idx] if isinstance(idx, slice) else idx.tolist()
        return Rollout(
            self.prompt_ids[idx],
            self.prompt_mask[idx],
            self.completion_ids[idx],
            self.completion_mask[idx],
            [self.texts[i] for i in rows],
            self.group_index[idx],
            self.truncated[idx] if self.truncated is not None else None,
        )

    def to(self, device: torch.device | str) -> "Rollout":
        """The same rows with every tensor on ``device`` (no copy where already there)."""
        return Rollout(self.prompt_ids.to(device), self.prompt_mask.to(device), self.completion_ids.to(device),
                       self.completion_mask.to(device), self.texts, self.group_index.to(device), self.truncated)


class SamplingCopy:
    """A frozen copy of the policy, its parameters in ``dtype``, that samples rollouts.

    Under bf16 autocast every matmul of every decode step casts the fp32 weights to bf16 again
    (the whole model, once per generated token); a bf16 copy refreshed once per RL step does it
    once. Buffers keep their dtype (rotary frequencies stay float32). The copy's distribution is
    that of the policy with bf16 weights and bf16 activations, close to but not bit-equal with the
    autocast forward that training uses; with one update per batch the importance ratio is
    exactly 1 either way (``old_logp`` is the training forward's own, detached). Memory: one
    more model in ``dtype`` (270 MB for SmolLM2-135M in bf16).

    A LoRA policy (a peft model, :mod:`calibrl.lora`) gets a plain copy with the adapters merged
    into its weights: each refresh writes ``W + (alpha / r) B A`` into the adapted layers only
    (the rest is frozen), so sampling runs no adapter matmuls.

    Args:
        policy: the policy, before DeepSpeed wraps it (a plain copy; not for ZeRO-3, whose
            parameters are sharded).
        dtype: the copy's parameter dtype.
    """

    def __init__(self, policy: Any, dtype: torch.dtype = torch.bfloat16) -> None:
        self.model = (merged_model(policy) if is_peft(policy) else copy.deepcopy(policy)).eval().requires_grad_(False)
        for p in self.model.parameters():
            p.data = p.data.to(dtype)
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._own: dict[str, torch.Tensor] | None = None  # LoRA: the copy's parameters by name

    def _match(self, policy: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        own = dict(self.model.named_parameters())
        pairs = []
        for name, src in policy.named_parameters():
            key = name if name in own else name.removeprefix("module.")
            if key not in own:
                raise KeyError(f"parameter {name!r} of the policy has no counterpart in the sampling copy")
            pairs.append((own[key], src))
        return pairs

    def refresh(self, policy: Any) -> Any:
        """Copy ``policy``'s current weights into the copy (rounded to its dtype) and return it.

        ``policy`` may be the model itself or a wrapper that holds it as ``module`` (DeepSpeed's
        engine): parameters are matched by name, with a leading ``module.`` dropped. A LoRA
        policy's merged adapted weights are written (:func:`calibrl.lora.merged_lora_weights`).

        Raises:
            KeyError: a parameter of ``policy`` has no counterpart in the copy.
        """
        with torch.no_grad():
            if is_peft(policy):
                if self._own is None:
                    self._own = dict(self.model.named_parameters())
                own = self._own
                for name, merged in merged_lora_weights(policy):
                    if name not in own:
                        raise KeyError(f"adapted weight {name!r} of the policy has no counterpart in the sampling copy")
                    own[name].copy_(merged)
                return self.model
            if self._pairs is None:
                self._pairs = self._match(policy)
            for dst, src in self._pairs:
                dst.copy_(src)
        return self.model


def _completion_mask(ids: torch.Tensor, texts: list[str], end_ids: set[int], eos_id: int, stop: str | None) -> torch.Tensor:
    """``[N, L]`` 0/1 mask of the sampled tokens of each row.

    A row ends at its first EOS or pad token (``end_ids``); ``texts[i]`` is row i decoded up to
    there. A row whose text ends with the stop string stopped on it, so the token at the end
    position is padding from the decode loop and is dropped; otherwise a sampled EOS is kept (the
    policy chose to stop) and a pad token is dropped.
    """
    n, length = ids.shape
    keep = torch.zeros((n, length), dtype=torch.long)
    for i, (row, text) in enumerate(zip(ids.tolist(), texts)):
        end = next((t for t, tok in enumerate(row) if tok in end_ids), length)
        stopped = bool(stop) and text.rstrip().endswith(stop)
        include_end = end < length and row[end] == eos_id and not stopped
        keep[i, : end + int(include_end)] = 1
    return keep


def _truncated(ids: torch.Tensor, texts: list[str], end_ids: set[int], stop: str | None, max_new_tokens: int) -> torch.Tensor:
    """BoolTensor ``[N]``: the row is ``max_new_tokens`` long with no EOS/pad token and its text
    does not end with the stop string, i.e. generation cut it off (as ``_completion_mask``
    reads rows). Shorter batches cannot hold a truncated row: decoding only stops early once
    every row has finished."""
    if ids.shape[1] < max_new_tokens:
        return torch.zeros(ids.shape[0], dtype=torch.bool)
    return torch.tensor([
        not end_ids.intersection(row) and not (bool(stop) and text.rstrip().endswith(stop))
        for row, text in zip(ids.tolist(), texts)
    ], dtype=torch.bool)


def is_out_of_memory(err: BaseException) -> bool:
    """``err`` is a failed allocation: ``torch.OutOfMemoryError`` (CUDA), or a ``RuntimeError``
    whose message says so (the CPU and MPS allocators raise plain ``RuntimeError``)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _OOM_MESSAGES)


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout of ``parts``' rows in order: prompts left-padded and completions right-padded
    to the widest part (``pad_token_id``, mask 0), group indices offset so that they stay
    0, 1, ... over the whole batch."""
    width_p = max(r.prompt_ids.shape[1] for r in parts)
    width_c = max(r.completion_ids.shape[1] for r in parts)
    offsets, n = [], 0
    for r in parts:
        offsets.append(n)
        n += int(r.group_index.max()) + 1 if len(r) else 0
    truncated = None if any(r.truncated is None for r in parts) else torch.cat([r.truncated for r in parts])

    def left(x: torch.Tensor, value: int) -> torch.Tensor:  # [n, p] -> [n, width_p]
        return F.pad(x, (width_p - x.shape[1], 0), value=value)

    def right(x: torch.Tensor, value: int) -> torch.Tensor:  # [n, l] -> [n, width_c]
        return F.pad(x, (0, width_c - x.shape[1]), value=value)

    return Rollout(
        prompt_ids=torch.cat([left(r.prompt_ids, pad_token_id) for r in parts]),
        prompt_mask=torch.cat([left(r.prompt_mask, 0) for r in parts]),
        completion_ids=torch.cat([right(r.completion_ids, pad_token_id) for r in parts]),
        completion_mask=torch.cat([right(r.completion_mask, 0) for r in parts]),
        texts=[t for r in parts for t in r.texts],
        group_index=torch.cat([r.group_index + o for r, o in zip(parts, offsets)]),
        truncated=truncated,
    )


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
    min_prompts: int = 1,
    on_oom: Callable[[int], None] | None = None,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt (:func:`calibrl.rl.decode.decode_groups`).

    Args:
        prompts: B chat-formatted prompt strings.
        group_size: G completions per prompt (G=1 with ``do_sample=False`` for greedy eval).
        max_new_tokens: completion length cap, in tokens.
        stop_string: generation stops once it has been written (saves tokens after the format).
        autocast_dtype: e.g. ``torch.bfloat16`` for autocast on the model's device, ``None`` for
            full precision.
        min_prompts: out of memory on more than this many prompts, the prompts are generated in
            two halves (recursively; no part smaller than this while prompts remain), and the
            parts concatenated (module docstring). At or below it the error is raised.
        on_oom: called with the number of prompts of each decode call that ran out of
            memory and was split (after a warning is logged).

    Returns:
        A :class:`Rollout` of ``B*G`` completions, on the CPU.

    Raises:
        torch.OutOfMemoryError / RuntimeError: out of memory on ``min_prompts`` prompts or fewer.
    """
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, do_sample=do_sample,
                  stop_string=stop_string, autocast_dtype=autocast_dtype)
    try:
        return _generate_once(model, tokenizer, prompts, group_size, **kwargs)
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not is_out_of_memory(err) or len(prompts) <= min_prompts:
            raise
    # Outside the except block: the failed attempt's tensors (held by the traceback) are free now.
    device = module_device(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    first = max((len(prompts) + 1) // 2, min_prompts)
    log.warning("generation ran out of memory on %d prompts (x%d completions); retrying as %d + %d prompts "
                "(floor: %d)", len(prompts), group_size, first, len(prompts) - first, min_prompts)
    if on_oom is not None:
        on_oom(len(prompts))
    parts = [generate_rollout(model, tokenizer, part, group_size, **kwargs, min_prompts=min_prompts, on_oom=on_oom)
             for part in (prompts[:first], prompts[first:])]
    return concat_rollouts(parts, tokenizer.pad_token_id)


@torch.no_grad()
def _generate_once(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    do_sample: bool,
    stop_string: str | None,
    autocast_dtype: torch.dtype | None,
) -> Rollout:
    """One :func:`calibrl.rl.decode.decode_groups` call for every prompt (:func:`generate_rollout`)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return sample_from_ids(model, tokenizer, enc.input_ids, enc.attention_mask, group_size,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           do_sample=do_sample, stop_string=stop_string, autocast_dtype=autocast_dtype)


def sample_from_ids(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    do_sample: bool,
    stop_string: str | None,
    autocast_dtype: torch.dtype | None,
) -> Rollout:
    """Sample ``group_size`` completions of each of B already tokenized prompts (one
    :func:`calibrl.rl.decode.decode_groups` call, no out-of-memory retry).

    Args:
        input_ids, attention_mask: LongTensors ``[B, P]``, left-padded, on any device.
        (the rest: :func:`generate_rollout`)

    Returns:
        A :class:`Rollout` of ``B * group_size`` rows on the CPU, group ``b`` = prompt ``b``.
    """
    was_training = model.training
    model.eval()
    device = module_device(model)
    input_ids, attention_mask = input_ids.cpu(), attention_mask.cpu()
    try:
        with autocast(device, autocast_dtype):
            completion_ids = decode_groups(
                model, input_ids.to(device), attention_mask.to(device), group_size,
                max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p, do_sample=do_sample,
                stop_strings=[stop_string] if stop_string else None, tokenizer=tokenizer,
            ).cpu()
    finally:  # also after an out-of-memory error that generate_rollout retries
        model.train(was_training)
    end_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    texts = []
    for row in completion_ids.tolist():
        cut = next((t for t, tok in enumerate(row) if tok in end_ids), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    mask = _completion_mask(completion_ids, texts, end_ids, tokenizer.eos_token_id, stop_string)
    return Rollout(
        prompt_ids=input_ids.repeat_interleave(group_size, dim=0),
        prompt_mask=attention_mask.repeat_interleave(group_size, dim=0),
        completion_ids=completion_ids,
        completion_mask=mask,
        texts=texts,
        group_index=torch.arange(len(input_ids)).repeat_interleave(group_size),
        truncated=_truncated(completion_ids, texts, end_ids, stop_string, max_new_tokens),
    )


# Elements of a [rows, V] block that _SelectedLogSoftmax turns into float32 at a time (64 MiB).
_LOGSOFTMAX_BLOCK = 1 << 24


class _SelectedLogSoftmax(torch.autograd.Function):
    """``log_softmax(logits.float(), -1)[i, targets[i]]`` for every row i, in blocks of rows.

    Autograd through that plain expression keeps a float32 copy of ``logits`` and allocates
    several more ``[T, V]`` float32 tensors in backward; this keeps only ``logits`` (in their own
    dtype, bf16 under autocast) and the float32 ``logsumexp`` per row, and its backward computes
    ``grad * (onehot(target) - softmax)`` block by block, the same arithmetic as autograd's.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = max(1, _LOGSOFTMAX_BLOCK // max(logits.shape[1], 1))
        lse = torch.cat([torch.logsumexp(block.float(), dim=-1) for block in logits.split(rows)])  # [T]
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return logits.gather(1, targets[:, None]).squeeze(1).float() - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for lo in range(0, len(logits), ctx.rows):
            g = grad[lo : lo + ctx.rows, None]  # [rows, 1]
            # torch.sub promotes to a new float32 block, so the in-place ops never touch logits.
            block = torch.sub(logits[lo : lo + ctx.rows], lse[lo : lo + ctx.rows, None]).exp_().mul_(-g)
            out[lo : lo + ctx.rows] = block.scatter_add_(1, targets[lo : lo + ctx.rows, None], g)
        return out, None


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 ``[T]`` log-probs of ``targets`` (long ``[T]``) under ``logits`` ``[T, V]``.

    Raises:
        ValueError: ``logits`` is not one row per target: the model ignored a boolean
            ``logits_to_keep`` (its forward does not slice with transformers'
            ``slice_logits_to_keep``).
    """
    if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected [{targets.shape[0]}, V] logits for a boolean logits_to_keep, got {tuple(logits.shape)}: "
            "the model's forward must select positions with transformers' slice_logits_to_keep"
        )
    return _SelectedLogSoftmax.apply(logits, targets)


def _trim_padding(rollout: Rollout) -> Rollout:
    """The same rows without the prompt columns that are padding in every row (on the left) and
    the completion columns that are padding in every row (on the right); one column of each is
    always kept. Positions and attention follow the masks, so no real token sees a difference."""
    used_p = rollout.prompt_mask.any(dim=0).nonzero().flatten()
    used_c = rollout.completion_mask.any(dim=0).nonzero().flatten()
    lo = int(used_p[0]) if len(used_p) else max(rollout.prompt_mask.shape[1] - 1, 0)
    hi = int(used_c[-1]) + 1 if len(used_c) else 1
    return Rollout(rollout.prompt_ids[:, lo:], rollout.prompt_mask[:, lo:], rollout.completion_ids[:, :hi],
                   rollout.completion_mask[:, :hi], rollout.texts, rollout.group_index, rollout.truncated)


@dataclass
class CompletionForward:
    """The policy forward of :func:`completion_forward`.

    Attributes:
        logprobs: float32 ``[N, L]`` completion-token log-probs (as :func:`completion_logprobs`:
            the untrimmed width L).
        cache: the model's KV cache (a transformers ``Cache``; ``None`` only from the plain,
            unshared forward) of the ``[prompt | completion]`` columns of ``rollout`` (``N`` rows;
            keys of shape ``[N, heads, P' + L', head_dim]``), part of the autograd graph (a later
            forward on it sends gradients back through this one).
        rollout: the rows as run, trimmed of all-padding columns (``P'`` prompt and ``L'``
            completion columns), on the model's device: the cache's column layout.
    """

    logprobs: torch.Tensor
    cache: Any
    rollout: Rollout


def completion_forward(model: Any, rollout: Rollout) -> CompletionForward:
    """:func:`completion_logprobs` (shared-prefix forward) that also returns the KV cache it built,
    so a caller can run more tokens after any prefix of the completions (e.g. the confidence
    grid's prefix tree, :func:`calibrl.rl.confidence_grid.grid_logprobs_on_cache`) without a
    second forward of the context. Not for models whose cache is off (gradient checkpointing in
    training mode). Args and Raises: as :func:`completion_logprobs`.

    Returns:
        A :class:`CompletionForward`: the log-probs, the cache (never ``None`` here) and the
        trimmed rows that give the cache's column layout.
    """
    return _completion_forward(model, rollout, share_prefix=True)


def completion_logprobs(model: Any, rollout: Rollout, share_prefix: bool = True) -> torch.Tensor:
    """Log-probabilities of the completion tokens under ``model``.

    With ``share_prefix`` each distinct prompt of the micro-batch goes through the model once;
    its KV cache is then indexed out to every completion of that prompt and the completions are
    run on top of it. Gradients flow through the shared cache into the prompt positions, so the
    result and its gradient equal the plain ``[prompt | completion]`` forward (up to float
    rounding) at a fraction of the cost when G completions share a prompt. Without
    ``share_prefix`` the plain forward is used.

    Padding is not computed where it can be dropped: prompt columns that are padding in every
    row and completion columns after every row's last token are cut before the forward. The LM
    head runs only on the T positions that predict a completion token (``completion_mask`` 1),
    passed to the model as a boolean ``logits_to_keep``, so the model's own head and any logit
    post-processing (e.g. soft-capping) apply to ``[T, V]`` logits only; the log-softmax is
    taken in float32 on those rows, block by block, without a float32 copy of the logits kept
    for backward (:class:`_SelectedLogSoftmax`).

    Args:
        model: a causal LM whose forward honours a boolean ``[N, S]`` ``logits_to_keep``
            (transformers >= 5.24 models slice with ``slice_logits_to_keep``), or an engine
            wrapping one.
        rollout: N completions (any subset of a rollout's rows), on any device.

    Returns:
        float32 ``[N, L]`` log-probs in nats, 0 where ``completion_mask`` is 0, on the model's
        device.

    Raises:
        ValueError: the model returned logits for other positions than the boolean
            ``logits_to_keep`` asked for.
    """
    return _completion_forward(model, rollout, share_prefix).logprobs


def _completion_forward(model: Any, rollout: Rollout, share_prefix: bool) -> CompletionForward:
    length = rollout.completion_ids.shape[1]
    rollout = _trim_padding(rollout.to(module_device(model)))
    n, width = rollout.completion_ids.shape  # width <= length: trailing padding cut
    ids, mask = rollout.completion_ids, rollout.completion_mask.bool()
    attn = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)  # [N, P+L]
    positions = (attn.cumsum(dim=1) - 1).clamp_min(0)
    zeros = torch.zeros((n, width), dtype=torch.float32, device=ids.device)
    if share_prefix:
        groups, inverse = torch.unique(rollout.group_index, return_inverse=True)
        # One row per distinct prompt (any row of a group will do: they hold the same prompt).
        first = torch.empty(len(groups), dtype=torch.long, device=inverse.device).scatter_(
            0, inverse, torch.arange(len(rollout), device=inverse.device))
        prefix = model(
            input_ids=rollout.prompt_ids[first],
            attention_mask=rollout.prompt_mask[first],
            position_ids=positions[first, : rollout.prompt_ids.shape[1]],
            use_cache=True,
            logits_to_keep=1,
        )
        cache = prefix.cache
        cache.batch_select_indices(inverse)  # [U, ...] -> [N, ...], differentiable indexing
        body = model(
            input_ids=rollout.completion_ids,
            attention_mask=attn,
            position_ids=positions[:, rollout.prompt_ids.shape[1] :],
            cache=cache,
            use_cache=True,
            logits_to_keep=F.pad(mask[:, 1:], (0, 1)),  # body position t predicts token t + 1
        )
        # The prefix's last logits predict completion token 0; body logits come as [T - N0, V],
        # row by row, in the order of mask[:, 1:].
        starts = mask[:, 0]  # [N]: rows with a token 0
        lp0 = _token_logprobs(prefix.logits[inverse[starts], -1], ids[starts, 0])
        rest = _token_logprobs(body.logits, ids[:, 1:][mask[:, 1:]])
        lp = torch.cat([zeros[:, :1].masked_scatter(starts[:, None], lp0),
                        zeros[:, 1:].masked_scatter(mask[:, 1:], rest)], dim=1)  # [N, width]
    else:
        p = rollout.prompt_ids.shape[1]
        out = model(input_ids=torch.cat([rollout.prompt_ids, ids], dim=1), attention_mask=attn,
                    position_ids=positions, logits_to_keep=F.pad(mask, (p - 1, 1)))  # p - 1 + t predicts token t
        lp = zeros.masked_scatter(mask, _token_logprobs(out.logits, ids[mask]))  # [N, width]
        cache = None
    return CompletionForward(F.pad(lp, (0, length - width)), cache, rollout)
