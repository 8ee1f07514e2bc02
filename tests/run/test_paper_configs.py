"""The RLCR paper's runs (conf/experiment/paper/) and what they need.

- Each paper experiment composes, validates and carries the published values.
- The data they read: the SQuAD-normalised exact match of HotpotQA, the HotpotQA-Modified build
  script (scripts/make_hotpotqa_nocontext.py) on rows shaped like HotpotQA's distractor split,
  local copies through ``data.path``, the start-up failure when math-verify is missing.
- ``trainer.warmup_ratio`` and ``algo.mask_truncated`` (hand-worked losses).
- Each experiment run end to end with every size shrunk: tiny model, CPU, the fixture rows of
  tests/fixtures/ (shaped like the real datasets' rows), no DeepSpeed, no W&B.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from calibrl.config import ConfigError, rl_warmup_steps
from calibrl.run.validate import validate
from calibrl.data import build_splits
from calibrl.data.sources import Example, exact_match, squad_exact_match, squad_normalize
from calibrl.rl.rollout import _truncated
from calibrl.cli import CONF_DIR
from helpers import EOS, FIXTURES, REPO, STOP, hand_rollout, make_trainer

HOTPOT_TRAIN = FIXTURES / "hotpot_qa_distractor_train.jsonl"
HOTPOT_VALIDATION = FIXTURES / "hotpot_qa_distractor_validation.jsonl"
BIG_MATH = FIXTURES / "big_math_digits.jsonl"
PAPER = ("hotpotqa_rlcr", "hotpotqa_rlvr", "big_math_rlcr", "big_math_rlvr")


def _compose(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _script():
    spec = importlib.util.spec_from_file_location("make_hotpotqa_nocontext", REPO / "scripts" / "make_hotpotqa_nocontext.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


script = _script()


@pytest.fixture(scope="module")
def hotpot_dir(tmp_path_factory) -> Path:
    """The build script's output on the fixture rows: train.jsonl (8 rows) and test.jsonl (3)."""
    out = tmp_path_factory.mktemp("hotpot") / "modified"
    assert script.main(["--out", str(out), "--train-file", str(HOTPOT_TRAIN), "--validation-file", str(HOTPOT_VALIDATION)]) == 0
    return out


# --------------------------------------------------------------------------- composed values

# The published values (sources in conf/experiment/paper/_common.yaml): per run, key -> value.
COMMON = {
    "model.kind": "hf", "model.name_or_path": "Qwen/Qwen2.5-7B", "algo.group_size": 32, "algo.temperature": 0.7,
    "algo.beta": 0.0, "algo.scale_rewards": False, "algo.ppo_epochs": 1, "objective.combine": "sum",
    "deepspeed.enabled": True, "deepspeed.stage": 2, "trainer.bf16": True, "trainer.sft.enabled": False,
    "trainer.warmup_steps": 0, "seed": 43,
}
HOTPOT = {
    "data.path": "mehuldamani/hotpot_qa", "data.verifier": "squad_em", "data.fields.question": "problem",
    "trainer.lr": 1e-6, "trainer.lr_scheduler": "constant_with_warmup", "trainer.warmup_ratio": 0.05,
    "algo.max_new_tokens": 1536, "algo.mask_truncated": False, "trainer.micro_batch_size": 8,
}
MATH = {
    "data.path": "mehuldamani/big-math-digits", "data.verifier": "math_verify", "data.fields.question": "problem",
    "trainer.lr": 5e-6, "trainer.lr_scheduler": "linear", "trainer.warmup_ratio": 0.2,
    "algo.max_new_tokens": 4096, "algo.mask_truncated": True, "trainer.micro_batch_size": 6,
}
RLCR = {"correctness": 0.5, "brier": 0.5, "format": 0.5}
RLVR = {"correctness": 0.5, "format": 0.5}
EXPECTED = {
    "hotpotqa_rlcr": (HOTPOT, RLCR, 21),  # warm-up: ceil(0.05 x 417 steps) = 21
    "hotpotqa_rlvr": (HOTPOT, RLVR, 21),
    "big_math_rlcr": (MATH, RLCR, 50),  # ceil(0.2 x 250 steps) = 50
    "big_math_rlvr": (MATH, RLVR, 50),
}


def test_every_paper_experiment_file_is_tested():
    runs = {p.stem for p in (CONF_DIR / "experiment" / "paper").glob("*.yaml") if not p.stem.startswith("_")}
    assert runs == set(PAPER)


