"""Merged exports: a fine-tuned model as one full set of safetensors weights, for serving elsewhere.

An adapter is loaded over its base in full precision (float32), merged with PEFT's ``merge_and_unload``
and saved with the adapter's tokenizer and a ``tuneforge.json`` that records the merge. Full and freeze
fine-tunes already are whole models and are exported as shipped. Each export is built once, into
``<home>/serving/merged/<model id, made safe>.tar.gz``, and written atomically (a temporary file, then a
rename), so concurrent requests and a crash mid-build never leave a half archive behind.

QLoRA (and 8-bit LoRA) adapters were trained against a quantized base; merging them onto the
full-precision weights is the usual way to export them, but it is not bit-identical to base+adapter as
trained, and the manifest says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from app.config import get_settings
from app.errors import ApiError
from worker.serving.engine import UNSERVABLE, VIRTUAL_TOKEN_TYPES, Target

# Methods whose adapter was trained on a quantized base, and how that base was quantized.
QUANTIZED_METHODS = {"qlora": "4-bit NF4", "lora_8bit": "8-bit"}
# Builds are slow and memory-hungry (a float32 copy of the base); one at a time is enough.
_build_lock = threading.Lock()


def not_mergeable(message: str) -> ApiError:
    return ApiError(400, message, param="model", code="not_mergeable")


def archive_path(model_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_id)
    return get_settings().resolved_home / "serving" / "merged" / f"{safe}.tar.gz"


def merged_archive(target: Target) -> Path:
    """The export of `target` as a .tar.gz (built on first request); 400 when there is nothing to merge."""
    if target.adapter_path is None:
        raise not_mergeable(
            f"'{target.model_id}' is already a base model: there is no adapter to merge. "
            "Download its weights from where it was registered."
        )
    check_mergeable(target.adapter_path)
    archive = archive_path(target.model_id)
    if archive.is_file():
        return archive
    with _build_lock:
        if archive.is_file():  # built by the request that held the lock before us
            return archive
        archive.parent.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".{archive.name}.tmp-", dir=archive.parent))
        try:
            if (target.adapter_path / "adapter_config.json").exists():
                folder = workdir / "model"
                merge(target, folder)
            else:
                folder = target.adapter_path  # a full or freeze fine-tune: the whole model, as shipped
            partial = workdir / "merged.tar.gz"
            with tarfile.open(partial, "w:gz") as tar:
                for path in sorted(folder.iterdir()):
                    tar.add(path, arcname=path.name)
            os.replace(partial, archive)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return archive


def check_mergeable(folder: Path) -> None:
    """Raise 400 not_mergeable for adapters whose weights are not deltas of the base's weights."""
    config_file = folder / "adapter_config.json"
    if not config_file.exists():
        return
    peft_type = json.loads(config_file.read_text()).get("peft_type")
    if peft_type in VIRTUAL_TOKEN_TYPES or peft_type in UNSERVABLE or peft_type == "ADAPTION_PROMPT":
        raise not_mergeable(
            f"This model is a {peft_type.lower()} adapter: it adds virtual tokens or adaption prompts "
            "instead of changing the base's weights, so it cannot be merged into them. Serve it with "
            "its base and the adapter download (GET /v1/models/{id}/adapter) instead."
        )


def merge(target: Target, into: Path) -> None:
    """Load base + adapter in float32, merge, and save weights, tokenizer and manifest into `into`."""
    assert target.adapter_path is not None
    adapter = target.adapter_path
    task = json.loads((adapter / "adapter_config.json").read_text()).get("task_type")
    load: dict[str, Any] = {"dtype": torch.float32, "use_safetensors": True, "trust_remote_code": False}
    if task == "SEQ_CLS":
        # The adapter's config.json names the labels; the head itself comes from the adapter.
        config = AutoConfig.from_pretrained(adapter, trust_remote_code=False)
        base = AutoModelForSequenceClassification.from_pretrained(target.base_path, config=config, **load)
    else:
        base = AutoModelForCausalLM.from_pretrained(target.base_path, **load)
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False).merge_and_unload()
    model.eval().save_pretrained(into, safe_serialization=True)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").exists() else target.base_path
    AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=False).save_pretrained(into)
    manifest_file = adapter / "tuneforge.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
    manifest["merged"] = merged_note(target.model_id, manifest)
    (into / "tuneforge.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def method_name(manifest: dict[str, Any]) -> str | None:
    """The job's `peft` method from its manifest (method.<type>.hyperparameters.peft), if recorded."""
    method = manifest.get("method") or {}
    section = method.get(method.get("type") or "") or {}
    peft = (section.get("hyperparameters") or {}).get("peft")
    return peft if isinstance(peft, str) else None


def merged_note(model_id: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `merged` record: which adapter, onto what base, and what that means for outputs."""
    method = method_name(manifest)
    quantized = QUANTIZED_METHODS.get(method or "")
    if quantized:
        note = (
            f"The adapter was trained against the {quantized} quantized base; it was merged onto the "
            "full-precision (dequantized) base weights in float32. Outputs may differ slightly from "
            f"base+adapter with the {quantized} base the adapter was trained on."
        )
    else:
        note = "The adapter was merged onto the full-precision base weights in float32 (merge_and_unload)."
    return {
        "from_adapter": model_id,
        "method": method,
        "base_dequantized": quantized is not None,
        "note": note,
    }
