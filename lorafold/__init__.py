"""lorafold: consolidate many LoRA adapters into one, and unlearn, exact where the math is."""

__version__ = "0.1.0"
