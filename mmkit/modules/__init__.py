from mmkit.modules.align_gan import AlignGAN
from mmkit.modules.base import DualEncoderModule, NonFiniteLossError
from mmkit.modules.clip_pretrain import CLIPPretrain
from mmkit.modules.ewc_incremental import EWCIncremental
from mmkit.modules.metric_align import MetricAlign
from mmkit.modules.kd_student import KDStudent

__all__ = [
    "AlignGAN",
    "CLIPPretrain",
    "DualEncoderModule",
    "EWCIncremental",
    "KDStudent",
    "MetricAlign",
    "NonFiniteLossError",
]
