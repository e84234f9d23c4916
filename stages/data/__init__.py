"""Data drops: the readers download validates with (and the trainers will read with)."""
