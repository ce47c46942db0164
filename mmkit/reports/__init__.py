"""Files mmkit writes about a run: the run report's curves (``curves``) and pictures of what was
learnt (``examples``, ``example_figures``), and the continual-learning matrix (``continual``)."""
