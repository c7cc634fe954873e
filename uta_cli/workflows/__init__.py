"""The workflows: one user-facing job each, end to end, callable from Python.

pretrain (UTA pre-training), finetune (classification and contrastive tuning), zeroshot (the
`uta zeroshot` run over datasets and models), export (write, verify and place an export), convert
(a released file as a checkpoint and an open_clip folder), inspect_mask (mask coverage
statistics), plot (curves of runs), shards (`uta shards`: pre-resized webdataset shards), dryrun
(what a recipe will do, checked without training).

May import every wing below it (tasks, train, evaluate, export, loading, data, models, masks) and
the ground floor. A workflow never imports another workflow: what two share moves down a wing.
Only dryrun imports inside functions (so `uta recipes` answers without torch).
"""
