"""The error every explanation method raises for a tower it cannot open."""


class UnsupportedTowerError(ValueError):
    """The model's tower is not one the explanation method knows how to open."""
