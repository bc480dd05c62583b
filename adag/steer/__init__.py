"""Steering and causal checks: interventions, sweeps, random controls, faithfulness, judged generation."""

from adag.steer.correlate import correlate
from adag.steer.intervene import replaced, scaled
from adag.steer.run import SteerConfig, faithfulness_run, steer_run

__all__ = ["SteerConfig", "correlate", "faithfulness_run", "replaced", "scaled", "steer_run"]
