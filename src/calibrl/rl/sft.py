"""Format warm-up by supervised fine-tuning on demonstrations built from gold answers.

Each demonstration is ``<think>{think_text}</think><answer>{gold}</answer><confidence>{q}</confidence>``
followed by EOS, with q drawn by the configured confidence policy
(:data:`calibrl.data.prompts.CONFIDENCE_POLICIES`, ``trainer.sft.confidence``). The loss is the
mean next-token cross-entropy over demonstration tokens only (prompt and padding are masked with
-100). Settings: :class:`calibrl.config.SFTConfig` (``trainer.sft``: number of demonstrations,
epochs, batch size) and, from :class:`calibrl.config.TrainerConfig`, ``bf16`` (autocast) and
``max_grad_norm`` (clipping); ``seed`` seeds the confidence draws and the order.

The batching (:func:`padded_batches`) and the optimisation loop (:func:`train_on_batches`) take
prebuilt labelled rows, so the self-labelled confidence warm-up (:mod:`calibrl.rl.self_label`)
trains through the same code.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from calibrl.config import SFTConfig, TrainerConfig
from calibrl.data.prompts import CONFIDENCE_POLICIES, PromptBuilder
from calibrl.data.example import Example
from calibrl.device import autocast, module_device

__all__ = ["completion_loss", "num_sft_steps", "padded_batches", "sft_batches", "sft_warmup", "train_on_batches"]


def padded_batches(
    rows: Sequence[tuple[list[int], list[int]]], batch_size: int, epochs: int, pad_id: int, rng: random.Random
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield right-padded batches of prebuilt ``(input_ids, labels)`` rows: ``epochs`` passes,
    the rows reshuffled by ``rng`` before every pass, ``batch_size`` rows a batch (the last one of
    a pass may be smaller).

    Args:
        rows: ``(ids [T_i], labels [T_i])`` token lists, ``labels`` -100 where no loss is taken.
        pad_id: token id written into the padding (its label is -100, its attention mask 0).

    Yields:
        ``input_ids``/``attention_mask``/``labels``: LongTensors ``[b, T]``, b <= ``batch_size``,
        T the longest row of the batch.
    """
    rows = list(rows)  # shuffled in place; the caller's sequence is left as it is
    for _ in range(epochs):
        rng.shuffle(rows)
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, (x, y) in enumerate(chunk):
                ids[j, : len(x)] = torch.tensor(x)
                labels[j, : len(y)] = torch.tensor(y)
                attn[j, : len(x)] = 1
            yield {"input_ids": ids, "attention_mask": attn, "labels": labels}


def sft_batches(
    tokenizer: Any, prompts: PromptBuilder, examples: Sequence[Example], sft: SFTConfig, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield tokenized, right-padded batches: ``input_ids``/``attention_mask``/``labels`` ``[b, T]``
    (b <= ``sft.batch_size``), ``sft.epochs`` passes over the first ``sft.num_examples`` examples,
    reshuffled (``seed``) every pass.

    Raises:
        KeyError: unknown confidence policy.
        ValueError: no examples.
    """
    if not examples:
        raise ValueError("no SFT examples")
    confidence = dataclasses.asdict(sft.confidence)
    policy = CONFIDENCE_POLICIES.get(confidence.pop("policy"))(**confidence)
    rng = random.Random(seed)
    rows = []
    for e in list(examples)[: sft.num_examples]:
        p = tokenizer(prompts.prompt(e), add_special_tokens=False).input_ids
        c = tokenizer(prompts.demonstration(e, policy(rng)), add_special_tokens=False).input_ids
        rows.append((p + c, [-100] * len(p) + c))
    # the same rng goes on to shuffle: the confidence draws and the order come from one stream
    yield from padded_batches(rows, sft.batch_size, sft.epochs, tokenizer.pad_token_id, rng)


def completion_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (completion) positions.

    The LM head runs only on positions whose next token is labelled, not on the prompt, which
    saves most of the ``[b, T, V]`` logits (V = 49152 for SmolLM2).

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 = ignored), each ``[b, T]``.

    Returns:
        Scalar loss in nats per token.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()  # [n_labelled, V]
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def num_sft_steps(n_examples: int, sft: SFTConfig) -> int:
    """Optimizer steps the warm-up takes over ``n_examples`` training examples."""
    n = min(n_examples, sft.num_examples)
    return sft.epochs * -(-n // sft.batch_size)


def train_on_batches(
    model: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    on_step: Callable[[int, dict[str, float]], None],
    *,
    bf16: bool,
    max_grad_norm: float,
    prefix: str = "sft",
) -> int:
    """One optimizer step per batch on :func:`completion_loss` (bf16 autocast when ``bf16``,
    gradients clipped to ``max_grad_norm``); ``on_step(i, metrics)`` receives ``<prefix>/loss``
    (nats per labelled token), ``<prefix>/lr``, ``<prefix>/grad_norm``.

    Args:
        batches: ``input_ids``/``attention_mask``/``labels`` ``[b, T]`` (:func:`padded_batches`).

    Returns:
        Number of optimizer steps taken.
    """
    model.train()
    steps = 0
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        device = module_device(model)
        with autocast(device, torch.bfloat16 if bf16 else None):
            loss = completion_loss(model, {k: v.to(device) for k, v in batch.items()})
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        steps += 1
        on_step(steps, {f"{prefix}/loss": float(loss.detach()), f"{prefix}/lr": float(optimizer.param_groups[0]["lr"]),
                        f"{prefix}/grad_norm": grad_norm})
    return steps


def sft_warmup(
    model: Any,
    tokenizer: Any,
    prompts: PromptBuilder,
    examples: Sequence[Example],
    trainer: TrainerConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    on_step: Callable[[int, dict[str, float]], None],
    seed: int = 0,
) -> int:
    """Run the warm-up of ``trainer.sft`` (bf16 autocast when ``trainer.bf16``, gradients clipped to
    ``trainer.max_grad_norm``); ``on_step(i, metrics)`` receives ``sft/loss`` (nats per token),
    ``sft/lr``, ``sft/grad_norm``.

    Returns:
        Number of optimizer steps taken.
    """
    batches = sft_batches(tokenizer, prompts, examples, trainer.sft, seed)
    return train_on_batches(model, batches, optimizer, scheduler, on_step, bf16=trainer.bf16,
                            max_grad_norm=trainer.max_grad_norm)
