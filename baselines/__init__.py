"""Reference scheduling policies: pure functions of the scheduler state behind one interface.

* :mod:`baselines.fcfs` — the engines' own schedulers (vLLM FCFS with preemption, Sarathi-Serve).
"""

from baselines.fcfs import FCFSPolicy, sarathi_policy, vllm_policy

__all__ = ["FCFSPolicy", "sarathi_policy", "vllm_policy"]
