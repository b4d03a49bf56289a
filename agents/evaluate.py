"""Evaluation: a trained agent beside the baselines on the same arrivals, over held-out seeds.

It is ``llmsched compare`` with one more policy, named ``agent``: the same runs, rows, tables, CSV,
JSON, Markdown and plots, plus the summary over seeds with 95 % intervals and the ratio of the
agent's regret to the reference baseline's (WAIT with known lengths, Nested WAIT with hidden ones).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from agents.policy import AgentPolicy, read_agent
from agents.train import make_env
from baselines.compare import SEES_OUTPUT_LENGTHS, EngineFactory, compare
from llmsched_env.errors import ConfigError
from llmsched_env.report import Comparison, PolicyRun
from llmsched_env.scenario import Scenario

DEFAULT_SEEDS = tuple(range(10))  # held out: training draws its arrivals from its own seed, validation uses 1000+


def evaluate_agent(agent_dir: str | Path, *, policies: Sequence[str] = ("wait", "nested-wait", "vllm", "sarathi"),
                   seeds: Sequence[int] = DEFAULT_SEEDS, horizon: float | None = None, rate: float | None = None,
                   reference: str | None = None, deterministic: bool = True,
                   on_start: Callable[[int], None] | None = None,
                   on_run_done: Callable[[PolicyRun], None] | None = None,
                   scenario: Scenario | None = None, engine: EngineFactory | None = None,
                   with_sim: bool = False) -> Comparison:
    """Run the agent in ``agent_dir`` and ``policies`` on the scenario it was trained on (at ``rate``, default
    the middle of its training range) for each seed; the comparison's reference is set for the ratio.
    ``on_start`` is told how many runs there will be, ``on_run_done`` is called after each.

    On another backend, ``engine`` builds each run's engine and ``scenario`` replaces the training one
    (the live engine's capacity and calibrated cost model: the agent's observation is normalised by the
    fluid targets of the scenario it runs in); ``with_sim`` adds the simulator's rows (see ``compare``).
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
    interface = template.control.settings
    reference = reference or ("wait" if known else "nested-wait")
    names = ["agent", *[p for p in policies if p != "agent"]]
    if reference not in names:
        names.append(reference)
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    if on_start is not None:
        on_start(len(names) * len(seeds) * (2 if engine is not None and with_sim else 1))

    def factory(setting, run_horizon):  # type: ignore[no-untyped-def]
        return AgentPolicy(model, setting, run_horizon, interface, deterministic=deterministic)

    comparison = compare(scenario, names, [rate], horizon, seeds=seeds, factories={"agent": factory},
                         sees_output_lengths=SEES_OUTPUT_LENGTHS | ({"agent"} if known else set()),
                         on_run_done=on_run_done, engine=engine, with_sim=with_sim)
    return replace(comparison, reference=reference)
