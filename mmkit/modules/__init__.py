from mmkit.modules.base import DualEncoderModule, NonFiniteLossError
from mmkit.modules.clip_pretrain import CLIPPretrain

__all__ = ["CLIPPretrain", "DualEncoderModule", "NonFiniteLossError"]
