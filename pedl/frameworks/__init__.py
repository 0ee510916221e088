"""PEDL frameworks (only PyTorch is provided)."""
