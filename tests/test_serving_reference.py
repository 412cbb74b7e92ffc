"""The engine against an independent reference: plain transformers + PEFT `generate`, greedy, on tiny-llama.

The other serving tests compare the engine with itself (a mixed batch with each row alone, swapped weights
with PEFT's layers in the engine); here every answer must be what PEFT itself generates for the same model
and chat: for each kind of fine-tune the engine serves its own way (plain LoRA in shared batches, DoRA and a
full fine-tune on models of their own), for every row of a mixed batch, and for runs of one adapter on the
engine's swapped-in merged weights, which must also be the very weights PEFT's `merge_and_unload` makes.

Greedy decoding in float32 on the CPU is exact up to the order of float sums: padding a row, or computing
(W + BA)x rather than Wx + B(Ax), moves tiny-llama's logits by about 2e-7. So answers are compared exactly
(text, finish reason and token counts), and the reference checks that no step it compares is a near tie
(top-1 margin under NEAR_TIE) that such a difference could legitimately flip. The engine reports text, not
token ids: a wrong token changes the text from there on, unless it is the last one and decodes alike.
"""

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import (
    AdaptionPromptConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.test_serving import BASE, QUESTIONS, chat, make_lora, run, target
from worker.serving.engine import Engine, GenerationRequest, adapter_name
from worker.training.base_models import make_tiny_llama

MAX_TOKENS = 8
ASKED = QUESTIONS[:3]  # three prompt lengths, so batches are left-padded
NEAR_TIE = 1e-5  # 50 times the largest logit difference padding or merging was seen to make
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA, WIDE_LORA, DORA, FULL, PREFIX, PROMPT, PTUNING, LLAMA_ADAPTER = (
    f"ft:{BASE}:{kind}:job{i}"
    for i, kind in enumerate(("lora", "wide", "dora", "full", "prefix", "prompt", "ptuning", "llama-adapter"))
)
OWN_MODELS = (DORA, FULL, PREFIX, PROMPT, PTUNING, LLAMA_ADAPTER)  # each served on a model of its own
Answer = tuple[str, str | None, int, int]  # (text, finish_reason, prompt_tokens, completion_tokens) as `run`


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base") / BASE
    make_tiny_llama(folder, seed=0)
    return folder


def make_full_fine_tune(base_folder: Path, dest: Path, seed: int) -> Path:
    """A full fine-tune as training ships one: every weight of the base moved, saved as a whole model."""
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * param.std().clamp(min=0.01))
    model.save_pretrained(dest)
    return dest


def make_prompt_learning(base_folder: Path, dest: Path, config: Any, seed: int, scale: float = 1.0) -> Path:
    """A prompt-learning adapter (or LLaMA-Adapter) with its learned weights moved off their start by
    `scale` standard deviations, so that it changes the answers (LLaMA-Adapter's gates start at zero,
    where it changes nothing)."""
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def fine_tuned(base_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model id -> folder: a LoRA on three layers, one on every linear layer and the embeddings (rsLoRA,
    another rank and alpha), a DoRA, a full fine-tune, and prefix, prompt and P-tuning and LLaMA-Adapter,
    as Tuneforge's methods configure them (worker/training/methods.py)."""
    root = tmp_path_factory.mktemp("fine-tuned")
    wide = LoraConfig(
        r=8,
        lora_alpha=32,
        use_rslora=True,
        target_modules=[*ALL_LINEAR, "embed_tokens"],
        task_type="CAUSAL_LM",
    )
    dora = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=ALL_LINEAR, task_type="CAUSAL_LM")
    virtual = {"num_virtual_tokens": 6, "task_type": "CAUSAL_LM"}
    llama_adapter = AdaptionPromptConfig(adapter_len=6, adapter_layers=2, task_type="CAUSAL_LM")
    return {
        LORA: make_lora(base_folder, root / "lora", seed=1),
        WIDE_LORA: make_lora(base_folder, root / "wide", seed=2, config=wide),
        DORA: make_lora(base_folder, root / "dora", seed=3, config=dora),
        FULL: make_full_fine_tune(base_folder, root / "full", seed=4),
        # A prefix's keys and values move the answers of this random model less than embeddings do.
        PREFIX: make_prompt_learning(base_folder, root / "prefix", PrefixTuningConfig(**virtual), 5, scale=8),
        PROMPT: make_prompt_learning(base_folder, root / "prompt", PromptTuningConfig(**virtual), seed=6),
        PTUNING: make_prompt_learning(base_folder, root / "ptuning", PromptEncoderConfig(**virtual), seed=7),
        LLAMA_ADAPTER: make_prompt_learning(base_folder, root / "llama-adapter", llama_adapter, seed=8),
    }


