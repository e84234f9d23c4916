"""Spectrum pipeline stages: plain functions with no orchestrator dependency."""

__version__ = "0.1.0"
