"""``python -m b2kd``: the ``b2kd`` command, as launchers such as ``torchrun -m b2kd`` start it."""

from b2kd.cli import main

main()
