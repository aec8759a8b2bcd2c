"""Placement: device, link and model profiles in, a Plan out. Pure and deterministic:
no I/O, no trio, no mlx."""
