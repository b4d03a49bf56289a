"""PPO agents trained against the baselines (stable-baselines3), on the Gymnasium environments: per-workload agents
on ``LLMSched-v0`` (:mod:`agents.policy`) and workload-independent residual agents on ``LLMSched-Residual-v0`` to
``-v2`` (:mod:`agents.residual`). A trained agent is a :class:`llmsched_env.policy.Policy` like any other.
"""
