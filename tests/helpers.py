"""Helpers shared by several test files (import with ``from helpers import ...``; ``tests/`` is on
``sys.path``, see ``pyproject.toml``). Fixtures live in ``conftest.py``; fault injection in
``faults.py``.

- :func:`load_cases`: the repository's copy of the shared input cases (``tests/fixtures/cases``).
- :func:`compose_config`, :func:`read_records`: the real training config and a run's metrics file.
- :func:`tiny_spec`, :func:`hand_rollout`, :func:`make_trainer`: the tiny random Llama, a
  hand-made rollout and a GRPO trainer over it; :func:`text_rollout` (:data:`SCRIPTED_TEXTS`) and
  :func:`format_warm_up`: scripted completions and a copy of the model taught to write them.
- :func:`write_run_dir`, :class:`FakeApiRun`, :class:`FakeWandbApi`: ``calibrl-compare`` input
  (run directories of arms ``a`` and ``b`` x seeds 0 and 1, :data:`RUN_EVALS`, with metrics worked
  out by hand) and the same runs behind a fake ``wandb.Api``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from calibrl.cli import CONF_DIR
from calibrl.config import AlgoConfig, ObjectiveConfig, TrainerConfig
from calibrl.data.example import Example
from calibrl.data.sources import exact_match
from calibrl.models import ModelSpec
from calibrl.rewards import RewardFunction
from calibrl.rl.engine import TorchEngine
from calibrl.rl.grpo import GRPOTrainer
from calibrl.rl.rollout import Rollout, completion_logprobs

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
CASES_DIR = FIXTURES / "cases"
SHARED_CASES_DIR = REPO.parent / "shared" / "cases"

STOP = "</confidence>"
EOS = 2  # SmolLM2: <|im_end|> is both EOS and pad
RLCR = {"correctness": 1.0, "brier": 1.0, "format": 0.5}
EXAMPLES = [
    Example("e0", "What is 2 + 3?", "5"),
    Example("e1", "Compute 12 + 30 - 7, then double-check the result carefully.", "35"),
    Example("e2", "What is 9 - 4?", "5"),
]
LENGTHS = [4, 2, 3, 1]  # completion tokens of the 4 rows of hand_rollout; n_tokens = 10


def load_cases(name: str) -> list[dict[str, Any]]:
    """Every case (one JSON object per non-blank line) of ``tests/fixtures/cases/<name>``.

    A missing file is an error, never a skip: a test that silently loads no cases would pass
    while checking nothing.

    Raises:
        FileNotFoundError: no such case file.
        ValueError: a line is not valid JSON, a case is not an object, or the file holds no case.
    """
    path = CASES_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"case file {path} does not exist")
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON: {err}") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: a case must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise ValueError(f"case file {path} holds no case")
    return rows


def case_id(row: dict[str, Any]) -> str:
    """Test id of a case: its ``name``."""
    return str(row["name"])


def compose_config(overrides: list[str]):
    """The real training config (``conf/config.yaml``) composed with ``overrides``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a ``metrics.jsonl`` file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def tiny_spec() -> ModelSpec:
    """The ``model=tiny`` preset: a random 2-layer Llama with SmolLM2's tokenizer."""
    fields = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    return ModelSpec(**fields, cache_dir=os.environ.get("CALIBRL_CACHE", "~/.cache/calibrl") + "/models")


def hand_rollout(tok, builder) -> Rollout:
    """B=2 prompts x G=2 completions of random tokens with the masks given by LENGTHS."""
    enc = tok([builder.prompt(e) for e in EXAMPLES[:2]], return_tensors="pt", padding=True, add_special_tokens=False)
    gen = torch.Generator().manual_seed(0)
    comp = torch.randint(3, 5000, (4, 5), generator=gen)
    mask = (torch.arange(5)[None] < torch.tensor(LENGTHS)[:, None]).long()
    return Rollout(
        enc.input_ids.repeat_interleave(2, dim=0), enc.attention_mask.repeat_interleave(2, dim=0),
        comp, mask, [""] * 4, torch.tensor([0, 0, 1, 1]),
    )


# B=2 prompts x G=2: e0 (gold 5) right+confident, right but malformed confidence;
# e1 (gold 35) wrong, and no confidence at all.
SCRIPTED_TEXTS = [
    "<think>2+3</think><answer>5</answer><confidence>0.80</confidence>",
    "<think>2+3</think><answer>5</answer><confidence>high</confidence>",
    "<think>12+30-7</think><answer>36</answer><confidence>0.30</confidence>",
    "<think>12+30-7</think><answer>35</answer>",
]


