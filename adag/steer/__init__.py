"""Steering and causal checks: interventions, sweeps, random controls, faithfulness, correlation, judged
generation."""

import lazy_loader

# Lazy: the CLI imports steer.config at start-up without paying for torch.
__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "config": ["CorrelateConfig", "FaithfulnessConfig", "JudgeConfig", "SteerConfig"],
    "correlate": ["correlate", "correlate_run"],
    "intervene": ["replaced", "scaled"],
    "judge": ["judge_run"],
    "run": ["faithfulness_run", "steer_run"],
})
