"""Train: `python train.py [group=option ...] [key=value ...]` (see README.md)."""

from ethos.cli import main

if __name__ == "__main__":
    main()
