"""deltatune benchmarks: training-step time and memory, inference latency, save/load, file size.

Run ``python -m bench.run`` (``--quick`` for a smoke test on tiny random models). Every figure is
measured side by side in one run (deltatune vs Hugging Face PEFT vs full fine-tuning) and reported
as ratios; nothing here is asserted in tests, because timings depend on the machine's load.
"""
