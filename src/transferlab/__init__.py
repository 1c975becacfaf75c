"""transferlab: which pretrained CNN backbone classifies your images best, and at what cost."""

__version__ = "0.1.0"
