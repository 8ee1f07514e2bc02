"""Data sources and their verifiers.

Sources (``data.source``):

- ``reasoning_gym``: ``reasoning_gym.create_dataset(task, size=, seed=, **task_kwargs)``; the
  task's own ``score_answer`` is the verifier. The slice of an example is built from the
  metadata fields named in ``data.slice_fields`` (e.g. ``num_terms=2,num_digits=1``).
- ``hf``: rows loaded with :func:`datasets.load_dataset` from a hub id or a local
  ``.jsonl``/``.json``/``.parquet``/``.csv`` file, with a field mapping
  (``question``, ``answer``, optional ``id`` and ``slice``). Verifier: ``data.verifier``. A
  single local file is one table: ``data.eval_split`` does not apply to it and ``eval_size`` rows
  are held out of it; a local directory (e.g. ``train.jsonl`` + ``test.jsonl``) or a hub id has
  named splits. A local ``.jsonl`` file is read line by line (row N is line N; blank lines are
  not rows), so a bad line is named instead of failing the whole table.

  Every row is checked when the splits are built, before any model is loaded: the question must
  be a non-empty string and the answer a non-empty string or a number; a JSONL line must be a JSON
  object. ``data.on_bad_row=error`` (default) stops with a message naming the file, the row and
  the field; ``skip`` leaves the row out, counts it (``DataSplits.skipped_rows``, logged by the
  pipeline as ``data/skipped_rows``) and warns once with the first few. A mapped column that no
  row has is a mapping mistake and stops the run either way.

Verifiers (``data.verifier``):

- ``exact``: trimmed, case-folded, whitespace-collapsed match, a trailing period dropped.
- ``squad_em``: SQuAD's normalised exact match (lower-case, punctuation and the articles
  a/an/the removed, whitespace collapsed; Rajpurkar et al. 2016, the ``normalize_answer`` of the
  official SQuAD v1.1 evaluation script). The HotpotQA reward of RLCR (arXiv:2507.16806) is this
  match, so "The Beatles" and "Beatles" or "U.S." and "US" are the same answer.
- ``math_verify``: symbolic equivalence through the optional ``math-verify`` package (a run
  that names it without the package installed fails at start-up, not with every answer wrong).

A verifier returns a score in [0, 1]; an answer is *correct* when the score is >= 1 (partial
credit does not count as correct, since the Brier term needs a binary outcome).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrl.data.example import Example
from calibrl.data.unanswerable import make_unanswerable
from calibrl.registry import Registry

__all__ = ["BAD_ROW_POLICIES", "Example", "DataSplits", "SOURCES", "VERIFIERS", "build_splits"]

log = logging.getLogger(__name__)

BAD_ROW_POLICIES = ("error", "skip")  # data.on_bad_row

Verifier = Callable[[str, "Example"], float]


def _scalars(mapping: Mapping[str, Any], exclude: Sequence[str] = ()) -> dict[str, str | int | float | bool]:
    return {k: v for k, v in mapping.items() if isinstance(v, (str, int, float, bool)) and k not in exclude}


@dataclass
class DataSplits:
    """Train and held-out eval rows of one dataset, and its verifier.

    Attributes:
        name: dataset name, used in metric keys ``eval/<name>/...``.
        train: training rows.
        eval: held-out rows, disjoint from ``train`` by question text.
        verify: ``verify(answer, example) -> score in [0, 1]``.
        skipped_rows: malformed rows left out (``data.on_bad_row=skip``), both splits.
    """

    name: str
    train: list[Example]
    eval: list[Example]
    verify: Verifier
    skipped_rows: int = 0

    def is_correct(self, answer: str | None, example: Example) -> bool:
        """Verifier verdict: score >= 1. ``None`` (no parsed answer) is never correct.

        A verifier that raises counts as incorrect (the exception text is not a reward signal).
        """
        if answer is None:
            return False
        try:
            return float(self.verify(answer, example)) >= 1.0
        except Exception:  # noqa: BLE001 - third-party verifiers raise anything on odd text
            return False


SOURCES: Registry[Callable[..., DataSplits]] = Registry("data source")
VERIFIERS: Registry[Verifier] = Registry("verifier")


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().removesuffix(".").strip()).lower()


@VERIFIERS.register("exact")
def exact_match(answer: str, example: Example) -> float:
    """1.0 when answer and reference match after trimming, case-folding, collapsing whitespace
    and dropping a trailing period; else 0.0."""
    return float(_normalize(answer) == _normalize(example.answer))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lower-case, drop ASCII punctuation, drop the articles
    a/an/the (whole words), collapse whitespace. Order as in the official script: punctuation
    goes before articles, so "the-end" -> "theend" keeps its letters."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


@VERIFIERS.register("squad_em")
def squad_exact_match(answer: str, example: Example) -> float:
    """1.0 when :func:`squad_normalize` makes answer and reference equal; else 0.0."""
    return float(squad_normalize(answer) == squad_normalize(example.answer))


@VERIFIERS.register("math_verify")
def math_verify(answer: str, example: Example) -> float:
    """Symbolic equivalence through Hugging Face ``math-verify`` (optional dependency).

    Raises:
        ImportError: ``math-verify`` is not installed.
    """
    from math_verify import parse, verify

    return float(verify(parse(example.answer), parse(answer)))


def _disjoint(train: list[Example], held_out: list[Example]) -> list[Example]:
    seen = {e.question for e in held_out}
    return [e for e in train if e.question not in seen]


def _slice_of(meta: Mapping[str, Any], fields: Sequence[str]) -> str:
    if not fields:
        return "all"
    missing = [f for f in fields if f not in meta]
    if missing:
        raise KeyError(f"slice field(s) {missing} not in the example metadata; available: {sorted(meta)}")
    return ",".join(f"{f}={meta[f]}" for f in fields)


@SOURCES.register("reasoning_gym")
def reasoning_gym_source(
    name: str,
    task: str,
    train_size: int,
    eval_size: int,
    train_seed: int,
    eval_seed: int,
    task_kwargs: Mapping[str, Any] | None = None,
    slice_fields: Sequence[str] = (),
    **_: Any,
) -> DataSplits:
    """Build splits from a reasoning-gym task (``train_size=0``: eval rows only).

    Raises:
        ValueError: unknown task (the message lists the registered ones) or bad task kwargs.
    """
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if eval_size < 1 or train_size < 0:
        raise ValueError(f"data sizes: eval_size must be >= 1 and train_size >= 0, got {eval_size} and {train_size}")

    if task not in DATASETS:
        raise ValueError(f"unknown reasoning-gym task {task!r}; valid choices: {', '.join(sorted(DATASETS))}")
    kwargs = dict(task_kwargs or {})

    def make(size: int, seed: int, split: str) -> tuple[Any, list[Example]]:
        try:
            ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **kwargs)
        except (TypeError, AssertionError) as err:
            raise ValueError(f"reasoning-gym task {task!r} rejected data.task_kwargs={kwargs}: {err}") from err
        rows = [
            Example(
                id=f"{split}-{i}",
                question=entry["question"],
                answer=str(entry["answer"]),
                slice=_slice_of(entry.get("metadata", {}), slice_fields),
                fields={"task": task, **_scalars(entry.get("metadata", {}))},
                meta={"entry": entry, "dataset": ds},
            )
            for i, entry in enumerate(ds)
        ]
        return ds, rows

    _, eval_rows = make(eval_size, eval_seed, "eval")
    # train_size=0: an eval-only set (calibrl-eval), no training rows are built.
    _, train_rows = make(train_size, train_seed, "train") if train_size > 0 else (None, [])

    def verify(answer: str, example: Example) -> float:
        return float(example.meta["dataset"].score_answer(answer, example.meta["entry"]))

    return DataSplits(name, _disjoint(train_rows, eval_rows), eval_rows, verify)


@dataclass(frozen=True)
class _Unreadable:
    """A JSONL line that is not a JSON object (``why`` says what it is)."""

    why: str


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """``(line number, parsed line)`` of every non-blank line; a line that is not UTF-8 or not
    JSON is an :class:`_Unreadable` (the caller reports or skips it like any bad row)."""
    rows: list[tuple[int, Any]] = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                rows.append((n, _Unreadable(f"could not be read as .jsonl (not UTF-8 text: {err.reason})")))
                continue
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                rows.append((n, _Unreadable(f"could not be read as .jsonl (not valid JSON: {err.msg}, column {err.colno})")))
    return rows


def _load_table(path: str, split: str, subset: str | None) -> list[tuple[int, Any]]:
    """``(row number from 1, row)`` of every row of the table (module docstring)."""
    import datasets

    local = Path(path).expanduser()
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if local.is_file():
        if local.suffix not in builders:
            raise ValueError(f"data.path {path!r}: unsupported file type; use one of {sorted(builders)}")
        if local.stat().st_size == 0:
            raise ValueError(f"data.path {path!r} is empty")
        if local.suffix == ".jsonl":
            return _read_jsonl(local)
        try:
            ds = datasets.load_dataset(builders[local.suffix], data_files=str(local), split="train")
        except Exception as err:  # noqa: BLE001 - datasets raises many types on malformed files
            raise ValueError(f"data.path {path!r} could not be read as {local.suffix}: {type(err).__name__}: {err}") from err
    elif local.exists() or path.startswith((".", "/", "~")) or local.suffix in builders:
        if not local.exists():
            raise FileNotFoundError(f"data.path {path!r} does not exist")
        ds = datasets.load_dataset(str(local), subset, split=split)
    else:
        ds = datasets.load_dataset(path, subset, split=split)
    return list(enumerate(ds, start=1))


def _row_problem(row: Any, fields: Mapping[str, str | None]) -> str | None:
    """What is wrong with a row (the end of a sentence that starts with the row), or ``None``."""
    if isinstance(row, _Unreadable):
        return row.why
    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not an object"
    for key in ("question", "answer"):
        col = fields.get(key)
        value = row.get(col) if col else None
        if value is None or (isinstance(value, float) and math.isnan(value)):  # NaN: an empty CSV/Parquet cell
            return f"has no value for field {key!r} (column {col!r})"
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not isinstance(value, str) and not (key == "answer" and numeric):
            kind = "a string or a number" if key == "answer" else "a string"
            return f"field {key!r} (column {col!r}) holds a {type(value).__name__} ({str(value)[:40]!r}), not {kind}"
        if str(value).strip() == "":
            return f"has no value for field {key!r} (column {col!r})"
    return None


def _rows_to_examples(
    rows: list[tuple[int, Any]], fields: Mapping[str, str | None], split: str, where: str, on_bad_row: str,
) -> tuple[list[Example], int]:
    """Examples of the well-formed rows, and the number of malformed rows skipped.

    Raises:
        ValueError: a mapped question/answer column no row has; with ``on_bad_row="error"``, the
            first malformed row (the message names ``where``, the row number and the field).
    """
    readable = [r for _, r in rows if isinstance(r, dict)]
    for key in ("question", "answer"):
        col = fields.get(key)
        if readable and not any(col in r for r in readable):
            columns = sorted({k for r in readable for k in r})
            raise ValueError(f"{where}: no row has column {col!r} (data.fields.{key}); columns: {', '.join(columns)}")
    out, bad = [], []
    for n, row in rows:
        problem = _row_problem(row, fields)
        if problem is not None:
            message = f"{where}: row {n} (1-based) {problem}"
            if on_bad_row == "error":
                raise ValueError(f"{message} (data.on_bad_row=skip leaves such rows out)")
            bad.append(message)
            continue
        values = {key: str(row[fields[key]]) for key in ("question", "answer")}
        id_col, slice_col = fields.get("id"), fields.get("slice")
        out.append(
            Example(
                id=str(row[id_col]) if id_col and row.get(id_col) is not None else f"{split}-{n - 1}",
                question=values["question"],
                answer=values["answer"],
                slice=str(row[slice_col]) if slice_col and row.get(slice_col) is not None else "all",
                fields=_scalars(row, exclude=(fields.get("question"), fields.get("answer"))),
                meta={"row": row},
            )
        )
    if bad:
        log.warning("%s: skipped %d malformed rows (data.on_bad_row=skip), e.g.\n  %s", where, len(bad),
                    "\n  ".join(bad[:3]))
    return out, len(bad)


# Verifiers that need an optional package: name -> (module, pip package).
_VERIFIER_PACKAGES = {"math_verify": ("math_verify", "math-verify")}


def _require_verifier_package(verifier: str) -> None:
    """Fail at start-up when ``verifier`` needs a package that is not installed (otherwise every
    answer would silently count as wrong: :meth:`DataSplits.is_correct` treats a raising
    verifier as an incorrect answer)."""
    if verifier not in _VERIFIER_PACKAGES:
        return
    module, package = _VERIFIER_PACKAGES[verifier]
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"data.verifier={verifier} needs the {package} package: pip install {package}") from err


@SOURCES.register("hf")
def hf_source(
    name: str,
    path: str,
    train_size: int,
    eval_size: int,
    train_seed: int,
    eval_seed: int,
    fields: Mapping[str, str | None],
    verifier: str = "exact",
    train_split: str = "train",
    eval_split: str | None = None,
    subset: str | None = None,
    on_bad_row: str = "error",
    **_: Any,
) -> DataSplits:
    """Build splits from a `datasets` table (hub id or local file).

    With ``eval_split`` set, eval rows come from that split; otherwise, and always for a single
    local file (one table, no splits), ``eval_size`` rows are held out of ``train_split`` by a
    shuffle seeded with ``eval_seed``. Train rows are then shuffled with ``train_seed`` and cut
    to ``train_size`` (0: an eval-only set, no train rows). Malformed rows (module docstring):
    ``on_bad_row`` is ``error`` or ``skip``.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: a malformed row with ``on_bad_row="error"`` (message names path, row, field),
            a mapped column no row has, an unknown ``on_bad_row``, or the verifier's optional
            package is not installed (``math_verify``).
        KeyError: unknown verifier.
    """
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"unknown data.on_bad_row {on_bad_row!r}; valid choices: {', '.join(BAD_ROW_POLICIES)}")
    verify = VERIFIERS.get(verifier)
    _require_verifier_package(verifier)
    # A local file is one table: no splits to read or to name in messages.
    single_file = Path(path).expanduser().is_file()
    where = path if single_file else f"{path}[{train_split}]"
    rows, skipped = _rows_to_examples(_load_table(path, train_split, subset), fields, "train", where, on_bad_row)
    if eval_split and not single_file:
        held, skipped_eval = _rows_to_examples(_load_table(path, eval_split, subset), fields, "eval",
                                               f"{path}[{eval_split}]", on_bad_row)
        skipped += skipped_eval
        random.Random(eval_seed).shuffle(held)
        held = held[:eval_size]
        train = rows
    else:
        order = list(range(len(rows)))
        random.Random(eval_seed).shuffle(order)
        held = [rows[i] for i in order[:eval_size]]
        train = [rows[i] for i in order[eval_size:]]
    random.Random(train_seed).shuffle(train)
    train = _disjoint(train, held)[:train_size]
    if (train_size > 0 and not train) or not held:
        raise ValueError(f"{path}: {len(train)} train and {len(held)} eval rows; both splits need rows")
    return DataSplits(name, train, held, verify, skipped_rows=skipped)


def build_splits(source: str, unanswerable: Mapping[str, Any] | None = None, **kwargs: Any) -> DataSplits:
    """Build the splits of the source registered as ``source`` (see :data:`SOURCES`), then make
    ``unanswerable["train_fraction"]`` / ``["eval_fraction"]`` of each split unanswerable
    (:func:`calibrl.data.unanswerable.make_unanswerable`, seeded with the split's seed;
    ``placeholder`` optional).

    Raises:
        KeyError: unknown source; the message lists the valid ones.
        ValueError: a bad fraction, a question with no operand to remove, or an ``unanswerable``
            field that is not a bool or 0/1.
    """
    splits = SOURCES.get(source)(**kwargs)
    u = dict(unanswerable or {})
    placeholder = u.get("placeholder", "x")
    splits.train = make_unanswerable(splits.train, u.get("train_fraction", 0.0), kwargs["train_seed"], placeholder)
    splits.eval = make_unanswerable(splits.eval, u.get("eval_fraction", 0.0), kwargs["eval_seed"], placeholder)
    for e in (*splits.train, *splits.eval):
        _ = e.unanswerable  # a malformed flag fails here, at start-up, not mid-run
    return splits
