"""Attention spectra of a checkpoint: the same as `python -m ethos.analysis.spectra SOURCE --out DIR` (see there)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ethos.analysis.spectra import main

if __name__ == "__main__":
    main()
