"""`python -m torchfast ...`: the same command as the `torchfast` console script (torchfast/cli.py)."""

from torchfast.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
