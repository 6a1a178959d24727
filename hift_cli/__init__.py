"""hift: hierarchical full-parameter fine-tuning (HiFT, arXiv 2401.15207)."""

__version__ = "0.1.0"