@pytest.mark.parametrize("name", PAPER)
def test_paper_experiment_has_the_published_values(name):
    cfg = _compose([f"experiment=paper/{name}"])
    validate(cfg)
    values, weights, warmup = EXPECTED[name]
    for key, value in {**COMMON, **values}.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert dict(cfg.reward.weights) == weights
    assert rl_warmup_steps(cfg.trainer) == warmup
    assert cfg.experiment_name == f"paper_{name}"


def test_warmup_ratio_and_steps():
    assert rl_warmup_steps(_compose([]).trainer) == 2  # ratio unset: trainer.warmup_steps
    assert rl_warmup_steps(_compose(["trainer.warmup_ratio=0.1", "trainer.warmup_steps=0", "trainer.max_steps=36"]).trainer) == 4
    with pytest.raises(ConfigError, match="both set"):
        validate(_compose(["experiment=paper/hotpotqa_rlcr", "trainer.warmup_steps=5"]))
    with pytest.raises(ConfigError, match=r"warmup_ratio must be in \[0, 1\]"):
        validate(_compose(["trainer.warmup_ratio=1.5", "trainer.warmup_steps=0"]))


# --------------------------------------------------------------------------- verifiers


@pytest.mark.parametrize(
    ("answer", "reference", "match"),
    [
        ("The Beatles", "Beatles", True),  # articles go
        ("an apple", "apple", True),
        ("Theatre", "atre", False),  # ... only as whole words
        ("U.S.A.", "USA", True),  # punctuation goes
        ("Arthurs Magazine", "Arthur's Magazine", True),
        ("1,000", "1000", True),
        ("  yes ", "Yes.", True),  # case and whitespace
        ("Paris", "Paris, France", False),  # a partial answer is wrong
        ("Greenwich Village", "Greenwich Village, New York City", False),
    ],
)
def test_squad_exact_match_hand_cases(answer, reference, match):
    assert squad_exact_match(answer, Example("q", "?", reference)) == float(match)


def test_squad_normalize_is_the_squad_order():
    # lower -> punctuation -> articles -> whitespace: "The-End" loses the hyphen first, so "theend" is
    # one word and keeps its "the".
    assert squad_normalize("  The-End of  THE  road. ") == "theend of road"
    assert exact_match("The Beatles", Example("q", "?", "Beatles")) == 0.0  # what `exact` would say


