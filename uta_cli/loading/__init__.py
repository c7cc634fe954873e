"""Loading: any checkpoint or init turned into one typed model.

model (run directories, checkpoint folders, contrastive runs, released files and exported
open_clip folders as one LoadedModel, with the teacher and preprocessing they record),
clip_model (a loaded model used like an open_clip CLIP, for the Python API), starts
(what a recipe's `init` and `student.init` name, resolved and checked).

May import data, models, masks and the ground floor.
"""
