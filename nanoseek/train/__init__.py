"""Pretraining with the DeepSeek-V3 recipe: config, optimizer, schedules, balancing, checkpoints, the loop."""
