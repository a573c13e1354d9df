"""Attention mechanisms as ``nn.Module`` building blocks (timm's ``layers`` idiom).

Each module's docstring names its paper and the tensor shapes it takes and returns.
"""

__all__: list[str] = []
