"""Training: the one engine that runs every task.

engine (the loop: resume, logging, progress, validation on its cadence), run_state (what a fit
carries from step to step), run_files (checkpoints, config.yaml, metrics.jsonl), setup (the
engine's settings from a recipe, the accelerator, the run directory), resume_guard (what may
differ between a checkpoint and the run resuming from it), tracking (experiment trackers through
Accelerate), data_wait (the data wait per logging window and its warning).

Knows nothing of UTA. May import loading, data, models, masks and the ground floor.
"""
