"""Sampling math: the schedule, the run settings, the plan (per-step coefficients), the one step, the host loop and
per-image noise."""
