"""Build the context-removal HotpotQA variant of RLCR as JSONL (``conf/data/hotpotqa.yaml`` reads it).

HotpotQA-Modified (Damani et al., "Beyond Binary Rewards", arXiv:2507.16806; the authors' copy
is the HF dataset ``mehuldamani/hotpot_qa``) starts from the HotpotQA *distractor* setting: each
question comes with 10 Wikipedia paragraphs, 2 of them gold (they hold the supporting facts) and 8
distractors. Two paragraphs are removed per question, so that 0, 1 or both gold paragraphs are
gone, each with probability 1/3:

- ``gold_removed=0``: 2 distractors removed (the evidence is all there);
- ``gold_removed=1``: 1 gold paragraph and 1 distractor removed;
- ``gold_removed=2``: both gold paragraphs removed (the answer must come from memory, or not at all).

The remaining paragraphs, untitled and numbered, follow the question and the answer-format
instruction in the ``problem`` text. Questions whose text is 6000 characters or longer are
dropped; train is the first 20000 remaining rows of the train split, test the first 500 of the
validation split. This is the recipe of the authors' ``data/creation_scripts/hotpotqa.py``
(github.com/damanimehul/RLCR), seeded here (the authors' draw was not), so a rebuild has the
same layout and statistics but not the same removed paragraphs as the hub copy.

``--mode closed_book`` removes every paragraph instead: question and answer only.

Output: ``<out>/train.jsonl`` and ``<out>/test.jsonl``, one object per line with ``id`` (the
HotpotQA id), ``problem``, ``answer``, ``type``, ``level``, ``source`` ("hotpot"),
``gold_removed`` (0, 1, 2) and ``removed_titles``. Train on it with
``calibrl-train experiment=paper/hotpotqa_rlcr data.path=<out>``.

Input: the hub dataset (``--source``, default ``hotpotqa/hotpot_qa``, config ``distractor``; needs
network or an HF cache) or local copies of its splits (``--train-file``, ``--validation-file``):
``.jsonl``/``.json``/``.parquet`` in the hub's layout (``context: {title: [...], sentences:
[[...]]}``, ``supporting_facts: {title: [...], sent_id: [...]}``) or the original release's JSON
(``hotpot_train_v1.1.json``, ``hotpot_dev_distractor_v1.json``: ``_id``, ``context: [[title,
[sentences]]]``, ``supporting_facts: [[title, sent_id]]``).

Usage::

    python scripts/make_hotpotqa_nocontext.py --out data/hotpot_qa_modified
    python scripts/make_hotpotqa_nocontext.py --out data/hotpot_qa_modified \\
        --train-file hotpot_train_v1.1.json --validation-file hotpot_dev_distractor_v1.json
    python scripts/make_hotpotqa_nocontext.py --out data/hotpot_closed_book --mode closed_book
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The authors' answer-format instruction, kept verbatim so rebuilt rows read as the hub copy's.
INSTRUCTION = (
    " Your answer will be verified with exact match score. To ensure correct verification, only provide the"
    " answer within the <answer> </answer> tags. Do not put any sentences or reasoning process within the"
    " <answer> </answer> tags."
)
SEPARATOR = "-" * 32
MODES = ("rlcr", "closed_book")


@dataclass(frozen=True)
class HotpotRow:
    """One HotpotQA distractor question, whichever layout it was read from.

    Attributes:
        id: the HotpotQA id.
        question, answer, type, level: as in HotpotQA.
        paragraphs: the 10 ``(title, sentences)`` context paragraphs, in order.
        support_titles: the title of each supporting fact (a title repeats once per fact).
    """

    id: str
    question: str
    answer: str
    type: str
    level: str
    paragraphs: tuple[tuple[str, tuple[str, ...]], ...]
    support_titles: tuple[str, ...]


def parse_row(row: dict[str, Any]) -> HotpotRow:
    """A HotpotQA row in the hub layout or the original release's.

    Raises:
        KeyError: a required field is missing.
    """
    context, facts = row["context"], row["supporting_facts"]
    if isinstance(context, dict):  # hub: {title: [...], sentences: [[...]]}
        paragraphs = zip(context["title"], context["sentences"])
        support = facts["title"]
    else:  # original: [[title, [sentences]]], [[title, sent_id]]
        paragraphs = ((title, sentences) for title, sentences in context)
        support = [title for title, _ in facts]
    return HotpotRow(
        id=str(row["id"] if "id" in row else row["_id"]),
        question=row["question"],
        answer=row["answer"],
        type=row.get("type", ""),
        level=row.get("level", ""),
        paragraphs=tuple((title, tuple(sentences)) for title, sentences in paragraphs),
        support_titles=tuple(support),
    )


def titles_to_remove(row: HotpotRow, rng: random.Random) -> tuple[int, list[str]]:
    """``(gold_removed, titles)``: 0, 1 or 2 drawn uniformly, then the titles to drop (2 distractors;
    1 gold and 1 distractor; both gold). A row that cannot supply them (fewer than 2
    distractors, no gold title) keeps every paragraph and counts as ``gold_removed=0``, as in
    the authors' script."""
    gold = sorted(set(row.support_titles))
    distractors = sorted({title for title, _ in row.paragraphs} - set(gold))
    choice = rng.choice((0, 1, 2))
    if choice == 0 and len(distractors) >= 2:
        return 0, rng.sample(distractors, 2)
    if choice == 1 and row.support_titles and distractors:
        # A gold title is drawn per supporting fact, as the authors draw from the facts' titles.
        return 1, [rng.choice(row.support_titles), rng.choice(distractors)]
    if choice == 2 and gold:
        return 2, gold
    return 0, []


