"""``lmms-sgl-cost``: what each method costs on real checkpoints, from their ``config.json`` alone."""
