"""``python -m calibrl.eval``: the same entry as ``calibrl-eval``."""

from calibrl.eval.cli import main

main()
