"""Load a Ferret checkpoint folder for inference: tokenizer, model, image processor, context length.

Accepted folders: the released layout (config.json with model_type "ferret", sharded
`pytorch_model-0000X-of-0000Y.bin` + `pytorch_model.bin.index.json`, tokenizer files) or the
safetensors layout `save_pretrained` writes. Nothing is downloaded. 8-bit and 4-bit (nf4) loading
go through bitsandbytes; the vision tower, projector, region module and lm_head stay unquantized.

`model_path=None` means "the default model": `$FERRET_MODEL_PATH` when set, else the embedded
model shipped in `ferret/assets/model` (a small Ferret trained on the synthetic shapes world, see
its MODEL_CARD.md). When that folder is missing or incomplete, `NoDefaultModelError` says so.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from ferret.constants import REGION_TOKEN
from ferret.model.checkpoint_io import require_folder
from ferret.model.configuration_ferret import FerretConfig
from ferret.model.modeling_ferret import FULL_PRECISION_MODULES, FerretLlamaForCausalLM

MODEL_PATH_ENV = "FERRET_MODEL_PATH"
# The default model shipped with the package (train/configs/embedded.yaml, MODEL_CARD.md there).
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "model"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class NoDefaultModelError(FileNotFoundError):
    """No model path was given, $FERRET_MODEL_PATH is unset and the embedded model is missing."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's weights do not fit the model its config describes."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def default_attn_implementation(device: torch.device) -> str:
    """flash_attention_2 on CUDA when flash_attn is installed, else PyTorch SDPA."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def resolve_model_path(model_path: str | os.PathLike | None) -> Path:
    """The folder to load: `model_path`, else $FERRET_MODEL_PATH, else the embedded model."""
    if model_path is None:
        model_path = os.environ.get(MODEL_PATH_ENV)
        if not model_path:
            return embedded_model_path()
    return require_folder(model_path, "model")


def embedded_model_path() -> Path:
    """The shipped default model's folder; NoDefaultModelError when it is missing or incomplete."""
    folder = Path(EMBEDDED_MODEL_DIR)
    if not (folder / "config.json").is_file() or not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise NoDefaultModelError(
            f"no model path given, ${MODEL_PATH_ENV} is not set and the embedded model folder {str(folder)!r} "
            "has no config.json and weights: pass a checkpoint folder; for a random tiny model to try the "
            "pipeline run `python -c \"from ferret.model.tiny import save_tiny_model; save_tiny_model('tiny-ferret')\"`"
        )
    return folder


def read_ferret_config(path: Path) -> FerretConfig:
    """The folder's config.json as a FerretConfig; clear errors for a missing/foreign/broken config."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: not a model checkpoint folder")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != FerretConfig.model_type:
        raise ValueError(
            f"{config_file} has model_type {model_type!r}; a Ferret checkpoint needs {FerretConfig.model_type!r}"
        )
    try:
        return FerretConfig.from_pretrained(str(path))
    except ValueError:
        raise
    except Exception as error:  # strict-dataclass field errors are not ValueErrors
        raise ValueError(f"{config_file} is not a valid Ferret config: {error}") from None


def _check_weights_present(path: Path) -> None:
    if any((path / name).is_file() for name in WEIGHT_FILES):
        return
    raise FileNotFoundError(f"{str(path)!r} has a config.json but no weights ({', '.join(WEIGHT_FILES)})")


def quantization_config(load_8bit: bool, load_4bit: bool, compute_dtype: torch.dtype):
    if load_8bit and load_4bit:
        raise ValueError("choose one of load_8bit and load_4bit")
    if not (load_8bit or load_4bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("8-bit/4-bit loading needs bitsandbytes: pip install 'ferret-kernels[demo]'")
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(FULL_PRECISION_MODULES))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(FULL_PRECISION_MODULES),
    )


def load_tokenizer(path: Path, config: FerretConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if REGION_TOKEN not in tokenizer.get_vocab():
        # Released checkpoints may ship the plain Vicuna tokenizer; the region token is appended.
        tokenizer.add_tokens([REGION_TOKEN], special_tokens=True)
    region_id = tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    if config.im_region_fea_token is not None and region_id != config.im_region_fea_token:
        raise CheckpointMismatchError(
            f"tokenizer in {str(path)!r} maps {REGION_TOKEN} to id {region_id} but config.json says "
            f"im_region_fea_token={config.im_region_fea_token}"
        )
    if len(tokenizer) > config.vocab_size:
        raise CheckpointMismatchError(
            f"tokenizer in {str(path)!r} has {len(tokenizer)} tokens but the model vocabulary is {config.vocab_size}"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def load_pretrained(
    model_path: str | os.PathLike | None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
):
    """-> (tokenizer, model, image_processor, context_len) for a Ferret checkpoint folder."""
    path = resolve_model_path(model_path)
    config = read_ferret_config(path)
    _check_weights_present(path)
    target = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if target.type == "cuda" else torch.float32
    quantization = quantization_config(load_8bit, load_4bit, dtype)
    tokenizer = load_tokenizer(path, config)

    kwargs = dict(
        config=config,
        dtype=dtype,
        attn_implementation=default_attn_implementation(target),
        device_map={"": str(target)},  # load straight onto the device, one device for everything
        output_loading_info=True,
        # Collect shape mismatches instead of failing inside transformers; _check_loading_info
        # then names them in a CheckpointMismatchError.
        ignore_mismatched_sizes=True,
    )
    if quantization is not None:
        kwargs.update(quantization_config=quantization)
    model, info = FerretLlamaForCausalLM.from_pretrained(str(path), **kwargs)
    _check_loading_info(path, config, model, info)
    model.eval()

    image_processor = _image_processor_for(config)
    context_len = getattr(config, "max_sequence_length", None) or config.max_position_embeddings
    return tokenizer, model, image_processor, context_len


def _check_loading_info(path: Path, config: FerretConfig, model: FerretLlamaForCausalLM, info: dict) -> None:
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(key[0] if isinstance(key, tuple) else key) for key in info.get("mismatched_keys") or [])
    tower_prefix = "model.vision_tower."
    if missing and all(key.startswith(tower_prefix) for key in missing):
        folder = Path(config.mm_vision_tower or "")
        if config.mm_vision_tower and (folder / "config.json").is_file():
            # A checkpoint saved without the frozen tower: take the tower from its local CLIP folder.
            model.get_vision_tower().load_clip_weights(folder)
            missing = []
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"weights in {str(path)!r} do not fit its config: {len(missing)} missing {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}, {len(mismatched)} mismatched {mismatched[:4]}"
        )


def _image_processor_for(config: FerretConfig):
    from ferret.processing import build_image_processor

    return build_image_processor(config.vision_tower_config().image_size)
