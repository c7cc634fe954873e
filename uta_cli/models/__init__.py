"""Models: the student, the frozen teacher, and the checkpoint formats they come in.

student (the UTA student: a timm ViT or EVA-02 fed only visible tokens), teacher (the frozen
CLIP teacher and its projected tokens), eva_clip (BAAI's native EVA-CLIP weight layout), release
(the authors' released files), open_clip_folder (exported open_clip folders).

May import masks and the ground floor.
"""