def make_problem(question: str, paragraphs: Iterable[tuple[str, Sequence[str]]]) -> str:
    """The question text: question, instruction, then the kept paragraphs numbered from 0 (no
    titles), each followed by a separator line; without paragraphs, question and instruction."""
    text = f"Question: {question} \n\n{INSTRUCTION} \n\n"
    blocks = [f"Paragraph {i} \n\n " + "\n".join(sentences) + f" \n\n{SEPARATOR}\n\n"
              for i, (_, sentences) in enumerate(paragraphs)]
    return text + (f"Supporting Information: {''.join(blocks)} \n\n" if blocks else "")


def modify(row: HotpotRow, mode: str, rng: random.Random) -> dict[str, Any]:
    """The output record of one question (module docstring).

    Raises:
        ValueError: unknown mode.
    """
    if mode == "rlcr":
        gold_removed, removed = titles_to_remove(row, rng)
    elif mode == "closed_book":
        gold_removed, removed = len(set(row.support_titles)), [title for title, _ in row.paragraphs]
    else:
        raise ValueError(f"unknown mode {mode!r}; valid choices: {', '.join(MODES)}")
    kept = [(title, sentences) for title, sentences in row.paragraphs if title not in removed]
    return {
        "id": row.id, "problem": make_problem(row.question, kept), "answer": row.answer, "type": row.type,
        "level": row.level, "source": "hotpot", "gold_removed": gold_removed, "removed_titles": removed,
    }


def build_split(
    rows: Iterable[dict[str, Any]], mode: str, rng: random.Random, limit: int, max_chars: int
) -> list[dict[str, Any]]:
    """The first ``limit`` modified rows whose ``problem`` is shorter than ``max_chars``."""
    out = []
    for raw in rows:
        if len(out) == limit:
            break
        record = modify(parse_row(raw), mode, rng)
        if len(record["problem"]) < max_chars:
            out.append(record)
    return out


def read_local(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a local ``.parquet``, ``.jsonl`` or ``.json`` (a JSON list or JSON lines) file."""
    if path.suffix == ".parquet":
        import datasets

        yield from datasets.load_dataset("parquet", data_files=str(path), split="train")
        return
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        yield from json.loads(text)
    else:
        yield from (json.loads(line) for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (train.jsonl, test.jsonl)")
    parser.add_argument("--mode", choices=MODES, default="rlcr",
                        help="rlcr: the paper's variant; closed_book: no paragraphs")
    parser.add_argument("--source", default="hotpotqa/hotpot_qa",
                        help="hub dataset (config 'distractor'), read when no local file is given")
    parser.add_argument("--train-file", type=Path, help="local copy of the distractor train split")
    parser.add_argument("--validation-file", type=Path, help="local copy of the distractor validation split")
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--max-chars", type=int, default=6000, help="drop questions whose text is this long or longer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.train_file or args.validation_file:
        local = (("train", args.train_file), ("test", args.validation_file))
        splits = {name: read_local(path) for name, path in local if path}
    else:
        import datasets

        hub = datasets.load_dataset(args.source, "distractor")
        splits = {"train": hub["train"], "test": hub["validation"]}
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        limit = args.train_size if name == "train" else args.test_size
        records = build_split(rows, args.mode, rng, limit, args.max_chars)
        with (args.out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        counts = [sum(r["gold_removed"] == k for r in records) for k in (0, 1, 2)]
        print(f"{args.out / name}.jsonl: {len(records)} rows (gold_removed 0/1/2: {'/'.join(map(str, counts))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
