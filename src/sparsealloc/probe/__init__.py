"""Perturbation probe and absorption coefficients."""

from .absorption import absorption_coefficients, run_probe
from .engine import FINALS, Probe, ProbeConfig

__all__ = ["FINALS", "Probe", "ProbeConfig", "absorption_coefficients", "run_probe"]
