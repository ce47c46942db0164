"""Explain an image–text match: which image patches and which caption tokens make the score
(``explain_pairs``), rendered as heatmaps (``render``), and measured (``evaluation``: pointing
game, deletion and insertion curves). ``mmkit explain`` is the command."""

from mmkit.explain.api import METHODS, Explanation, explain_pairs, normalize_relevance
from mmkit.explain.towers import UnsupportedTowerError

__all__ = ["METHODS", "Explanation", "UnsupportedTowerError", "explain_pairs", "normalize_relevance"]
