from mmkit.models.dual_encoder import DualEncoder
from mmkit.models.spec import HFTowers, ModelSpec, OpenCLIP

__all__ = ["DualEncoder", "HFTowers", "ModelSpec", "OpenCLIP"]
