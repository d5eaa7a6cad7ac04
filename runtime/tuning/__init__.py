"""Step schedules tuned to a model: GITS-style dynamic programming over the model's own fine trajectory."""
