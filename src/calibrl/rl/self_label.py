"""Self-labelled confidence warm-up: the stated confidence learns what the model's own signal knows.

After the format warm-up (:mod:`calibrl.rl.sft`, random ``uniform`` confidences) the stated
confidence does not rank right above wrong answers (AUROC about 0.53 on ``chain_sum``) while the
answer-token probability does (about 0.9). This warm-up, run between the SFT warm-up and RL when
``trainer.self_label.enabled`` (:class:`calibrl.config.SelfLabelConfig`), fine-tunes the model on
its own greedy completions with their confidence replaced by a calibrated estimate of being right.
It is Rewarding Doubt's idea of teaching a stated confidence from the model's own outcomes
(Stangel et al., arXiv:2503.02623) done offline, with the label taken from an intrinsic signal
mapped to accuracy by isotonic regression (Zadrozny & Elkan, KDD 2002):

1. **Items.** ``num_examples`` training questions taken after the SFT demonstrations,
   ``train[sft.num_examples : sft.num_examples + num_examples]`` (:func:`self_label_items`),
   answered greedily by the current model. The answering is the evaluator's
   (:func:`calibrl.eval.evaluator.evaluate`, called by :mod:`calibrl.run.stages`, which hands
   the results here as :class:`Answered`), so a completion is parsed and judged exactly as in
   training and evaluation.
2. **Signal** (:data:`LABEL_SIGNALS`, ``signal``), defined on well-formed greedy completions:
   ``answer_prob``, the geometric-mean probability of the answer tokens
   (:func:`calibrl.eval.signals.answer_probability`), or ``agreement``, the share of
   ``n_samples`` sampled answers (temperature 1, seeded) equal to the greedy answer after
   :func:`calibrl.data.format.normalize_answer` (:func:`agreement`).
3. **Split** (:func:`split_indices`, seeded): ``round(fit_fraction * N)`` items (at least 1, at
   most N - 1) are the *fit* set, the rest the *label* set. Fit items are never trained on, so
   every label is an out-of-sample estimate.
4. **Map** (:func:`fit_label_map`): isotonic regression from the signal to correctness (1/0) on
   the well-formed fit items, ``sklearn.isotonic.IsotonicRegression(out_of_bounds="clip",
   y_min=0, y_max=1)``: pool-adjacent-violators gives the monotone non-decreasing fit closest to
   the 0/1 outcomes in squared error, i.e. an estimate of P(correct | signal); between fitted
   signal values sklearn interpolates linearly, outside them it clips to the end values.
5. **Labels** (:func:`build_label_set`): each well-formed label item's confidence becomes the map
   at its signal, rounded to the nearest value of the grid ``0, step, ..., 1``
   (``trainer.sft.confidence.grid_step``; a tie goes to the lower value) and written ``{q:.2f}``
   as the SFT demonstrations write it. The completion is cut after the closing confidence tag
   and ends with EOS. Label items that are not well formed, or whose signal is undefined, are
   dropped and counted.
6. **Fine-tune** (:func:`self_label_warmup`): next-token cross-entropy through the SFT loop
   (:func:`calibrl.rl.sft.train_on_batches`) on ``prompt + head + tail``, ``head`` the greedy
   completion up to and including ``<confidence>``, ``tail`` = ``{q:.2f}</confidence>`` + EOS.
   ``loss_on=confidence`` labels the tail tokens only (the model's own reasoning and answer are
   context); ``loss_on=completion`` labels head and tail (the model's greedy answers are distilled
   into itself, which anchors the answer slot); ``loss_on=verified`` labels the head of the
   completions whose answer was verified correct and the tail of all. Measured on a validation
   split (``scripts/tune_self_label.py``, docs/results.md): the tail alone teaches the answer slot
   to write confidences too (44% of answers became grid strings such as ``0.05``, accuracy 0.28 ->
   0.09), while the whole completion keeps the answers.

Properness caveat: this is distillation of the model's own signal, not a proper scoring rule. The
labels are as good as the signal and the map: they cannot rank answers better than the signal
does (the map is monotone and the grid merges neighbours, so label AUROC <= signal AUROC on the
same items), and the map is fitted on the model *before* the fine-tune, so it is stale once the
model changes. RL afterwards still optimises the proper scoring rule of ``reward``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from calibrl.config import SelfLabelConfig, TrainerConfig
from calibrl.data.example import Example
from calibrl.data.format import CompletionFormat, normalize_answer
from calibrl.data.prompts import PromptBuilder
from calibrl.metrics import auroc
from calibrl.registry import Registry
from calibrl.rewards.parsing import ParsedCompletion, parse_completion
from calibrl.rl.confidence_grid import ConfidenceGrid
from calibrl.rl.sft import padded_batches, train_on_batches

__all__ = [
    "LABEL_SIGNALS", "LOSS_ON", "Answered", "LabelSet", "LabelSignal", "Relabelled", "agreement", "build_label_set",
    "fit_label_map", "label_rows", "num_self_label_steps", "round_to_grid", "self_label_items", "self_label_warmup",
    "split_indices",
]

log = logging.getLogger(__name__)

#: Choices of ``trainer.self_label.loss_on``: the tokens the fine-tune takes its loss on.
LOSS_ON = ("confidence", "completion", "verified")


@dataclass(frozen=True)
class Answered:
    """One training question answered greedily by the model (one row of the evaluator's predictions).

    Attributes:
        example: the question.
        completion: the greedy completion, decoded without special tokens (the evaluator's ``completion``).
        correct: the evaluator's verdict (False for a completion that is not well formed).
        answer_prob: the answer-token probability, in (0, 1]; NaN where undefined or not computed.
        samples: the parsed answers of the sampled completions (``agreement``; ``None`` for a
            sample without an answer); empty when none were sampled.
    """

    example: Example
    completion: str
    correct: bool
    answer_prob: float = math.nan
    samples: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class LabelSignal:
    """A signal the confidence labels are mapped from; it declares what the answering must provide.

    Attributes:
        value: ``(answered, parse of its greedy completion) -> signal`` in [0, 1], NaN where
            undefined; called on well-formed completions only.
        needs_answer_prob: the items need ``answer_prob`` (the evaluator's intrinsic forward).
        needs_samples: the items need ``n_samples`` sampled answers per question.
    """

    value: Callable[[Answered, ParsedCompletion], float]
    needs_answer_prob: bool = False
    needs_samples: bool = False


def agreement(answer: str | None, samples: Sequence[str | None]) -> float:
    """Share of ``samples`` equal to ``answer`` after :func:`~calibrl.data.format.normalize_answer`
    (a sample without an answer disagrees).

    Example: answer ``"5"``, samples ``["5", " 5.", "6", None]`` -> 2 of 4 agree -> 0.5.

    Returns:
        A share in [0, 1] (a multiple of ``1 / len(samples)``); NaN when ``answer`` is ``None`` or
        there is no sample.
    """
    if answer is None or not samples:
        return math.nan
    target = normalize_answer(answer)
    return sum(s is not None and normalize_answer(s) == target for s in samples) / len(samples)


LABEL_SIGNALS: Registry[LabelSignal] = Registry("trainer.self_label.signal")
LABEL_SIGNALS.register("answer_prob")(LabelSignal(lambda a, p: a.answer_prob, needs_answer_prob=True))
LABEL_SIGNALS.register("agreement")(LabelSignal(lambda a, p: agreement(p.answer, a.samples), needs_samples=True))


def self_label_items(train: Sequence[Example], sft_examples: int, num_examples: int) -> list[Example]:
    """The questions the warm-up answers: ``train[sft_examples : sft_examples + num_examples]``,
    the ``num_examples`` training examples after the SFT demonstrations.

    Raises:
        ValueError: the training set has fewer than ``sft_examples + num_examples`` examples.
    """
    if sft_examples + num_examples > len(train):
        raise ValueError(
            f"trainer.self_label.num_examples={num_examples} after trainer.sft.num_examples={sft_examples} needs "
            f"{sft_examples + num_examples} training examples, the training set has {len(train)}"
        )
    return list(train[sft_examples : sft_examples + num_examples])


def split_indices(n: int, fit_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split items ``0..n-1`` into the fit and label sets by a seeded permutation
    (``random.Random(seed).shuffle``): the first ``min(max(round(fit_fraction * n), 1), n - 1)``
    of it are the fit set.

    Returns:
        ``(fit, label)``: disjoint, sorted index lists covering ``0..n-1``, both non-empty.

    Raises:
        ValueError: ``n < 2`` or ``fit_fraction`` outside (0, 1).
    """
    if n < 2:
        raise ValueError(f"the self-label split needs at least 2 items, got {n}")
    if not 0 < fit_fraction < 1:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_fit = min(max(round(fit_fraction * n), 1), n - 1)
    return sorted(order[:n_fit]), sorted(order[n_fit:])


def fit_label_map(signal: Sequence[float], correct: Sequence[bool]) -> Any:
    """Isotonic regression of correctness on the signal (module docstring, step 4).

    Args:
        signal: float ``[M]``, finite.
        correct: ``[M]`` 0/1 or bool.

    Returns:
        The fitted ``sklearn.isotonic.IsotonicRegression``; ``.predict(x)`` maps signals to
        estimates of P(correct) in [0, 1] (clipped outside the fitted range).

    Raises:
        ValueError: no points, lengths differ, or a non-finite signal.
    """
    from sklearn.isotonic import IsotonicRegression

    x, y = np.asarray(signal, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    if x.size == 0 or x.shape != y.shape:
        raise ValueError(f"the label map needs matching, non-empty signal and correctness, got {x.shape} and {y.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("the label map's signal holds a non-finite value")
    return IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(x, y)


def round_to_grid(q: Sequence[float], step: float) -> np.ndarray:
    """Each value of ``q`` (in [0, 1]) rounded to the nearest value of the confidence grid
    ``0, step, ..., 1`` (:class:`~calibrl.rl.confidence_grid.ConfidenceGrid`, two decimals); a tie
    goes to the lower value. Example, step 0.05: 0.333 -> 0.35, 0.32 -> 0.30, 0.325 -> 0.30.

    Returns:
        float64 ``[len(q)]``, grid values.

    Raises:
        ValueError: a step the grid refuses (not a whole number of hundredths dividing 1).
    """
    values = ConfidenceGrid(step).values.numpy()  # [V]
    x = np.asarray(q, dtype=np.float64).reshape(-1)
    # argmin returns the first of equal distances: the lower grid value; the 1e-9 absorbs the
    # float error of q / step so that 0.325 counts as a tie (its distances differ by ~1e-17).
    dist = np.abs(x[:, None] - values[None, :])  # [len(q), V]
    return values[np.argmin(np.round(dist / 1e-9) * 1e-9, axis=1)]


@dataclass(frozen=True)
class Relabelled:
    """A greedy completion with its new confidence: the training target is ``head + tail``.

    Attributes:
        example: its question.
        head: the greedy completion up to and including the opening confidence tag.
        confidence: the grid label, in [0, 1].
        correct: the verifier's verdict on the greedy answer (``loss_on=verified`` learns the head
            of correct ones only).
    """

    example: Example
    head: str
    confidence: float
    correct: bool = False

    def tail(self, fmt: CompletionFormat, eos_token: str) -> str:
        """``{confidence:.2f}</confidence>`` + ``eos_token``: the confidence as the SFT
        demonstrations write it, then the end of the turn."""
        return f"{self.confidence:.2f}</{fmt.confidence}>{eos_token}"


@dataclass
class LabelSet:
    """What :func:`build_label_set` made of the answered items.

    Attributes:
        fit: indices (into the answered items) of the fit set, sorted.
        label: indices of the label set, sorted (disjoint from ``fit``).
        items: the relabelled label-set completions that are trained on, in index order.
        metrics: ``self_label/<name>`` scalars: ``n_fit`` (fit-set size), ``fit_points`` (its
            well-formed items with a defined signal: the map's points), ``fit_accuracy``
            (accuracy over the whole fit set, a malformed completion is wrong), ``n_label``
            (items trained on), ``n_dropped`` (label-set items not trained on: not well formed or
            no signal; ``n_label + n_dropped`` is the label-set size), ``label_auroc`` and
            ``signal_auroc`` (AUROC of the grid labels and of the raw signal against
            correctness on the trained items; NaN with one class), ``label_mean`` (mean label)
            and ``label_accuracy`` (accuracy of the trained items); NaN where there is no item.
    """

    fit: list[int]
    label: list[int]
    items: list[Relabelled] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else math.nan


def _auroc(q: np.ndarray, correct: np.ndarray) -> float:
    return auroc(q, correct) if q.size else math.nan


def build_label_set(
    answered: Sequence[Answered], settings: SelfLabelConfig, grid_step: float, fmt: CompletionFormat, seed: int,
) -> LabelSet:
    """Split the answered items, fit the map on the fit set, relabel the label set (module
    docstring, steps 2-5).

    Args:
        answered: the greedy answers (N >= 2 of them).
        settings: ``trainer.self_label`` (``signal``, ``fit_fraction``).
        grid_step: the confidence grid spacing (``trainer.sft.confidence.grid_step``).
        fmt: the completion format.
        seed: seeds the split.

    Returns:
        The :class:`LabelSet`. Without a fit point (no well-formed fit completion with a signal)
        there is no map: every label-set item is dropped, with a warning.

    Raises:
        KeyError: unknown ``settings.signal``.
        ValueError: fewer than 2 items, ``fit_fraction`` outside (0, 1), or a bad grid step.
    """
    signal = LABEL_SIGNALS.get(settings.signal)
    fit, label = split_indices(len(answered), settings.fit_fraction, seed)
    parsed = [parse_completion(a.completion, fmt) for a in answered]
    values = np.array([signal.value(a, p) if p.format_ok else math.nan for a, p in zip(answered, parsed)])  # [N]
    correct = np.array([a.correct for a in answered], dtype=np.float64)  # [N]
    usable = np.isfinite(values)  # well formed, with a signal
    points = [i for i in fit if usable[i]]
    kept = [i for i in label if usable[i]] if points else []
    labels = np.empty(0)
    if points:
        labels = round_to_grid(fit_label_map(values[points], correct[points]).predict(values[kept]), grid_step)
    else:
        log.warning("self-label: no well-formed fit completion with a signal; nothing is relabelled")
    items = [
        Relabelled(answered[i].example, answered[i].completion[: parsed[i].confidence_span[0]], float(q),
                   answered[i].correct)
        for i, q in zip(kept, labels)
    ]
    metrics = {
        "n_fit": float(len(fit)), "fit_points": float(len(points)), "fit_accuracy": _mean(correct[fit]),
        "n_label": float(len(kept)), "n_dropped": float(len(label) - len(kept)),
        "label_auroc": _auroc(labels, correct[kept]), "signal_auroc": _auroc(values[kept], correct[kept]),
        "label_mean": _mean(labels), "label_accuracy": _mean(correct[kept]),
    }
    return LabelSet(fit, label, items, {f"self_label/{k}": v for k, v in metrics.items()})


def label_rows(
    tokenizer: Any, prompts: PromptBuilder, items: Sequence[Relabelled], loss_on: str,
) -> list[tuple[list[int], list[int]]]:
    """Token rows of the relabelled completions: ``ids = prompt + head + tail`` (each part
    tokenized on its own, no special tokens added), ``labels`` -100 on the prompt, on the head
    too with ``loss_on="confidence"`` (the tail alone is learnt: the confidence value tokens, the
    closing tag and EOS), the head's own ids with ``loss_on="completion"``, and with
    ``loss_on="verified"`` the head's own ids where the answer was verified correct, -100 on the
    heads of wrong ones.

    Returns:
        ``(ids [T_i], labels [T_i])`` per item, as :func:`calibrl.rl.sft.padded_batches` takes them.

    Raises:
        ValueError: ``loss_on`` not in :data:`LOSS_ON`.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"unknown trainer.self_label.loss_on {loss_on!r}; valid choices: {', '.join(sorted(LOSS_ON))}")
    rows = []
    for item in items:
        p = tokenizer(prompts.prompt(item.example), add_special_tokens=False).input_ids
        h = tokenizer(item.head, add_special_tokens=False).input_ids
        t = tokenizer(item.tail(prompts.fmt, tokenizer.eos_token), add_special_tokens=False).input_ids
        learn_head = loss_on == "completion" or (loss_on == "verified" and item.correct)
        head_labels = h if learn_head else [-100] * len(h)
        rows.append((p + h + t, [-100] * len(p) + head_labels + t))
    return rows


def num_self_label_steps(n_items: int, settings: SelfLabelConfig) -> int:
    """Optimizer steps of the fine-tune over ``n_items`` relabelled completions:
    ``epochs * ceil(n_items / batch_size)``."""
    return settings.epochs * -(-n_items // settings.batch_size)


def self_label_warmup(
    model: Any,
    tokenizer: Any,
    prompts: PromptBuilder,
    items: Sequence[Relabelled],
    trainer: TrainerConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    on_step: Callable[[int, dict[str, float]], None],
    seed: int = 0,
) -> int:
    """Fine-tune on the relabelled completions (module docstring, step 6): ``trainer.self_label``'s
    ``epochs`` passes in batches of ``batch_size``, reshuffled every pass (``seed``), loss on the
    tokens ``loss_on`` names; bf16 autocast when ``trainer.bf16``, gradients clipped to
    ``trainer.max_grad_norm``. ``on_step(i, metrics)`` receives ``self_label/loss`` (nats per
    labelled token), ``self_label/lr`` and ``self_label/grad_norm``.

    Returns:
        Number of optimizer steps taken (0 without items).
    """
    settings = trainer.self_label
    rows = label_rows(tokenizer, prompts, items, settings.loss_on)
    batches = padded_batches(rows, settings.batch_size, settings.epochs, tokenizer.pad_token_id, random.Random(seed))
    return train_on_batches(model, batches, optimizer, scheduler, on_step, bf16=trainer.bf16,
                            max_grad_norm=trainer.max_grad_norm, prefix="self_label")