def reference_model(base_folder: Path, model_id: str, fine_tuned: dict[str, Path]) -> Any:
    """The model as transformers and PEFT load it: the base, the base plus the adapter, or the full model."""
    if model_id == FULL:
        return AutoModelForCausalLM.from_pretrained(fine_tuned[FULL], dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    if model_id == BASE:
        return base.eval()
    return PeftModel.from_pretrained(base, fine_tuned[model_id]).eval()


def generate(model: Any, tokenizer: Any, question: str) -> Answer:
    """The greedy answer of `model.generate` to one chat, as the engine reports an answer."""
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    prompt_tokens = prompt["input_ids"].shape[1]
    with torch.no_grad():
        if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
            ids, steps = _recomputed(model, prompt["input_ids"], model.generation_config.eos_token_id)
        else:
            out = model.generate(
                **prompt,
                do_sample=False,
                max_new_tokens=MAX_TOKENS,
                output_logits=True,
                return_dict_in_generate=True,
            )
            ids, steps = out.sequences[0, prompt_tokens:].tolist(), out.logits
    for step, logits in enumerate(steps):
        top = torch.topk(logits[0].float(), 2).values
        assert top[0] - top[1] >= NEAR_TIE, (
            f"step {step} of the answer to {question!r} is a near tie ({float(top[0] - top[1]):.1e}): "
            "float order could flip it. Ask another question."
        )
    finish = "stop" if ids[-1] == model.generation_config.eos_token_id else "length"
    return tokenizer.decode(ids, skip_special_tokens=True), finish, prompt_tokens, len(ids)


def _recomputed(model: Any, input_ids: torch.Tensor, eos: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by PEFT's forward pass over the whole sequence at every step, no cache: each answer
    token sees the virtual tokens exactly as training showed them.

    Prompt learning's reference is this rather than `generate`: with PEFT 0.21.2 and transformers 5.24,
    `generate` answers as the base model would for prefix tuning (the prefix's keys and values do not
    reach its decoding), and for prompt and P-tuning its answers part from the forward pass's after a few
    tokens (its decoding steps do not position the answer's tokens as the forward pass and training do).
    """
    ids: list[int] = []
    steps = []
    for _ in range(MAX_TOKENS):
        sequence = torch.cat([input_ids, torch.tensor([ids], dtype=torch.long)], dim=1)
        logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1, :]
        steps.append(logits)
        ids.append(int(logits[0].argmax()))
        if ids[-1] == eos:
            break
    return ids, steps


@pytest.fixture(scope="module")
def references(base_folder: Path, fine_tuned: dict[str, Path]) -> dict[str, list[Answer]]:
    """Model id -> its reference answer to each of ASKED."""
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    answers = {}
    for model_id in [BASE, *fine_tuned]:
        model = reference_model(base_folder, model_id, fine_tuned)
        answers[model_id] = [generate(model, tokenizer, q) for q in ASKED]
    for model_id in fine_tuned:  # a fine-tune that answers as the base would prove nothing
        assert all(mine[0] != base[0] for mine, base in zip(answers[model_id], answers[BASE], strict=True)), (
            model_id
        )
    return answers


def ask(base_folder: Path, fine_tuned: dict[str, Path], model_id: str, question: str) -> GenerationRequest:
    t = target(base_folder) if model_id == BASE else target(base_folder, model_id, fine_tuned[model_id])
    return chat(t, question, max_tokens=MAX_TOKENS)


def test_each_kind_of_fine_tune_answers_as_peft_generate(
    base_folder: Path, fine_tuned: dict[str, Path], references: dict[str, list[Answer]]
) -> None:
    """One chat per batch: each LoRA's first batch runs on PEFT's layers, the next ones on swapped-in weights;
    DoRA and the full fine-tune on models of their own; the base first alone, last beside loaded adapters."""
    engine = Engine()
    for model_id in [BASE, LORA, WIDE_LORA, *OWN_MODELS, BASE]:
        answers = [run(engine, [ask(base_folder, fine_tuned, model_id, q)])[0] for q in ASKED]
        assert answers == references[model_id], model_id


def test_mixed_batches_answer_row_by_row_as_peft_generate(
    base_folder: Path, fine_tuned: dict[str, Path], references: dict[str, list[Answer]]
) -> None:
    """The base and two LoRAs share one batch (in an order that reads differently backwards); every model of
    its own batches its own rows. Prompts of different lengths are left-padded (after the virtual tokens of
    prompt learning)."""
    engine = Engine()
    rows = [(BASE, 0), (LORA, 1), (WIDE_LORA, 2), (WIDE_LORA, 0), (LORA, 2)]
    requests = [ask(base_folder, fine_tuned, model_id, ASKED[q]) for model_id, q in rows]
    assert run(engine, requests) == [references[model_id][q] for model_id, q in rows]
    for model_id in OWN_MODELS:
        requests = [ask(base_folder, fine_tuned, model_id, q) for q in ASKED]
        assert run(engine, requests) == references[model_id], model_id


@pytest.mark.parametrize("model_id", [LORA, WIDE_LORA])
def test_swapped_in_weights_are_peft_merge_and_unload(
    base_folder: Path, fine_tuned: dict[str, Path], references: dict[str, list[Answer]], model_id: str
) -> None:
    """Back-to-back batches of one LoRA run on W + BA: to the bit the weights `merge_and_unload` makes, and
    answering as the merged model does."""
    merged = reference_model(base_folder, model_id, fine_tuned).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    merged_answers = [generate(merged, tokenizer, q) for q in ASKED]
    assert merged_answers == references[model_id]  # the reference agrees with itself

    engine = Engine()
    run(engine, [ask(base_folder, fine_tuned, other, "Hi") for other in (LORA, WIDE_LORA)])  # both loaded
    answers = [run(engine, [ask(base_folder, fine_tuned, model_id, q)])[0] for q in ASKED]
    base = engine.base(BASE, base_folder)
    assert base.alone == adapter_name(model_id)  # swapped in from the second batch on
    assert answers == merged_answers
    swapped = {
        name.replace(".base_layer", ""): weight
        for name, weight in base.model.get_base_model().named_parameters()
        if "lora_" not in name
    }
    expected = dict(merged.named_parameters())
    assert swapped.keys() == expected.keys()
    differing = [name for name, weight in expected.items() if not torch.equal(swapped[name], weight)]
    assert differing == [], differing
