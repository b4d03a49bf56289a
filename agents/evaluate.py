"""Evaluation: a trained agent beside the baselines on the same arrivals, over held-out seeds.

It is ``llmsched compare`` with one more policy, named ``agent``: the same runs, rows, tables, CSV,
JSON, Markdown and plots, plus the summary over seeds with 95 % intervals and the ratio of the
agent's regret to the reference baseline's (WAIT with known lengths, Nested WAIT with hidden ones).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from agents.policy import AgentPolicy, read_agent
from agents.train import make_env
from baselines.compare import SEES_OUTPUT_LENGTHS, EngineFactory, compare, merge_comparisons
from llmsched_env.errors import ConfigError
from llmsched_env.executor import Executor, TaskFailure, failed_task
from llmsched_env.report import Comparison, PolicyRun
from llmsched_env.scenario import Scenario

DEFAULT_SEEDS = tuple(range(10))  # held out: training draws its arrivals from its own seed, validation uses 1000+


def evaluate_agent(agent_dir: str | Path, *, policies: Sequence[str] = ("wait", "nested-wait", "vllm", "sarathi"),
                   seeds: Sequence[int] = DEFAULT_SEEDS, horizon: float | None = None, rate: float | None = None,
                   reference: str | None = None, deterministic: bool = True,
                   on_start: Callable[[int], None] | None = None,
                   on_run_done: Callable[[PolicyRun], None] | None = None,
                   scenario: Scenario | None = None, engine: EngineFactory | None = None,
                   with_sim: bool = False, executor: Executor | None = None) -> Comparison:
    """Run the agent in ``agent_dir`` and ``policies`` on the scenario it was trained on (at ``rate``, default
    the middle of its training range) for each seed; the comparison's reference is set for the ratio.
    ``on_start`` is told how many runs there will be, ``on_run_done`` is called after each.

    On another backend, ``engine`` builds each run's engine and ``scenario`` replaces the training one
    (the live engine's capacity and calibrated cost model: the agent's observation is normalised by the
    fluid targets of the scenario it runs in); ``with_sim`` adds the simulator's rows (see ``compare``).

    With an ``executor`` (the simulator only) each seed is a task of its own (the agent's folder must be readable
    at the same path on a cluster's workers), and ``on_run_done`` follows each seed's runs as the seed finishes:
    the same comparison as in this process. A seed that fails at run time loses only its own runs, and is named in
    the comparison's ``failed``.
    """
    spec, model = read_agent(agent_dir)
    template = make_env(spec.env_id, spec.env_kwargs)
    if scenario is None:
        scenario = template.scenario
    elif scenario.output_lengths_known != template.scenario.output_lengths_known:
        scenario = replace(scenario, output_lengths_known=template.scenario.output_lengths_known)
    horizon = horizon if horizon is not None else template.horizon
    rate = rate if rate is not None else template.nominal_rate
    known = template.control.known_lengths
    reference = reference or ("wait" if known else "nested-wait")
    names = ["agent", *[p for p in policies if p != "agent"]]
    if reference not in names:
        names.append(reference)
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    if executor is not None and engine is not None:
        raise ConfigError("an executor spreads the simulator's seeds; a live evaluation's are spread by "
                          "live_backend.evaluation.evaluate_live_on")
    if on_start is not None:
        on_start(len(names) * len(seeds) * (2 if engine is not None and with_sim else 1))
    if executor is None:
        comparison = _compare_with_agent(model, template, scenario, names, rate, horizon, list(seeds), deterministic,
                                         on_run_done, engine, with_sim)
        return replace(comparison, reference=reference)

    def done(_: int, part: Comparison | TaskFailure) -> None:
        if on_run_done is not None and isinstance(part, Comparison):
            for run in part.runs:
                on_run_done(run)

    tasks = [(str(agent_dir), scenario, tuple(names), rate, horizon, seed, deterministic) for seed in seeds]
    parts = executor.map(_evaluate_seed, tasks, on_done=done, keep_going=True)
    failed = [failed_task({"seed": seed}, part) for seed, part in zip(seeds, parts) if isinstance(part, TaskFailure)]
    comparison = merge_comparisons([part for part in parts if isinstance(part, Comparison)], names, [rate],
                                   list(seeds), horizon, failed)
    return replace(comparison, reference=reference)


def _compare_with_agent(model: Any, template: Any, scenario: Scenario, names: Sequence[str], rate: float,
                        horizon: float, seeds: list[int], deterministic: bool,
                        on_run_done: Callable[[PolicyRun], None] | None, engine: EngineFactory | None,
                        with_sim: bool) -> Comparison:
    """``compare`` of the agent (``model``, with the interface of its environment ``template``) and the baselines."""
    known, interface = template.control.known_lengths, template.control.settings

    def factory(setting, run_horizon):  # type: ignore[no-untyped-def]
        return AgentPolicy(model, setting, run_horizon, interface, deterministic=deterministic)

    return compare(scenario, names, [rate], horizon, seeds=seeds, factories={"agent": factory},
                   sees_output_lengths=SEES_OUTPUT_LENGTHS | ({"agent"} if known else set()),
                   on_run_done=on_run_done, engine=engine, with_sim=with_sim)


def _evaluate_seed(agent_dir: str, scenario: Scenario, names: tuple[str, ...], rate: float, horizon: float, seed: int,
                   deterministic: bool) -> Comparison:
    """One seed of :func:`evaluate_agent` on the simulator, as an executor's task: the agent read from its folder."""
    spec, model = read_agent(agent_dir)
    template = make_env(spec.env_id, spec.env_kwargs)
    return _compare_with_agent(model, template, scenario, names, rate, horizon, [seed], deterministic, None, None,
                               False)