def text_rollout(tok, builder, texts=SCRIPTED_TEXTS, examples=EXAMPLES[:2]) -> Rollout:
    """Four completions ``texts`` (default :data:`SCRIPTED_TEXTS`), two per prompt of ``examples``,
    tokenized as the policy would have written them."""
    enc = tok([builder.prompt(e) for e in examples], return_tensors="pt", padding=True, add_special_tokens=False)
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    width = max(map(len, ids))
    comp = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        comp[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return Rollout(enc.input_ids.repeat_interleave(2, dim=0), enc.attention_mask.repeat_interleave(2, dim=0),
                   comp, mask, list(texts), torch.tensor([0, 0, 1, 1]))


def format_warm_up(model, rollout, steps=40):
    """Teach a copy of the random tiny model to write the two well-formed completions (rows 0 and
    2), so that it puts some mass on the confidence grid (as the SFT warm-up does before RL; without
    it the grid's probability is ~e^-40 and so is the path's gradient)."""
    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rows = rollout.select(torch.tensor([0, 2]))
    for _ in range(steps):
        opt.zero_grad()
        (-completion_logprobs(model, rows).sum()).backward()
        opt.step()
    return model


def rl_groups(**settings: Any) -> tuple[AlgoConfig, TrainerConfig, ObjectiveConfig]:
    """The ``algo``, ``trainer`` and ``objective`` settings of a small test trainer (B=2, G=2, at
    most 6 new tokens, micro-batches of 2, no bf16); each keyword sets the field of that name in
    whichever of the three has it (e.g. ``beta=0.1``, ``micro_batch_size=4``, ``combine="segment"``).

    Raises:
        TypeError: a keyword that is no field of any of them.
    """
    groups = (AlgoConfig(group_size=2, prompts_per_step=2, max_new_tokens=6),
              TrainerConfig(micro_batch_size=2, bf16=False), ObjectiveConfig())
    for k, v in settings.items():
        owner = next((g for g in groups if k in g.__dataclass_fields__), None)
        if owner is None:
            raise TypeError(f"no setting {k!r} in algo, trainer or objective")
        setattr(owner, k, v)
    return groups


def make_trainer(model, tok, builder, examples=EXAMPLES, **settings) -> GRPOTrainer:
    """A GRPO trainer (RLCR reward, AdamW lr 1e-3) over ``examples``, with
    :func:`rl_groups` (``settings`` override them)."""
    engine = TorchEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), max_grad_norm=1.0)
    return GRPOTrainer(
        engine, tok, builder, examples, lambda a, e: a is not None and exact_match(a, e) >= 1,
        RewardFunction(RLCR), *rl_groups(**settings),
    )


# --- calibrl-compare input ---------------------------------------------------------------------
def _pred(conf, correct, ok=True):
    return {"confidence": conf if ok else None, "correct": correct, "format_ok": ok}


# Prediction sets of two samples, with their metrics worked out by hand (10 uniform ECE bins).
# P_A: q 0.9 right and wrong: accuracy 0.5; one bin, ECE |0.5 - 0.9| = 0.4; Brier (0.01 + 0.81) / 2
#      = 0.41; AUROC 0.5 (a tie).
# P_B: 0.8 right, 0.2 wrong: accuracy 0.5; two bins, each gap 0.2 -> ECE 0.2; Brier 0.04; AUROC 1.
# P_C: 0.6 right twice: accuracy 1; ECE 0.4; Brier 0.16; AUROC undefined (one class).
# P_D: 0.5 right, then a format failure (wrong): accuracy 0.5, format rate 0.5; over the one
#      well-formed row ECE 0.5, Brier 0.25, AUROC undefined.
P_A = [_pred(0.9, 1), _pred(0.9, 0)]
P_B = [_pred(0.8, 1), _pred(0.2, 0)]
P_C = [_pred(0.6, 1), _pred(0.6, 1)]
P_D = [_pred(0.5, 1), _pred(None, 0, ok=False)]
_NAN = float("nan")
_LOGGED = {  # what calibrl-train logs as eval/<dataset>/<metric> for each set (read from W&B)
    id(P_A): {"accuracy": 0.5, "format_rate": 1.0, "ece": 0.4, "brier": 0.41, "auroc": 0.5, "confidence_mean": 0.9},
    id(P_B): {"accuracy": 0.5, "format_rate": 1.0, "ece": 0.2, "brier": 0.04, "auroc": 1.0, "confidence_mean": 0.5},
    id(P_C): {"accuracy": 1.0, "format_rate": 1.0, "ece": 0.4, "brier": 0.16, "auroc": _NAN, "confidence_mean": 0.6},
    id(P_D): {"accuracy": 0.5, "format_rate": 0.5, "ece": 0.5, "brier": 0.25, "auroc": _NAN, "confidence_mean": 0.5},
}
# Eval points per run (arm, seed): sft (RL step 0), step2, final (after RL step 4).
RUN_EVALS = {
    ("a", 0): {"sft": P_A, "step2": P_B, "final": P_C},
    ("a", 1): {"sft": P_A, "step2": P_C, "final": P_B},
    ("b", 0): {"sft": P_D, "step2": P_A, "final": P_A},
    ("b", 1): {"sft": P_D, "step2": P_B, "final": P_A},
}
# train/accuracy per RL step 1..4 (train/ece is 1 - it); a1 logged NaN at step 4 (e.g. no
# well-formed rollout).
TRAIN_ACCURACY = {("a", 0): [0.1, 0.2, 0.3, 0.4], ("a", 1): [0.3, 0.4, 0.5, _NAN], ("b", 0): [0.5] * 4,
                  ("b", 1): [0.7] * 4}


