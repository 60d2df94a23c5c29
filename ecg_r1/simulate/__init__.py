"""The embedded default cohort: a simulated multi-hospital T-wave-inversion cohort with known truth.

:func:`simulate_cohort` writes WFDB records per hospital, a ``manifest.csv`` hospital export,
``truth.parquet`` and ``summary.json`` (see ``docs/simulator.md`` for the generative model and
what a result on it means). Modules: :mod:`.heart` (heart vector and lead projection),
:mod:`.mechanisms` (ECG findings to waves), :mod:`.device` (electrodes, noise, filters),
:mod:`.clinical` (notes), :mod:`.hospitals` (sites), :mod:`.truth` (the probability model and
its posterior), :mod:`.writer` (WFDB), :mod:`.realism` (comparison with LUDB).
"""

from ecg_r1.simulate.cohort import DEFAULT_N, SimulationSummary, simulate_cohort

__all__ = ["DEFAULT_N", "SimulationSummary", "simulate_cohort"]
