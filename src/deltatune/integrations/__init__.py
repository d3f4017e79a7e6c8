"""Bridges to other ecosystems: Hugging Face PEFT's checkpoint format, transformers, torch.distributed.

The only places that import optional third-party packages; nothing here is imported by
``import deltatune``.
"""
