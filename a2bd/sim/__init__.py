"""Simulated Asterisk peers for tests, benchmarks and the call-storm tool."""

from a2bd.sim.agi import SimResult, encode_environment, make_environment, run_session

__all__ = ["SimResult", "encode_environment", "make_environment", "run_session"]
