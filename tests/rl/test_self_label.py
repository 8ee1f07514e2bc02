"""The self-labelled confidence warm-up's parts (calibrl.rl.self_label): the split, the isotonic
map and the grid labels worked out by hand, the signals, the confidence-only label mask checked
against the tokenizer, and the fine-tune's loss on exactly those tokens."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from calibrl.config import SelfLabelConfig, TrainerConfig
from calibrl.data.example import Example
from calibrl.data.format import CompletionFormat
from calibrl.rewards.parsing import parse_completion
from calibrl.rl.self_label import (
    LABEL_SIGNALS, Answered, Relabelled, agreement, build_label_set, fit_label_map, label_rows, num_self_label_steps,
    round_to_grid, self_label_items, self_label_warmup, split_indices,
)

FMT = CompletionFormat()


def _ok(i: int, answer: str | None = None) -> str:
    """A well-formed completion answering ``answer`` (default ``str(i)``), stated at 0.50."""
    return f"<think>w{i}</think>\n<answer>{answer if answer is not None else i}</answer>\n<confidence>0.50</confidence>"


def _malformed(i: int) -> str:
    return f"<think>w{i}</think>\n<answer>{i}</answer>"  # no confidence: a format failure


def test_split_is_seeded_disjoint_and_covers_every_item():
    fit, label = split_indices(10, 0.6, seed=3)
    assert len(fit) == 6 and len(label) == 4  # round(0.6 * 10)
    assert sorted(fit + label) == list(range(10)) and not set(fit) & set(label)
    assert split_indices(10, 0.6, seed=3) == (fit, label)
    assert split_indices(10, 0.6, seed=4) != (fit, label)
    assert [len(s) for s in split_indices(4, 0.05, seed=0)] == [1, 3]  # round(0.2) = 0 -> at least one fit item
    assert [len(s) for s in split_indices(4, 0.95, seed=0)] == [3, 1]  # round(3.8) = 4 -> at least one label item
    with pytest.raises(ValueError, match="fit_fraction must be in"):
        split_indices(10, 1.0, seed=0)


def test_isotonic_map_by_hand():
    # Pool-adjacent-violators on correctness [0, 1, 0, 0, 1, 1] ordered by signal 0.1 .. 0.6:
    # (1, 0) violate -> pooled 0.5, 0.5; that block and the next 0 violate -> (1 + 0 + 0) / 3.
    # Fit: [0, 1/3, 1/3, 1/3, 1, 1].
    iso = fit_label_map([0.3, 0.1, 0.5, 0.2, 0.6, 0.4], [0, 0, 1, 1, 1, 0])  # the same points, shuffled
    assert iso.predict([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 1, 1])
    # Outside the fitted range: clipped to the end values; between points: linear interpolation,
    # 0.45 is halfway from (0.4, 1/3) to (0.5, 1) -> 2/3.
    assert iso.predict([0.0, 0.45, 0.9]) == pytest.approx([0, 2 / 3, 1])
    with pytest.raises(ValueError, match="non-empty"):
        fit_label_map([], [])


def test_grid_rounding_by_hand():
    # step 0.05: 1/3 -> 0.35 (0.0167 away vs 0.0333), 0.32 -> 0.30, 0.325 is a tie -> the lower 0.30.
    assert round_to_grid([1 / 3, 0.32, 0.325, 2 / 3, 0.0, 0.976, 1.0], 0.05).tolist() == pytest.approx(
        [0.35, 0.30, 0.30, 0.65, 0.0, 1.0, 1.0])
    assert round_to_grid([0.25, 0.26, 0.04], 0.1).tolist() == pytest.approx([0.2, 0.3, 0.0])
    assert [f"{q:.2f}" for q in round_to_grid([1 / 3], 0.05)] == ["0.35"]
    with pytest.raises(ValueError, match="two decimals|2 decimals"):
        round_to_grid([0.5], 0.033)


def test_agreement_by_hand():
    assert agreement("5", ["5", " 5.", "6", None]) == 0.5  # normalize_answer: " 5." == "5"; None disagrees
    assert agreement("Paris", ["paris", "PARIS"]) == 1.0
    assert math.isnan(agreement(None, ["5"])) and math.isnan(agreement("5", []))
    signal = LABEL_SIGNALS.get("agreement")
    a = Answered(Example("q", "?", "5"), _ok(0, "5"), True, samples=("5", "7", "5", "5"))
    assert signal.needs_samples and not signal.needs_answer_prob
    assert signal.value(a, parse_completion(a.completion, FMT)) == 0.75
    with pytest.raises(KeyError, match="valid choices: agreement, answer_prob"):
        LABEL_SIGNALS.get("entropy")


def test_label_set_by_hand():
    # 11 items, fit_fraction 0.6 -> round(6.6) = 7 fit items, 4 label items (which ones: the seeded split).
    fit, label = split_indices(11, 0.6, seed=5)
    answered: list[Answered | None] = [None] * 11
    # Fit: the PAV example of test_isotonic_map_by_hand, plus one malformed completion (wrong, no signal).
    for i, s, c in zip(fit, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0, 1, 0, 0, 1, 1]):
        answered[i] = Answered(Example(f"q{i}", "?", str(i)), _ok(i), bool(c), s)
    answered[fit[6]] = Answered(Example(f"q{fit[6]}", "?", "x"), _malformed(fit[6]), False)
    # Label: signals 0.05 (clipped -> 0), 0.2 (-> 1/3 -> 0.35), 0.45 (-> 2/3 -> 0.65), and a malformed one.
    for i, s, c in zip(label[:3], [0.05, 0.2, 0.45], [0, 1, 1]):
        answered[i] = Answered(Example(f"q{i}", "?", str(i)), _ok(i), bool(c), s)
    answered[label[3]] = Answered(Example(f"q{label[3]}", "?", "x"), _malformed(label[3]), False, 0.9)
    out = build_label_set(answered, SelfLabelConfig(fit_fraction=0.6), 0.05, FMT, seed=5)
    assert (out.fit, out.label) == (fit, label)
    assert [it.example.id for it in out.items] == [f"q{i}" for i in label[:3]]
    assert [it.confidence for it in out.items] == pytest.approx([0.0, 0.35, 0.65])
    assert [it.correct for it in out.items] == [False, True, True]  # the verdicts (loss_on=verified)
    assert out.items[1].head == f"<think>w{label[1]}</think>\n<answer>{label[1]}</answer>\n<confidence>"
    m = out.metrics
    assert (m["self_label/n_fit"], m["self_label/fit_points"], m["self_label/n_label"], m["self_label/n_dropped"]) == (
        7, 6, 3, 1)
    assert m["self_label/fit_accuracy"] == pytest.approx(3 / 7)  # the malformed fit item counts as wrong
    # Labels 0, 0.35, 0.65 against correctness 0, 1, 1: every right answer above the wrong one.
    assert m["self_label/label_auroc"] == 1.0 and m["self_label/signal_auroc"] == 1.0
    assert m["self_label/label_mean"] == pytest.approx(1.0 / 3) and m["self_label/label_accuracy"] == pytest.approx(2 / 3)


def test_without_a_fit_point_every_label_item_is_dropped(caplog):
    answered = [Answered(Example(f"q{i}", "?", "1"), _malformed(i), False) for i in range(4)]
    out = build_label_set(answered, SelfLabelConfig(), 0.05, FMT, seed=0)
    assert out.items == [] and out.metrics["self_label/n_dropped"] == 2 and out.metrics["self_label/fit_points"] == 0
    assert math.isnan(out.metrics["self_label/label_auroc"])
    assert "no well-formed fit completion" in caplog.text


def test_items_come_after_the_sft_demonstrations_and_never_from_eval():
    from omegaconf import OmegaConf

    from calibrl.data import build_splits
    from helpers import compose_config

    cfg = compose_config(["model=tiny", "debug=default"])
    splits = build_splits(**OmegaConf.to_container(cfg.data, resolve=True))
    items = self_label_items(splits.train, 8, 12)
    assert items == list(splits.train[8:20])
    assert not {e.id for e in items} & {e.id for e in splits.train[:8]}
    assert not {e.question for e in items} & {e.question for e in splits.eval}
    fit, label = split_indices(len(items), 0.5, seed=0)
    assert not {items[i].id for i in fit} & {items[i].id for i in label}
    n = len(splits.train)  # fewer than data.train_size=32: train rows that share a question with eval are dropped
    with pytest.raises(ValueError, match=f"needs {n + 1} training examples, the training set has {n}$"):
        self_label_items(splits.train, 8, n - 7)


HEAD = "<think>2+3 is 5</think>\n<answer>5</answer>\n<confidence>"


def test_confidence_only_mask_covers_the_value_the_closing_tag_and_eos(tiny, builder):
    _, tok = tiny
    item = Relabelled(Example("q", "What is 2 + 3?", "5"), HEAD, 0.35)
    ((ids, labels),) = label_rows(tok, builder, [item], "confidence")
    prompt = tok(builder.prompt(item.example), add_special_tokens=False).input_ids
    # The row is the tokenization of prompt + the whole relabelled completion (SmolLM2 splits
    # digits and tags, so tokenizing head and tail apart changes nothing).
    assert ids == prompt + tok(HEAD + "0.35</confidence>" + tok.eos_token, add_special_tokens=False).input_ids
    learnt = [t for t, y in zip(ids, labels) if y != -100]
    assert [tok.decode([t]) for t in learnt] == ["0", ".", "3", "5", "</", "confidence", ">", tok.eos_token]
    assert labels[-len(learnt):] == learnt and all(y == -100 for y in labels[: -len(learnt)])
    ((ids2, labels2),) = label_rows(tok, builder, [item], "completion")
    assert ids2 == ids and labels2 == [-100] * len(prompt) + ids[len(prompt):]
    # verified: the whole completion of a verified-correct answer, the tail alone of a wrong one
    right = Relabelled(item.example, HEAD, 0.35, correct=True)
    ((ids3, labels3), (ids4, labels4)) = label_rows(tok, builder, [right, item], "verified")
    assert ids3 == ids4 == ids and labels3 == labels2 and labels4 == labels
    with pytest.raises(ValueError, match="valid choices: completion, confidence, verified"):
        label_rows(tok, builder, [item], "answer")


def test_fine_tune_takes_its_loss_on_the_confidence_tokens_only(tiny, builder):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    item = Relabelled(Example("q", "What is 2 + 3?", "5"), HEAD, 0.35)
    ((ids, labels),) = label_rows(tok, builder, [item], "confidence")
    with torch.no_grad():  # the expected loss: mean cross-entropy of the 8 tail tokens
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # [T, V]
    n_tail = sum(y != -100 for y in labels)
    expected = -sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n_tail, len(ids))) / n_tail
    seen = []
    trainer = TrainerConfig(bf16=False, self_label=SelfLabelConfig(epochs=1, batch_size=1, loss_on="confidence"))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay, the loss is the first one's
    steps = self_label_warmup(model, tok, builder, [item], trainer, opt, None, lambda i, m: seen.append(m))
    assert steps == 1 and set(seen[0]) == {"self_label/loss", "self_label/lr", "self_label/grad_norm"}
    assert seen[0]["self_label/loss"] == pytest.approx(expected, rel=1e-4)
    # 3 items, batches of 2, 2 epochs -> 2 * ceil(3 / 2) = 4 steps.
    settings = SelfLabelConfig(epochs=2, batch_size=2)
    assert num_self_label_steps(3, settings) == 4
    trainer.self_label = settings
    assert self_label_warmup(model, tok, builder, [item] * 3, trainer, opt, None, lambda i, m: None) == 4
    assert self_label_warmup(model, tok, builder, [], trainer, opt, None, lambda i, m: None) == 0
