from mmkit.models.discriminator import ModalityDiscriminator
from mmkit.models.dual_encoder import DualEncoder
from mmkit.models.gradient_reversal import GradientReversal
from mmkit.models.hf_model import load_hf_export
from mmkit.models.spec import HFTowers, ModelSpec, OpenCLIP
from mmkit.models.teacher import FrozenTeacher, Teacher

__all__ = [
    "DualEncoder",
    "FrozenTeacher",
    "GradientReversal",
    "HFTowers",
    "ModalityDiscriminator",
    "ModelSpec",
    "OpenCLIP",
    "Teacher",
    "load_hf_export",
]
