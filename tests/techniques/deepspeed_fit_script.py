"""``mmkit fit`` (``mmkit.cli.main``) under mmkit's DeepSpeed strategy on CPU processes.

    python deepspeed_fit_script.py [mmkit fit arguments...]

The same as the ``mmkit`` command, with ``deepspeed_cpu`` imported first (CPU accelerator for
DeepSpeed, no compiled kernels) so that ``--trainer.strategy deepspeed_cpu.CPUDeepSpeedStrategy``
resolves. Lightning starts the other ranks by running this script again with the same arguments.
Run by tests/techniques/test_deepspeed.py.
"""


import deepspeed_cpu  # noqa: F401  (before anything imports deepspeed)

from mmkit.cli import main

if __name__ == "__main__":
    main()  # reads sys.argv, as the mmkit command does
