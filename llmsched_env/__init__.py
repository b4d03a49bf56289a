"""llmsched core: workloads, the engine interface and simulated engine, the fluid benchmark, metrics, and the
Gymnasium environment ``LLMSched-v0`` (registered when this package is imported).

Data flows one way: workload → engine → scheduler state → policy → decision → engine.
"""

from llmsched_env.cost_model import DEFAULT_PROFILE, LinearCostModel, Profile, load_profile, parse_cost
from llmsched_env.engine import IDLE, Decision, Engine, IterationOutcome, RequestRecords, SchedulerState
from llmsched_env.errors import (
    ConfigError,
    EngineFailure,
    InvalidDecisionError,
    LLMSchedError,
    RequestTooLargeError,
    TraceFormatError,
    UnsupportedVersionError,
)
from llmsched_env.fluid import FluidSolution, solve_fluid
from llmsched_env.policy import Policy
from llmsched_env.registration import ENV_IDS, register_envs
from llmsched_env.runner import Rollout, RunResult, TimeSeriesRecorder, run
from llmsched_env.simulator import SimulatedEngine
from llmsched_env.workload import (
    Arrivals,
    GammaWorkload,
    LengthSampleWorkload,
    OnOffWorkload,
    PoissonWorkload,
    RequestType,
    TraceWorkload,
    TypeMix,
    parse_types,
)

__all__ = [
    "DEFAULT_PROFILE", "LinearCostModel", "Profile", "load_profile", "parse_cost",
    "IDLE", "Decision", "Engine", "IterationOutcome", "RequestRecords", "SchedulerState",
    "ConfigError", "EngineFailure", "InvalidDecisionError", "LLMSchedError", "RequestTooLargeError",
    "TraceFormatError", "UnsupportedVersionError",
    "FluidSolution", "solve_fluid", "Policy", "Rollout", "RunResult", "TimeSeriesRecorder", "run", "SimulatedEngine",
    "ENV_IDS", "register_envs",
    "Arrivals", "GammaWorkload", "LengthSampleWorkload", "OnOffWorkload", "PoissonWorkload", "RequestType",
    "TraceWorkload", "TypeMix", "parse_types",
]

register_envs()
