"""Spectrum pipeline stages: plain functions with no orchestrator dependency."""

__version__ = "0.2.0"
