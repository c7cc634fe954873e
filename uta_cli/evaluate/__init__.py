"""Evaluation: zero-shot, retrieval, linear probes and inference over any checkpoint.

zeroshot (templates, class names, class weights, metrics), class_weights (class weights through
the disk cache, zero-shot accuracy), datasets (evaluation datasets as one EvalSet each), encoders
(a checkpoint's student and teacher as encoders), per_process (one process's share of an
evaluation and the merge of all shares), report (`uta zeroshot`'s result, tables and files),
during_training (zero-shot while pre-training), linear_probe, inference (`uta embed`, `uta
classify`).

May import export, loading, data, models, masks and the ground floor.
"""
