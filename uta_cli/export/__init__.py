"""Export: the formats a trained model is written in, their checks, and the hub layout.

formats (one registry record per format: write, load back, where the metadata goes), verify (an
export checked against PyTorch), hub (the Hugging Face repository layout).

May import loading, data, models, masks and the ground floor.
"""
