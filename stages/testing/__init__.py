"""Test and demo fixtures that ship with the package: the synthetic model generator."""
