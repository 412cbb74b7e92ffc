"""The vLLM backend: serve base models and finished LoRA adapters from a vLLM server.

Selected with ``TUNEFORGE_INFERENCE_BACKEND=vllm``. vLLM must run with LoRA enabled and runtime updates
allowed, so that adapters can be registered while it serves::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve <base> --enable-lora --max-loras 8 --max-lora-rank 64

Before a request reaches vLLM, `prepare` resolves the model id for the project (404 / 409 as the built-in
server decides them), unpacks a fine-tuned model's adapter once into ``<home>/vllm/adapters/<id>``,
registers it once per process with ``POST /v1/load_lora_adapter`` under its Tuneforge id, and rewrites
``model`` to the name vLLM knows. A base model's requests go through an all-zero adapter of their own
(``<base>:base``, `zero_adapter`): vLLM's CPU build gives base rows batched beside an adapter's rows that
adapter's output, and a batch in which every row has an adapter is served right. Only LoRA adapters
qualify: a full or freeze fine-tune is whole weights, which vLLM would serve from a server of its own per
model. Plain HTTP and the standard library: no torch.
"""

import json
import struct
import threading
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from sqlalchemy.orm import Session

from app.config import get_settings
from app.errors import ApiError
from app.jobs import service as job_service
from app.models import service as model_service
from app.storage import cache_folder, get_store, publish_folder, unpack_once

BASE_ADAPTER_SUFFIX = ":base"  # '<base id>:base' is the zero adapter base-model requests go through
# Registering an adapter makes vLLM read it from disk, possibly onto a GPU: allow it some time.
LOAD_TIMEOUT = httpx.Timeout(120.0, connect=5.0)

# lora_names this process has registered. vLLM forgets them when it restarts; `forget` drops a name
# when vLLM no longer knows it, so the next request registers it again.
_loaded: set[str] = set()
_loaded_lock = threading.Lock()


# The request fields Tuneforge documents, per route: nothing else of a tenant's body reaches vLLM, whose
# own extensions (guided decoding, raw sampling knobs, ...) are not part of Tuneforge's API.
_SHARED = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "user",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
}
DOCUMENTED_FIELDS = {
    "/v1/chat/completions": _SHARED
    | {
        "messages",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    },
    "/v1/completions": _SHARED | {"prompt", "logprobs"},
}


