"""PPO agents trained against the baselines (stable-baselines3); built on the Gymnasium environment.

Empty until the environment lands: an agent is a :class:`llmsched_env.policy.Policy` like any other.
"""
