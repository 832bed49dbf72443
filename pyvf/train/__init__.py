"""The lean VeriFree trainer: config, data, model, rollout, checkpoint, metrics and the
loop in trainer.py, each in its own small module."""
