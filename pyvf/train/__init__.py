"""The trainer: its config (`config.py`, the common keys; each objective owns its own)
and the loop (`trainer.py`: build, step, run)."""
