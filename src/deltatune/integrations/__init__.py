"""Bridges to other ecosystems: transformers, torch.distributed (PEFT's checkpoint format is in ``deltatune.formats``).

The only places that import optional third-party packages; nothing here is imported by
``import deltatune``.
"""
