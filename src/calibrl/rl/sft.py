"""Format warm-up by supervised fine-tuning on demonstrations built from gold answers.

Each demonstration is ``<think>{think_text}</think><answer>{gold}</answer><confidence>{q}</confidence>``
followed by EOS, with q drawn by the configured confidence policy
(:data:`calibrl.data.prompts.CONFIDENCE_POLICIES`). The loss is the mean next-token
cross-entropy over demonstration tokens only (prompt and padding are masked with -100).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from calibrl.data.prompts import CONFIDENCE_POLICIES, PromptBuilder
from calibrl.data.example import Example
from calibrl.device import autocast, module_device

__all__ = ["SFTSettings", "sft_batches", "sft_warmup"]


@dataclass
class SFTSettings:
    """Mirrors the ``trainer.sft`` config.

    Attributes:
        num_examples: demonstrations built from the first training examples.
        epochs: passes over them.
        batch_size: demonstrations per optimizer step.
        confidence_policy: name in ``CONFIDENCE_POLICIES``.
        confidence_kwargs: its arguments (``value``, ``random_fraction``, ``grid_step``).
        seed: seeds the confidence draws and the order.
        bf16: bf16 autocast.
        max_grad_norm: gradient clipping threshold.
    """

    num_examples: int = 400
    epochs: int = 2
    batch_size: int = 8
    confidence_policy: str = "uniform"
    confidence_kwargs: dict[str, float] | None = None
    seed: int = 0
    bf16: bool = True
    max_grad_norm: float = 1.0


def sft_batches(
    tokenizer: Any, prompts: PromptBuilder, examples: Sequence[Example], settings: SFTSettings
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield tokenized, right-padded batches: ``input_ids``/``attention_mask``/``labels`` ``[b, T]``.

    Raises:
        KeyError: unknown confidence policy.
        ValueError: no examples.
    """
    if not examples:
        raise ValueError("no SFT examples")
    policy = CONFIDENCE_POLICIES.get(settings.confidence_policy)(**(settings.confidence_kwargs or {}))
    rng = random.Random(settings.seed)
    rows = []
    for e in list(examples)[: settings.num_examples]:
        p = tokenizer(prompts.prompt(e), add_special_tokens=False).input_ids
        c = tokenizer(prompts.demonstration(e, policy(rng)), add_special_tokens=False).input_ids
        rows.append((p + c, [-100] * len(p) + c))
    pad = tokenizer.pad_token_id
    for _ in range(settings.epochs):
        rng.shuffle(rows)
        for i in range(0, len(rows), settings.batch_size):
            chunk = rows[i : i + settings.batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, (x, y) in enumerate(chunk):
                ids[j, : len(x)] = torch.tensor(x)
                labels[j, : len(y)] = torch.tensor(y)
                attn[j, : len(x)] = 1
            yield {"input_ids": ids, "attention_mask": attn, "labels": labels}


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


def num_sft_steps(n_examples: int, settings: SFTSettings) -> int:
    """Optimizer steps the warm-up takes."""
    n = min(n_examples, settings.num_examples)
    return settings.epochs * -(-n // settings.batch_size)


def sft_warmup(
    model: Any,
    tokenizer: Any,
    prompts: PromptBuilder,
    examples: Sequence[Example],
    settings: SFTSettings,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    on_step: Callable[[int, dict[str, float]], None],
) -> int:
    """Run the warm-up; ``on_step(i, metrics)`` receives ``sft/loss``, ``sft/lr``, ``sft/grad_norm``.

    Returns:
        Number of optimizer steps taken.
    """
    model.train()
    steps = 0
    for batch in sft_batches(tokenizer, prompts, examples, settings):
        optimizer.zero_grad(set_to_none=True)
        device = module_device(model)
        with autocast(device, torch.bfloat16 if settings.bf16 else None):
            loss = completion_loss(model, {k: v.to(device) for k, v in batch.items()})
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        steps += 1
        on_step(steps, {"sft/loss": float(loss.detach()), "sft/lr": float(optimizer.param_groups[0]["lr"]), "sft/grad_norm": grad_norm})
    return steps
