"""Everything that depends on the distributed strategy (plain/DDP, FSDP2, DeepSpeed ZeRO) lives
in this package; techniques and losses call it through ``mmkit.parallel.ops``."""
