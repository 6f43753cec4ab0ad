"""Experiments: runs over seeds and their result files (runs.py), the privacy-budget
sweep (sweep.py) and the membership-inference audit (audit.py)."""
