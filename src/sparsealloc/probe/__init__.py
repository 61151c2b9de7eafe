"""Perturbation probe and absorption coefficients."""

from .coefficients import absorption_coefficients, relative_damage, run_probe
from .engine import FINALS, Probe, ProbeConfig

__all__ = ["FINALS", "Probe", "ProbeConfig", "absorption_coefficients", "relative_damage",
           "run_probe"]
