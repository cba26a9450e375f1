"""Checkpoint analysis: attention weights read one layer at a time in one layout (weights.py; which reader for a
SOURCE: sources.py; readers.py, layouts.py, ethos_runs.py, fp8.py), their singular-value spectra and effective
ranks (spectra.py, stored by store.py, drawn by plots.py), and the shared-output-subspace retrofit (retrofit.py;
lowrank.py, calibration.py, surgery.py)."""
