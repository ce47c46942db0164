"""Old import path of the techniques (before ``mmkit.techniques``), kept so that existing configs
and scripts naming ``mmkit.modules.CLIPPretrain`` etc. still work."""

from mmkit.techniques import *  # noqa: F401,F403
from mmkit.techniques import __all__  # noqa: F401
