"""Tune the self-labelled warm-up (``trainer.self_label``) on a validation split, never on the
held-out eval items.

The warm-up's greedy answers come from the SFT model, so they are computed once and every
candidate setting is trained from the same SFT weights on them; each candidate is then evaluated
(greedy, the run's ``eval`` settings) on a validation set: ``--val-size`` questions of the run's
dataset drawn with ``--val-seed`` (default 10000), less any question of the held-out eval set.
reasoning-gym draws item ``i`` of a dataset from seed ``seed + i``, so two seeds closer than the
sizes give the same items (``chain_sum``'s held-out seed 2 and training seed 1 share 500); 10000 lies
past both ranges, and only questions that recur by chance (short sums) are left to drop. The SFT model itself
is evaluated first, as the line every candidate is read against. Prints one row per candidate:
accuracy, format rate, the stated confidence's ECE and AUROC, and ``numeric_answer_leak``, the
share of answers that are a confidence-grid string (``0.05``) where the SFT model wrote none: the
failure of training confidence tokens alone (the answer slot learns to write confidences).

  PYTHONPATH=src .venv/bin/python scripts/tune_self_label.py seed=0 \\
      --candidate loss_on=confidence,lr=5e-5 --candidate loss_on=completion,lr=5e-5 --candidate loss_on=completion,lr=2e-5

Positional arguments are Hydra overrides of the main config (``experiment=rlcr_selflabel`` and
``trainer.sft.cache=true`` are added first: the SFT warm-up comes from the cache when one matches).
Each ``--candidate`` lists ``trainer.self_label`` fields as ``key=value`` pairs, comma-separated.
Writes ``--out`` (JSON lines, one per row) too.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from calibrl.cli import CONF_DIR, VERSION_BASE
from calibrl.config import SelfLabelConfig
from calibrl.data import build_splits
from calibrl.eval.evaluator import evaluate
from calibrl.rl.self_label import LABEL_SIGNALS, build_label_set, num_self_label_steps, self_label_items, self_label_warmup
from calibrl.run.build import make_optimizer, make_scheduler
from calibrl.run import stages
from calibrl.run.build import build
from calibrl.run.validate import validate

def _candidate(text: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in filter(None, text.split(",")):
        key, _, value = pair.partition("=")
        field = {f.name: f for f in dataclasses.fields(SelfLabelConfig)}.get(key)
        if field is None:
            raise SystemExit(f"--candidate: unknown trainer.self_label field {key!r}")
        kind = type(getattr(SelfLabelConfig(), key))
        try:
            out[key] = kind(value)
        except ValueError:
            raise SystemExit(f"--candidate: trainer.self_label.{key} must be a {kind.__name__}, got {value!r}") from None
    return out


def _is_grid_string(answer: str | None) -> bool:
    return answer is not None and len(answer.strip()) == 4 and answer.strip()[:2] in ("0.", "1.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--candidate", action="append", default=[])
    ap.add_argument("--val-seed", type=int, default=10_000)
    ap.add_argument("--val-size", type=int, default=400)
    ap.add_argument("--out", default="outputs/tune_self_label.jsonl")
    args = ap.parse_args(argv)
    with initialize_config_dir(str(CONF_DIR), version_base=VERSION_BASE):
        cfg = compose("config", overrides=["experiment=rlcr_selflabel", "trainer.sft.cache=true", "logger.mode=disabled",
                                           *args.overrides])
    validate(cfg)
    run_dir = Path(tempfile.mkdtemp(prefix="tune_self_label_"))
    parts = build(cfg, run_dir)
    state = stages.RunState(step=0, results={})
    stages.sft_warm_up(parts, state)
    data = OmegaConf.to_container(cfg.data, resolve=True) | {"eval_seed": args.val_seed, "eval_size": args.val_size,
                                                               "train_size": 0}
    held_out = {e.question for e in parts.splits.eval}
    val = [e for e in build_splits(**data).eval if e.question not in held_out]
    settings = dataclasses.replace(parts.settings.eval, n_bootstrap=0, slice_by=[])
    t = parts.settings.trainer

    def score(name: str) -> dict[str, object]:
        res = evaluate(parts.model, parts.tokenizer, parts.prompts, val, parts.splits.is_correct, parts.reward_fn,
                       settings, dataset="validation", autocast_dtype=parts.autocast_dtype)
        s = res.scalars()
        leak = sum(_is_grid_string(r["answer"]) for r in res.predictions) / max(len(res.predictions), 1)
        row = {"candidate": name, "n": len(val), "accuracy": s["accuracy"], "format_rate": s["format_rate"],
               "ece": s.get("ece", math.nan), "auroc": s.get("auroc", math.nan), "confidence_mean": s.get("confidence_mean", math.nan),
               "expected_confidence_auroc": s.get("expected_confidence/auroc", math.nan),
               "numeric_answer_leak": leak}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        return row

    score("sft")
    sft_state = copy.deepcopy(parts.model.state_dict())
    items = self_label_items(parts.splits.train, t.sft.num_examples, t.self_label.num_examples)
    answered = stages.answer_items(parts, items, LABEL_SIGNALS.get(t.self_label.signal))
    for text in args.candidate or [""]:
        sl = dataclasses.replace(t.self_label, **_candidate(text))
        parts.model.load_state_dict(sft_state)
        labels = build_label_set(answered, sl, t.sft.confidence.grid_step, parts.prompts.fmt, parts.settings.seed)
        total = num_self_label_steps(len(labels.items), sl)
        opt = make_optimizer(parts.model, sl.lr, t.weight_decay)
        sched = make_scheduler("linear", opt, math.ceil(sl.warmup_ratio * total), total)
        self_label_warmup(parts.model, parts.tokenizer, parts.prompts, labels.items,
                          dataclasses.replace(t, self_label=sl), opt, sched, lambda i, m: None,
                          seed=parts.settings.seed)
        score(text or "defaults")
    parts.tracker.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
