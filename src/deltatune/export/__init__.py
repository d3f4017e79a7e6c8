"""Export for deployment: the merged model as ONNX (optionally int8), a decoder's LoRA as a llama.cpp GGUF adapter.

- :func:`deltatune.export.onnx.export_onnx`: ``deltatune export RUN --format onnx --output DIR``
- :func:`deltatune.export.gguf.export_gguf`: ``deltatune export RUN --format gguf --output FILE``
- :func:`deltatune.export.formats.applicable`: ``deltatune export --list``

A top layer beside ``cli/`` and ``serve/``: it reads runs through ``deltatune.train`` and imports
onnx, onnxruntime and gguf only where they are used (``pip install 'deltatune[export]'``).
"""
