"""Chat prompts and SFT demonstrations in the completion format.

The prompt is the tokenizer's own chat template applied to ``[system, user]`` messages. The
system prompt asks for reasoning, an answer and a confidence in tags (see
:mod:`calibrl.rewards.parsing` for the format the parser accepts).

SFT demonstrations carry a confidence chosen by a *confidence policy*
(``sft.confidence.policy``), registered in :data:`CONFIDENCE_POLICIES`:

- ``constant``: always ``value``. A trap for RL: after "0." the policy puts ~1e-4 on any other
  digit, so there is nothing for the calibration reward to select between.
- ``uniform``: q drawn uniformly from ``{0.05, 0.10, ..., 0.95}`` (``grid_step``).
- ``mixed`` (default): with probability ``random_fraction`` a uniform draw, else ``value``; keeps
  a mode to start from while leaving every value reachable for exploration.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from calibrl.data.example import Example
from calibrl.registry import Registry
from calibrl.data.format import CompletionFormat

__all__ = ["PromptBuilder", "CONFIDENCE_POLICIES"]

ConfidencePolicy = Callable[[random.Random], float]
CONFIDENCE_POLICIES: Registry[Callable[..., ConfidencePolicy]] = Registry("SFT confidence policy")


def _grid(rng: random.Random, grid_step: float) -> float:
    n = round(1.0 / grid_step)
    return rng.randint(1, n - 1) * grid_step


@CONFIDENCE_POLICIES.register("constant")
def constant_policy(value: float = 0.5, **_: float) -> ConfidencePolicy:
    """Always ``value``."""
    return lambda rng: value


@CONFIDENCE_POLICIES.register("uniform")
def uniform_policy(grid_step: float = 0.05, **_: float) -> ConfidencePolicy:
    """Uniform over the interior grid points ``grid_step, 2*grid_step, ..., 1 - grid_step``."""
    return lambda rng: _grid(rng, grid_step)


@CONFIDENCE_POLICIES.register("mixed")
def mixed_policy(value: float = 0.5, random_fraction: float = 0.5, grid_step: float = 0.05, **_: float) -> ConfidencePolicy:
    """``uniform`` with probability ``random_fraction``, else ``value``."""
    return lambda rng: _grid(rng, grid_step) if rng.random() < random_fraction else value


@dataclass
class PromptBuilder:
    """Turns examples into chat prompts and SFT demonstrations.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        system_prompt: instruction placed in the system message.
        fmt: tag names of the completion format.
        think_text: reasoning written in SFT demonstrations (no gold reasoning exists for
            procedural tasks; a short neutral sentence teaches the shape without content).

    Raises:
        ValueError: the tokenizer has no chat template.
    """

    tokenizer: object
    system_prompt: str
    fmt: CompletionFormat = CompletionFormat()
    think_text: str = "Let me work it out."

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; set model.chat_template in the config")

    def prompt(self, example: Example) -> str:
        """The chat-formatted prompt text, ending with the assistant turn's opening."""
        messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": example.question},
        ]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def demonstration(self, example: Example, confidence: float) -> str:
        """A completion in the format with the reference answer and the given confidence.

        The confidence is written with two decimals; ends with the tokenizer's EOS token so
        the model learns to stop. An unanswerable example is demonstrated with the abstain phrase
        as its answer (abstaining is the correct response to it, :func:`calibrl.rewards.scoring.verdict`).

        Raises:
            ValueError: ``example`` is unanswerable but the format has no abstain phrase.
        """
        f = self.fmt
        answer = example.answer
        if example.unanswerable:
            if f.abstain is None:
                raise ValueError(
                    f"example {example.id!r} is unanswerable but prompt.abstain_phrase is unset: "
                    "there is no correct answer to demonstrate"
                )
            answer = f.abstain
        return (
            f"<{f.think}>{self.think_text}</{f.think}>\n<{f.answer}>{answer}</{f.answer}>\n"
            f"<{f.confidence}>{confidence:.2f}</{f.confidence}>{self.tokenizer.eos_token}"
        )