def test_math_verify_without_the_package_fails_at_start_up(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify -> ImportError
    cfg = _compose(["experiment=paper/big_math_rlcr", f"data.path={BIG_MATH}", "data.eval_size=4"])
    with pytest.raises(ValueError, match="needs the math-verify package: pip install math-verify"):
        build_splits(**OmegaConf.to_container(cfg.data, resolve=True))


# --------------------------------------------------------------------------- HotpotQA-Modified build script


def test_script_removes_two_paragraphs_and_keeps_ids(hotpot_dir):
    raw = {r["id"]: r for r in _jsonl(HOTPOT_TRAIN)}
    rows = _jsonl(hotpot_dir / "train.jsonl")
    assert [r["id"] for r in rows] == list(raw)  # every fixture row, in order, under its HotpotQA id
    assert len(_jsonl(hotpot_dir / "test.jsonl")) == 3
    for row in rows:
        src = raw[row["id"]]
        gold = set(src["supporting_facts"]["title"])
        paragraphs = dict(zip(src["context"]["title"], src["context"]["sentences"]))
        assert set(row) == {"id", "problem", "answer", "type", "level", "source", "gold_removed", "removed_titles"}
        assert (row["answer"], row["type"], row["level"], row["source"]) == (src["answer"], src["type"], src["level"], "hotpot")
        assert len(set(row["removed_titles"])) == 2 and set(row["removed_titles"]) <= set(paragraphs)
        assert row["gold_removed"] == len(gold & set(row["removed_titles"]))
        # 10 paragraphs - 2 = 8 left, numbered 0..7, untitled; the removed ones' text is gone
        assert row["problem"].startswith(f"Question: {src['question']} \n\n Your answer will be verified")
        assert [f"Paragraph {i} \n\n" in row["problem"] for i in range(9)] == [True] * 8 + [False]
        for title, sentences in paragraphs.items():
            assert (sentences[0] in row["problem"]) == (title not in row["removed_titles"]), title


def test_script_draws_each_removal_case_a_third_of_the_time():
    row = script.parse_row(_jsonl(HOTPOT_TRAIN)[1])  # 2 gold titles, 3 supporting facts
    rng = random.Random(0)
    counts = [0, 0, 0]
    for _ in range(600):
        gold_removed, titles = script.titles_to_remove(row, rng)
        counts[gold_removed] += 1
        assert len(set(titles)) == 2 and len(set(titles) & set(row.support_titles)) == gold_removed
    assert all(150 < c < 250 for c in counts), counts  # 200 each expected; binomial sd ~11.5


def test_script_reads_the_original_release_layout_and_is_seeded(hotpot_dir, tmp_path):
    # hotpot_train_v1.1.json: a JSON list, `_id`, context [[title, sentences]], facts [[title, sent_id]]
    original = [
        {"_id": r["id"], "question": r["question"], "answer": r["answer"], "type": r["type"], "level": r["level"],
         "context": [list(p) for p in zip(r["context"]["title"], r["context"]["sentences"])],
         "supporting_facts": [list(f) for f in zip(r["supporting_facts"]["title"], r["supporting_facts"]["sent_id"])]}
        for r in _jsonl(HOTPOT_TRAIN)
    ]
    (tmp_path / "train.json").write_text(json.dumps(original))
    script.main(["--out", str(tmp_path / "a"), "--train-file", str(tmp_path / "train.json")])
    assert (tmp_path / "a" / "train.jsonl").read_text() == (hotpot_dir / "train.jsonl").read_text()
    assert not (tmp_path / "a" / "test.jsonl").exists()  # only the splits given are written
    script.main(["--out", str(tmp_path / "b"), "--train-file", str(HOTPOT_TRAIN), "--seed", "1"])
    assert (tmp_path / "b" / "train.jsonl").read_text() != (hotpot_dir / "train.jsonl").read_text()


def test_script_closed_book_and_length_filter(tmp_path):
    script.main(["--out", str(tmp_path / "cb"), "--train-file", str(HOTPOT_TRAIN), "--mode", "closed_book"])
    for row in _jsonl(tmp_path / "cb" / "train.jsonl"):
        assert "Paragraph" not in row["problem"] and "Supporting Information" not in row["problem"]
        assert row["gold_removed"] == 2 and len(row["removed_titles"]) == 10
    script.main(["--out", str(tmp_path / "short"), "--train-file", str(HOTPOT_TRAIN), "--max-chars", "1450"])
    short = _jsonl(tmp_path / "short" / "train.jsonl")
    assert 0 < len(short) < 8 and all(len(r["problem"]) < 1450 for r in short)


# --------------------------------------------------------------------------- local copies


def test_hotpotqa_config_reads_the_script_output(hotpot_dir):
    cfg = _compose(["experiment=paper/hotpotqa_rlcr", f"data.path={hotpot_dir}"])
    splits = build_splits(**OmegaConf.to_container(cfg.data, resolve=True))
    # a directory: its train and test splits, as the hub copy
    assert sorted(e.id for e in splits.train) == sorted(r["id"] for r in _jsonl(HOTPOT_TRAIN))
    assert sorted(e.id for e in splits.eval) == sorted(r["id"] for r in _jsonl(HOTPOT_VALIDATION))
    assert {e.slice for e in splits.train + splits.eval} <= {"0", "1", "2"}
    example = next(e for e in splits.eval if e.answer == "YG Entertainment")
    assert example.question.startswith("Question: 2014 S/S is the debut album")
    assert splits.is_correct("yg entertainment.", example) and not splits.is_correct("YG", example)


def test_single_local_file_holds_eval_rows_out(hotpot_dir):
    # One table: data.eval_split (test) does not apply; eval_size rows are held out of the file.
    cfg = _compose(["experiment=paper/hotpotqa_rlcr", f"data.path={hotpot_dir / 'train.jsonl'}", "data.eval_size=2"])
    splits = build_splits(**OmegaConf.to_container(cfg.data, resolve=True))
    ids = {r["id"] for r in _jsonl(hotpot_dir / "train.jsonl")}
    assert len(splits.eval) == 2 and len(splits.train) == 6
    assert {e.id for e in splits.train} | {e.id for e in splits.eval} == ids
    cfg = _compose(["experiment=paper/big_math_rlcr", f"data.path={BIG_MATH}", "data.eval_size=4", "data.verifier=exact"])
    splits = build_splits(**OmegaConf.to_container(cfg.data, resolve=True))
    assert (len(splits.train), len(splits.eval)) == (8, 4)
    assert {e.slice for e in splits.train + splits.eval} <= {"orca_math", "cn_k12", "synthetic_math", "big_math"}


# --------------------------------------------------------------------------- algo.mask_truncated


def test_truncated_rows_hand_cases():
    ids = torch.tensor([
        [5, 7, EOS, 9, 9],  # sampled EOS: finished
        [5, 7, 8, 9, 10],  # no EOS, no stop string, 5 = max_new_tokens tokens: cut off
        [5, 7, 8, 9, 10],  # ended on the stop string at the cap: finished
        [5, 7, 8, 9, 10],  # same, trailing whitespace after it
    ])
    texts = ["ab", "abcde", "y</confidence>", "y</confidence>\n"]
    assert _truncated(ids, texts, {EOS}, STOP, 5).tolist() == [False, True, False, False]
    assert _truncated(ids, texts, {EOS}, None, 5).tolist() == [False, True, True, True]
    # a batch narrower than the cap: generate stopped because every row had finished
    assert _truncated(ids, texts, {EOS}, STOP, 6).tolist() == [False] * 4


def test_masking_a_truncated_row_equals_removing_it(tiny, builder):  # noqa: F811 (fixtures)
    model, tok = tiny
    rollout = replace(hand_rollout(tok, builder), truncated=torch.tensor([True, False, False, False]))
    rest = torch.tensor([1, 2, 3])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])

    def update(r, a, **settings):
        return make_trainer(copy.deepcopy(model), tok, builder, **settings).update(r, a)

    # Row lengths 4, 2, 3, 1; ratio 1, so a token's loss is -A. With row 0 (truncated) masked:
    #   token_mean:          -(-1*2 + 0.5*3 - 0.5*1) / (2 + 3 + 1) tokens = -(-1) / 6 = 1/6
    #   seq_mean_token_mean: -(-1 + 0.5 - 0.5) / 3 rows                    = -(-1) / 3 = 1/3
    # the loss (and gradient) of the same update on rows 1..3 alone.
    for agg, expected in (("token_mean", 1 / 6), ("seq_mean_token_mean", 1 / 3)):
        masked = update(rollout, adv, loss_agg=agg, mask_truncated=True)
        removed = update(rollout.select(rest), adv[rest], loss_agg=agg)
        assert masked["loss"] == pytest.approx(expected, abs=1e-6), agg
        assert removed["loss"] == pytest.approx(masked["loss"], abs=1e-7), agg
        assert masked["grad_norm"] == pytest.approx(removed["grad_norm"], rel=1e-5), agg
    # Off (the default): the row counts, -(1*4 - 1*2 + 0.5*3 - 0.5*1) / 10 = -0.3.
    assert update(rollout, adv)["loss"] == pytest.approx(-0.3, abs=1e-6)


