"""Backbones: the registry of pretrained CNNs, stacks of them, cut points for fine-tuning, FLOP counts."""
