"""The live vLLM backend: a real vLLM engine behind :class:`llmsched_env.engine.Engine`, and cost-model calibration.

* :mod:`live_backend.scheduler`: a vLLM V1 ``Scheduler`` subclass (loaded through ``scheduler_cls``)
  that executes llmsched decisions;
* :mod:`live_backend.engine`: :class:`LiveVLLMEngine`, in-process ``LLMEngine`` stepping;
* :mod:`live_backend.vllm_adapter`: everything read of vLLM's internals, and the version gate;
* :mod:`live_backend.config`: engine configs (``cpu-tiny``, ``gpu-llama2-7b`` or a JSON file);
* :mod:`live_backend.calibrate`: batch-composition sweeps and the cost-model fit;
* :mod:`live_backend.runs`, :mod:`live_backend.env`: engines for ``evaluate --backend vllm`` and ``LLMSched-vLLM-v0``;
* :mod:`live_backend.tiny_model`: a tiny random Llama built locally, for tests and demos.

Install with the ``live`` (GPU) or ``live-cpu`` extra. Importing this package does not import vLLM.
"""
