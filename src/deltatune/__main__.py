"""``python -m deltatune ...`` (and ``torchrun --nproc_per_node N -m deltatune train ...``)."""

from deltatune.cli import main

if __name__ == "__main__":
    main()
