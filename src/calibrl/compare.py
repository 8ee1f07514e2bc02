"""``python -m calibrl.compare``: kept as an alias of ``calibrl-compare`` (:mod:`calibrl.report`)."""

from calibrl.report.compare import main

if __name__ == "__main__":
    main()
