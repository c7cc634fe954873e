"""uta: Unmasked Token Alignment as a command-line toolkit and an importable core."""

__version__ = "0.1.0"
