"""``python -m calibrl.report``: the same entry as ``calibrl-compare``."""

from calibrl.report.compare import main

main()
