"""Base models registered from this machine's disk: a model folder, a GGUF file, or a tiny Llama built
here. The training libraries are imported only when one is used (the API never does)."""

from pathlib import Path

from app.config import get_settings
from app.db import migrate
from app.db.session import session_scope
from app.models import service as model_service
from app.storage import get_store


def register_folder(name: str, folder: Path) -> str:
    """Register a local model folder as base model `name`; says where it went."""
    from worker.training.base_models import inspect_model

    profile = inspect_model(folder)
    migrate.upgrade()
    # In an object store, the folder goes up once and every host fetches it from there; else it is read
    # where it is.
    storage_key = get_store().put_model_folder(name, folder)
    with session_scope() as session:
        model_service.register_base_model(
            session, name=name, path=folder.resolve(), profile=profile, storage_key=storage_key
        )
    where = f"uploaded to {storage_key}" if storage_key else f"at {folder}"
    return f"registered base model {name} ({profile['architecture']}) {where}"


def make_tiny(
    name: str = "tiny-llama",
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    intermediate_size: int = 128,
) -> str:
    """Build a small random Llama with a chat template (once) and register it."""
    from worker.training.base_models import make_tiny_llama

    folder = get_settings().resolved_model_dir / name
    if not (folder / "config.json").exists():
        make_tiny_llama(
            folder, seed=seed, hidden_size=hidden_size, num_layers=layers, intermediate_size=intermediate_size
        )
    return register_folder(name, folder)


def import_gguf(file: Path, name: str) -> str:
    """Convert a GGUF file into a safetensors model folder (once) and register it."""
    from worker.training.base_models import import_gguf as convert

    folder = get_settings().resolved_model_dir / name
    if not (folder / "config.json").exists():
        convert(file, folder)
    return register_folder(name, folder)