def documented_body(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The fields of `body` that Tuneforge documents for `path` (nulls dropped); 400 naming any other."""
    given = {name: value for name, value in body.items() if value is not None}
    unknown = sorted(set(given) - DOCUMENTED_FIELDS[path])
    if unknown:
        raise ApiError(
            400,
            f"'{unknown[0]}' is not supported by Tuneforge's chat and completions yet; leave it out and "
            f"retry (supported: {', '.join(sorted(DOCUMENTED_FIELDS[path]))}).",
            param=unknown[0],
            code="unsupported_parameter",
        )
    return given


def prepare(session: Session, *, project: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """`body`'s documented fields, `model` rewritten to vLLM's name for it; registers an adapter first."""
    body = documented_body(path, body)
    model_id = body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise ApiError(400, "'model' is required, e.g. \"tiny-llama\".", param="model", code="invalid_value")
    row = job_service.get_servable_model(session, project=project, model_id=model_id)
    if row.kind == model_service.BASE:
        if not get_settings().vllm_base_adapter:
            return body | {"model": served_name(row.id)}
        name = f"{row.id}{BASE_ADAPTER_SUFFIX}"
        if name not in _loaded:
            load_adapter(name, vllm_path(zero_adapter(name, row.profile or {})))
        return body | {"model": name}
    if not row.storage_key:
        raise ApiError(500, f"'{model_id}' has no adapter in the artifact store.", type="server_error")
    folder = unpacked(model_id, get_store().local_path(row.storage_key))
    check_lora(model_id, folder)
    if model_id not in _loaded:
        load_adapter(model_id, vllm_path(folder))
    return body | {"model": model_id}


def zero_adapter(name: str, profile: dict[str, Any]) -> Path:
    """A LoRA adapter that changes nothing (rank 1 on q_proj, all zeros), written once for the base of
    `profile` (its registered shape): the stand-in for the base in vLLM's batches (`vllm_base_adapter`).

    Written as safetensors by hand (an 8-byte header size, a JSON header, the tensors' bytes): the API
    has no torch, and zeros need nothing more.
    """
    folder = adapter_folder(name)
    if (folder / "adapter_model.safetensors").is_file():
        return folder
    if "q_proj" not in profile.get("linear_modules", []):
        raise ApiError(
            400,
            f"The vLLM backend serves base models through a zero LoRA adapter on q_proj, and '{name}' has "
            "no q_proj layers; set TUNEFORGE_VLLM_BASE_ADAPTER=false to send its requests to vLLM as they "
            "are.",
            param="model",
            code="model_not_servable",
        )
    hidden, queries = profile["hidden_size"], profile["num_attention_heads"] * profile["head_dim"]
    shapes = {}
    for layer in range(profile["num_layers"]):
        module = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        shapes[f"{module}.lora_A.weight"] = [1, hidden]
        shapes[f"{module}.lora_B.weight"] = [queries, 1]
    header, size = {}, 0
    for tensor, shape in shapes.items():
        header[tensor] = {
            "dtype": "F32",
            "shape": shape,
            "data_offsets": [size, size + 4 * shape[0] * shape[1]],
        }
        size += 4 * shape[0] * shape[1]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 1,
        "lora_alpha": 1,
        "target_modules": ["q_proj"],
    }

    def write(into: Path) -> None:
        (into / "adapter_config.json").write_text(json.dumps(config))
        (into / "adapter_model.safetensors").write_bytes(
            struct.pack("<Q", len(encoded)) + encoded + bytes(size)
        )

    return publish_folder(folder, write)  # atomically: vLLM never reads half of it


def served_name(base_id: str) -> str:
    """The name vLLM serves the base model `base_id` under."""
    return get_settings().vllm_served_model_names.get(base_id, base_id)


def forget(lora_name: str) -> None:
    """Register `lora_name` again on its next request (vLLM said it does not know it)."""
    with _loaded_lock:
        _loaded.discard(lora_name)


def adapter_folder(model_id: str) -> Path:
    return cache_folder("vllm", model_id)


def vllm_path(folder: Path) -> str:
    """`folder` as the vLLM server sees it: under vllm_adapter_dir when it mounts the adapters elsewhere."""
    mounted = get_settings().vllm_adapter_dir
    return str(PurePosixPath(mounted) / folder.name) if mounted else str(folder)


def unpacked(model_id: str, archive: Path) -> Path:
    """The adapter archive unpacked into its folder, once; atomically, so vLLM never reads half of it."""
    return unpack_once(archive, adapter_folder(model_id), model_id=model_id)


def check_lora(model_id: str, folder: Path) -> None:
    """400 model_not_servable unless `folder` holds a plain LoRA adapter for text generation."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        reason = (
            "it is a full or freeze fine-tune (whole model weights), which vLLM would need a server of its "
            "own to serve"
        )
    else:
        config = json.loads(config_file.read_text())
        peft_type = config.get("peft_type")
        if peft_type != "LORA":
            reason = f"it is a {peft_type} adapter"
        elif config.get("use_dora"):
            reason = "it is a DoRA adapter, which vLLM does not load"
        elif config.get("task_type") == "SEQ_CLS":
            reason = "it is a classification model, which answers /v1/classifications, not completions"
        else:
            return
    raise ApiError(
        400,
        f"Model '{model_id}' cannot be served by the vLLM backend: {reason}. vLLM serves LoRA adapters only; "
        "serve this model with TUNEFORGE_INFERENCE_BACKEND=builtin.",
        param="model",
        code="model_not_servable",
    )


def load_adapter(lora_name: str, lora_path: str) -> None:
    """Register the adapter with vLLM under `lora_name`; an adapter it already holds counts as success."""
    url = f"{get_settings().vllm_url.rstrip('/')}/v1/load_lora_adapter"
    try:
        response = httpx.post(
            url, json={"lora_name": lora_name, "lora_path": lora_path}, timeout=LOAD_TIMEOUT
        )
    except httpx.TransportError as exc:
        raise unavailable(exc) from None
    already = response.status_code == 400 and "already been loaded" in response.text
    if not response.is_success and not already:
        hint = (
            " Does vLLM see the adapter folder at that path? Set TUNEFORGE_VLLM_ADAPTER_DIR to where the "
            "shared volume is mounted on the vLLM side."
            if response.status_code == 404
            else ""
        )
        raise ApiError(
            502,
            f"vLLM at {url} could not load the adapter of '{lora_name}' from '{lora_path}': HTTP "
            f"{response.status_code}: {_message(response)}.{hint}",
            type="server_error",
            code="adapter_load_failed",
        )
    with _loaded_lock:
        _loaded.add(lora_name)


def unavailable(exc: Exception) -> ApiError:
    """The 503 for a vLLM server that cannot be reached."""
    url = get_settings().vllm_url.rstrip("/")
    return ApiError(
        503,
        f"The vLLM server at {url} is not reachable ({exc.__class__.__name__}). Start it with "
        "`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve <base> --enable-lora` and point "
        "TUNEFORGE_VLLM_URL at it.",
        type="server_error",
        code="inference_unavailable",
    )


def _message(response: httpx.Response) -> str:
    """vLLM's error message: `{"error": {"message"}}` in newer versions, `{"message"}` in older ones."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in body:
            return str(body["message"])
    return response.text[:300]
