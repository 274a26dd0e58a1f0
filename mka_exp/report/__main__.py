"""`python -m mka_exp.report`."""

from mka_exp.report.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
