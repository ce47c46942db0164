from mmkit.techniques.align_gan import AlignGAN
from mmkit.techniques.base import DualEncoderModule, NonFiniteLossError
from mmkit.techniques.clip_pretrain import CLIPPretrain
from mmkit.techniques.ewc_incremental import EWCIncremental
from mmkit.techniques.metric_align import MetricAlign
from mmkit.techniques.kd_student import KDStudent

__all__ = [
    "AlignGAN",
    "CLIPPretrain",
    "DualEncoderModule",
    "EWCIncremental",
    "KDStudent",
    "MetricAlign",
    "NonFiniteLossError",
]
