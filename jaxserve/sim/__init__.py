"""Scheduling simulator: the real scheduler and KV cache manager, driven by a virtual clock and a
measured step-time table instead of the model (see docs/SCHEDULING.md)."""

from jaxserve.sim.simulator import RequestRecord, SimResult, Simulator
from jaxserve.sim.step_cost import StepCostModel
from jaxserve.sim.workload import SimRequest, WorkloadSpec, generate_workload, load_trace, save_trace

__all__ = ["RequestRecord", "SimResult", "Simulator", "StepCostModel", "SimRequest", "WorkloadSpec",
           "generate_workload", "load_trace", "save_trace"]
