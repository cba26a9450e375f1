"""Checkpoint analysis: attention weights read one layer at a time in one layout (checkpoints.py), their
singular-value spectra and effective ranks (spectra.py)."""