# --------------------------------------------------------------------------- shrunk end-to-end runs

# debug=default sizes (2 RL steps of 2 prompts x 2 samples, 8 new tokens); fp32, since bf16 autocast
# is about twice slower on a CPU without bf16 matrix units.
SHRINK = [
    "model=tiny", "debug=default", "deepspeed=none", "trainer.device=cpu", "trainer.bf16=false",
    "logger.mode=disabled", "trainer.save_checkpoint=false", "eval.n_bootstrap=0",
]


@pytest.mark.parametrize("name", PAPER)
def test_paper_experiment_runs_shrunk(name, hotpot_dir, tmp_path):
    from calibrl.run.pipeline import run

    if name.startswith("hotpotqa"):
        data = [f"data.path={hotpot_dir}"]  # the script's output, read as the hub copy is (train/test)
    else:
        # One local file, eval rows held out of it; `exact` because math-verify is an optional
        # package (the composed verifier is asserted above); the fixture answers are plain numbers.
        data = [f"data.path={BIG_MATH}", "data.eval_size=4", "data.verifier=exact"]
    cfg = _compose([f"experiment=paper/{name}", *SHRINK, *data])
    assert cfg.trainer.warmup_ratio is not None and cfg.algo.max_new_tokens == 8  # the recipe, shrunk
    results = run(cfg, tmp_path)
    records = _jsonl(tmp_path / "metrics.jsonl")
    rl = [r for r in records if "train/rl_step" in r]
    assert [r["train/rl_step"] for r in rl] == [1, 2]
    assert not any("sft/loss" in r for r in records)  # the paper's runs start from the base model
    for r in rl:
        assert 0.0 <= r["train/truncated_fraction"] <= 1.0 and math.isfinite(r["rewards/total/mean"])
        assert ("rewards/brier/mean" in r) == name.endswith("rlcr")
    assert set(results) == {"start", "final"}  # no warm-up: evals before and after RL only
    assert len([r for r in records if f"eval/{cfg.data.name}/accuracy" in r]) == 2
