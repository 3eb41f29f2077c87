"""Trainer workers: GRPO with TRL, rewards from the shared referee judge (see the trainer issue)."""