def run_records(arm: str, seed: int, last_rl: int = 4) -> list[dict]:
    """The metrics.jsonl records of run (arm, seed): SFT step 1 and its eval, RL steps at global
    steps 2..5 (train/rl_step 1..``last_rl``), eval after RL step 2 and, when ``last_rl`` is 4,
    the final eval after RL step 4."""
    evals = RUN_EVALS[(arm, seed)]

    def ev(stage, step):
        return {"step": step} | {f"eval/ds/{k}": v for k, v in _LOGGED[id(evals[stage])].items()} | {
            "eval/ds/slice/x/accuracy": 0.0}  # deeper keys are not metrics of the dataset

    out = [{"step": 1, "sft/loss": 1.0}, ev("sft", 1)]
    for rl in range(1, last_rl + 1):
        acc = TRAIN_ACCURACY[(arm, seed)][rl - 1]
        out.append({"step": 1 + rl, "train/rl_step": rl, "train/accuracy": acc, "train/ece": 1 - acc, "train/brier": 0.25,
                    "train/auroc": 0.5, "train/confidence_mean": 0.5, "rewards/total/mean": acc})
        if rl == 2:
            out.append(ev("step2", 1 + rl))
    if last_rl == 4:
        out.append(ev("final", 5))
    return out


def write_run_dir(root: Path, arm: str, seed: int, *, brier: float = 0.5, finished: bool = True,
                  name: str | None = None, like: tuple[str, int] | None = None) -> Path:
    """A ``calibrl-train`` run directory ``root/<name or arm+seed>`` of (arm, seed) (config with
    ``experiment_name``, ``seed``, ``reward.weights.brier``) holding the records and predictions
    of run ``like`` (default: itself); unfinished: stopped after RL step 3, no final eval."""
    like = like or (arm, seed)
    d = root / (name or f"{arm}{seed}")
    d.mkdir()
    (d / "config_resolved.yaml").write_text(
        f"experiment_name: {arm}\nseed: {seed}\nreward:\n  weights:\n    brier: {brier}\n")
    records = run_records(*like, 4 if finished else 3)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # NaN written as NaN
    for stage, rows in RUN_EVALS[like].items():
        if finished or stage != "final":
            lines = (json.dumps(r | {"id": f"q{i}"}) + "\n" for i, r in enumerate(rows))
            (d / f"eval_{stage}.jsonl").write_text("".join(lines))
    return d


class FakeApiRun:
    """A W&B run of (arm, seed) as ``wandb.Api().runs`` yields it, with :func:`run_records` as
    its history (SFT enabled, no raw-model eval)."""

    def __init__(self, arm: str, seed: int, finished: bool = True):
        self.id = f"{arm}{seed}"
        self.config = {"experiment_name": arm, "seed": seed, "trainer": {"sft": {"enabled": True}},
                       "eval": {"raw_model": False}, "_wandb": {"x": 1}}
        self.summary_metrics = {"final/accuracy": 0.5} if finished else {}
        self._records = run_records(arm, seed, 4 if finished else 3)

    def scan_history(self) -> list[dict]:
        """The records, merged per step under ``_step`` as W&B does, NaN as the string ``"NaN"``."""
        rows: dict[int, dict] = {}
        for rec in self._records:
            rows.setdefault(rec["step"], {"_step": rec["step"], "_runtime": 1.0}).update(
                {k: ("NaN" if isinstance(v, float) and v != v else v) for k, v in rec.items() if k != "step"})
        return list(rows.values())


class FakeWandbApi:
    """A ``wandb.Api`` stand-in whose ``runs`` returns the given runs and records each call in
    ``calls`` as ``(path, filters)``."""

    def __init__(self, runs: list[FakeApiRun]):
        self._runs, self.calls = runs, []

    def runs(self, path: str, filters: dict | None = None) -> list[FakeApiRun]:
        self.calls.append((path, filters))
        return self._runs
