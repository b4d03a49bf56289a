"""The scenario suite: named scenarios, one small declarative TOML file each, that every policy is judged on.

A scenario file states the workload, its arrival process, the engine's cost profile and memory, and
the sweep it is judged over (loads ρ, horizon, seeds, policies). ``load_scenario(name)`` reads a
built-in (this folder) or a file by path; ``NAME-hidden`` is the same scenario with output lengths
hidden, for the scenarios that declare ``hidden_variant = true``. The CLI (``llmsched compare
--scenario NAME``, ``--suite``), the Python API and the Gymnasium environment (``scenario="NAME"``)
all load them here.

Format (every table but ``[workload]`` optional)::

    description = "one line"
    suite = true                # part of ``llmsched compare --suite``
    hidden_variant = true       # also NAME-hidden

    [workload]                  # exactly one of:
    types = "p=512,o=20,rate=0.7;p=512,o=50,rate=0.3"   # rates are shares: the sweep sets the total
    [workload.lengths]          # or a length distribution: quantile knots, log-linear between them
    probabilities = [0, 0.5, 1]
    prompt = [10, 100, 1000]
    output = [5, 50, 500]

    [arrivals]                  # llmsched_env.workload.ArrivalProcess: process = poisson | gamma | onoff | diurnal,
    process = "onoff"           # cv, mean_on_s, mean_off_s, off_factor, period_s, amplitude
    [engine]                    # profile (a built-in or a JSON file), memory_tokens, block_size
    [sweep]                     # loads, horizon_s, seeds, policies
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from llmsched_env.cost_model import DEFAULT_PROFILE, load_profile
from llmsched_env.errors import ConfigError, RequestTooLargeError
from llmsched_env.scenario import Scenario
from llmsched_env.workload import ArrivalProcess, LengthSampleWorkload, QuantileLengths, parse_types

HIDDEN_SUFFIX = "-hidden"
#: Requests drawn from a length distribution once, with a fixed seed, to form a scenario's length sample.
LENGTH_SAMPLE_SIZE = 20_000

_TOP_KEYS = {"description", "suite", "hidden_variant", "workload", "arrivals", "engine", "sweep"}
_SECTION_KEYS = {
    "workload": {"types", "lengths"},
    "arrivals": {"process", "cv", "mean_on_s", "mean_off_s", "off_factor", "period_s", "amplitude"},
    "engine": {"profile", "memory_tokens", "block_size"},
    "sweep": {"loads", "horizon_s", "seeds", "policies"},
}


@dataclass(frozen=True)
class NamedScenario:
    """A scenario of the suite and the sweep it is judged over.

    Attributes:
        name: its name (``NAME-hidden`` for a hidden-length variant).
        description: one line, for tables and ``--help``.
        scenario: the :class:`~llmsched_env.scenario.Scenario` (its rate is a placeholder: loads set it).
        loads: the loads ``ρ`` swept; :meth:`rates` converts them to arrival rates.
        horizon_s, seeds: the rest of the sweep.
        policies: the policies the file names (empty: the comparison's defaults).
        in_suite: whether ``llmsched compare --suite`` runs it.
        source: where it was read from.
    """

    name: str
    description: str
    scenario: Scenario
    loads: tuple[float, ...]
    horizon_s: float
    seeds: tuple[int, ...]
    policies: tuple[str, ...]
    in_suite: bool
    source: str

    def rates(self, loads: tuple[float, ...] | None = None) -> list[float]:
        """The total arrival rates (req/s) at which the load is each of ``loads`` (default: the sweep's)."""
        return [round(self.scenario.rate_for_load(load), 4) for load in (loads or self.loads)]


def _builtin_files() -> dict[str, Any]:
    folder = resources.files(__name__)
    return {entry.name.removesuffix(".toml"): entry for entry in folder.iterdir() if entry.name.endswith(".toml")}


def scenario_names(*, suite_only: bool = False) -> list[str]:
    """The built-in scenarios' names, hidden-length variants included (or only those ``--suite`` runs)."""
    names = []
    for name in sorted(_builtin_files()):
        flags = _read(name)[1]
        if suite_only and not flags.get("suite", False):
            continue
        names.append(name)
        if not suite_only and flags.get("hidden_variant", False):
            names.append(name + HIDDEN_SUFFIX)
    return names


def _read(name_or_path: str | Path) -> tuple[str, dict[str, Any]]:
    builtins = _builtin_files()
    text = str(name_or_path)
    if text in builtins:
        source, raw = f"scenario {text!r}", builtins[text].read_text()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"no scenario {text!r}: neither a built-in ({', '.join(sorted(builtins))}, and "
                              f"NAME{HIDDEN_SUFFIX} where declared) nor a TOML file")
        source, raw = str(path), path.read_text()
    try:
        return source, tomllib.loads(raw)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: invalid TOML: {error}") from None


def load_scenario(name_or_path: str | Path) -> NamedScenario:
    """The scenario called ``name_or_path`` (a built-in, ``NAME-hidden``, or a TOML file's path)."""
    text = str(name_or_path)
    hidden = text.endswith(HIDDEN_SUFFIX) and text.removesuffix(HIDDEN_SUFFIX) in _builtin_files()
    base = text.removesuffix(HIDDEN_SUFFIX) if hidden else text
    source, data = _read(base)
    name = Path(base).stem if base not in _builtin_files() else base
    spec = _parse(source, name, data)
    if hidden:
        if not data.get("hidden_variant", False):
            raise ConfigError(f"{source} declares no hidden-length variant (hidden_variant = true)")
        spec = replace(spec, name=name + HIDDEN_SUFFIX, description=spec.description + " Output lengths hidden.",
                       scenario=replace(spec.scenario, output_lengths_known=False), in_suite=False)
    return spec


def _parse(source: str, name: str, data: dict[str, Any]) -> NamedScenario:
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown field {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    sections = {}
    for section, allowed in _SECTION_KEYS.items():
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        extra = set(table) - allowed
        if extra:
            raise ConfigError(f"{source}: unknown field {section}.{sorted(extra)[0]}; "
                              f"allowed: {', '.join(sorted(allowed))}")
        sections[section] = table

    engine = sections["engine"]
    profile = load_profile(str(engine.get("profile", DEFAULT_PROFILE)))
    capacity = _integer(source, "engine.memory_tokens", engine.get("memory_tokens", profile.kv_capacity_tokens))
    block = _integer(source, "engine.block_size", engine.get("block_size", profile.block_size))
    arrivals = sections["arrivals"]
    try:
        process = ArrivalProcess(**{("kind" if key == "process" else key): value for key, value in arrivals.items()})
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"{source}: [arrivals]: {error}") from None

    workload = sections["workload"]
    if ("types" in workload) == ("lengths" in workload):
        raise ConfigError(f"{source}: [workload] needs exactly one of 'types' and a [workload.lengths] table")
    try:
        if "types" in workload:
            scenario = Scenario(profile.cost, capacity, block, mix=parse_types(str(workload["types"])), process=process)
        else:
            lengths = workload["lengths"]
            missing = {"probabilities", "prompt", "output"} - set(lengths)
            if missing:
                raise ConfigError(f"[workload.lengths] needs {sorted(missing)[0]!r}")
            probabilities = tuple(float(p) for p in lengths["probabilities"])
            rng = np.random.default_rng(0)  # the same sample every time the scenario is loaded
            prompt = QuantileLengths(probabilities, tuple(int(v) for v in lengths["prompt"])
                                     ).sample(LENGTH_SAMPLE_SIZE, rng)
            output = QuantileLengths(probabilities, tuple(int(v) for v in lengths["output"])
                                     ).sample(LENGTH_SAMPLE_SIZE, rng)
            scenario = Scenario(profile.cost, capacity, block, trace=LengthSampleWorkload(prompt, output, 1.0, process))
        largest = scenario.offered_mix()
        scenario.engine().check_fits(largest.prompt_lens, largest.output_lens)
    except (ConfigError, RequestTooLargeError) as error:  # an impossible file is a config error, named
        raise ConfigError(f"{source}: {error}") from None

    sweep = sections["sweep"]
    loads = tuple(float(v) for v in sweep.get("loads", (0.6, 0.8, 0.9)))
    if not loads or any(not (math.isfinite(v) and 0 < v) for v in loads):
        raise ConfigError(f"{source}: sweep.loads must be positive numbers, got {list(loads)}")
    horizon = float(sweep.get("horizon_s", 300.0))
    if not (math.isfinite(horizon) and horizon > 0):
        raise ConfigError(f"{source}: sweep.horizon_s must be finite and > 0, got {horizon}")
    seeds = tuple(_integer(source, "sweep.seeds", v, low=0) for v in sweep.get("seeds", (0, 1, 2)))
    policies = tuple(str(p) for p in sweep.get("policies", ()))
    if not seeds or ("policies" in sweep and not policies):
        raise ConfigError(f"{source}: sweep.seeds and sweep.policies must not be empty")
    description = str(data.get("description", ""))
    return NamedScenario(name, description, scenario, loads, horizon, seeds, policies, bool(data.get("suite", False)),
                         source)


def _integer(source: str, field: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{source}: {field} must be an integer >= {low}, got {value!r}")
    return value


__all__ = ["HIDDEN_SUFFIX", "NamedScenario", "load_scenario", "scenario_names"]
