"""Tasks: what differs between trainers, run by the one engine.

alignment (UTA, MIM and feature distillation against a frozen teacher), classification,
contrastive, common (what the tasks share), demo_teacher (the demo's small CLIP teacher, trained
once and cached) and tuning_data (fine-tuning's training and validation data).

May import train, evaluate, export, loading, data, models, masks and the ground floor.
"""
