"""Old import path of ``FSDP2Strategy`` (now ``mmkit.parallel.fsdp2_strategy``), kept for configs
that name ``mmkit.strategies.FSDP2Strategy``."""

from mmkit.parallel.fsdp2_strategy import FSDP2Strategy  # noqa: F401
