"""What objectives and the trainer run on: the model and its packed forward (`model`),
the lm_head passes (`policy`), processes and sharding (`distributed`), checkpoints,
metrics, and the rollout engines (`rollout/`). Knows no training method."""
