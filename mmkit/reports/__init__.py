"""Files mmkit writes about a run beside its logs (the continual-learning matrix and its heatmaps)."""
