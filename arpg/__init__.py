"""arpg: reproducible experiment pipeline for ARPG (arXiv 2503.10568)."""

__version__ = "0.1.0"
