"""The live vLLM backend: vLLM's engine behind :class:`llmsched_env.engine.Engine`, and cost-model calibration.

Empty until its issue lands; install with the ``live`` (GPU) or ``live-cpu`` extra.
"""
