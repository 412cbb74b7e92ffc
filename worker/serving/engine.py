"""The generation engine: base models resident once, fine-tuned adapters loaded on demand, LRU-evicted.

Requests run in continuous batches (`decode.Batch`), one per group: `admit` prefills newcomers and adds
them to their group's running batch, `step` runs one decode step of every batch, and rows leave as they
finish. Plain LoRA adapters of a base live together in one PeftModel over that base and share a group:
every row names its adapter (or ``__base__``) through PEFT's ``adapter_names``, so requests for different
adapters and for the base share each forward pass. PEFT 0.21 supports ``adapter_names`` for LoRA layers
only, and refuses it for DoRA; so every other fine-tuned model (DoRA, LoHa, LoKr, IA3, and full or freeze
fine-tunes that ship whole weights) is served from its own model, loaded from the base folder plus that
adapter, and is a group of its own. Those own models count against the same LRU limit, and have their
adapter merged into their weights when they load. Prompt-learning adapters (prompt tuning, P-tuning,
prefix tuning) are own models too, unmerged: their virtual tokens go before every prompt at prefill, as
embeddings or as the prefix's keys and values, and decoding then runs on the base model alone. LLaMA-Adapter
runs as PEFT's gated attention layers (nothing to merge).

When the rows of a base's forward passes all use one LoRA adapter for SWAP_AFTER_STEPS passes in a row
(the common case under light load), they run on merged weights: each adapted layer's weight is swapped for
W + BA, computed once, and the original tensor goes back, bit for bit, before a pass needs the base or
other adapters. That takes PEFT's per-layer LoRA work out of every decode step, at the cost of one extra
copy of the adapted weights while an adapter is swapped in (``merge_single_adapter=False`` turns it off).
Passes on the base alone likewise run with the LoRA layers switched off.

The engine is not thread-safe: the batcher calls it from its one worker thread. Nothing here knows HTTP.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import torch
from peft import PeftModel, PeftType
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.serving import tools as tools_module
from worker.serving.constrain import Constraint, tokenizer_for
from worker.serving.decode import BASE_ADAPTER, Batch, Forward, Row, Step
from worker.serving.telemetry import ADAPTER_EVICTIONS, ADAPTER_LOADS

# Adapter types PEFT can mix in one batch with `adapter_names` (checked in peft/tuners/lora/layer.py).
MIXABLE_PEFT_TYPES = {"LORA"}
SWAP_AFTER_STEPS = 24
"""Forward passes on one LoRA adapter alone after which its merged weights are swapped in. A swap and its
undoing cost a few decode steps' work, so it must wait for a run that is likely to go on: at 4, traffic
alternating between adapters in 16-token answers ran 1.14x slower than never swapping (bench/serving.py)."""
# Prompt-learning adapters served on their own model, their virtual tokens before every prompt.
VIRTUAL_TOKEN_TYPES = {"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"}
UNSERVABLE = {  # Tuneforge trains neither; a folder of one, registered by hand, is refused saying why
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning adapters need a task id with every request, and "
    "OpenAI's API has no field to send one",
    "CPT": "CPT adapters are prompt-tuned on in-context examples whose token types every request would "
    "have to send again, and OpenAI's API has no field for them",
}


class Refused(ValueError):
    """A request this model cannot serve as asked: `field` is the request field at fault, `code` says why."""

    def __init__(self, message: str, *, field: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.field, self.code = field, code


class PromptTooLong(Refused):
    """The prompt, with the tokens asked for, does not fit the model's context window."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message, field=field, code="context_length_exceeded")


class UnsupportedModel(ValueError):
    """A fine-tuned model this engine cannot generate with (a classifier, a multitask prompt adapter)."""


@dataclass(frozen=True)
class Target:
    """Which weights serve a request: a base model folder, plus an adapter (or full model) folder."""

    model_id: str
    base_id: str
    base_path: Path
    adapter_path: Path | None = None


@dataclass
class GenerationRequest:
    """One completion request: a chat (`messages`), a raw `prompt` or its token ids, and sampling settings.

    `max_tokens` is the caller's own limit: more than fits after the prompt is refused, as OpenAI does.
    `default_max_tokens` applies when the caller set none, cut to what fits (None: up to the context).
    """

    target: Target
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None  # OpenAI's tool definitions, for the chat template
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    max_tokens: int | None = None
    default_max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    project: str = ""
    grammar: str | None = None  # llguidance's grammar the answer must follow (see constrain.py)
    grammar_field: str = "response_format"  # the request field the grammar comes from, for errors


@dataclass
class Prepared:
    """A request tokenized and checked, ready to join a batch of its `group`."""

    request: GenerationRequest
    row: Row
    group: str


@dataclass
class _Base:
    tokenizer: Any
    model: Any  # the plain model until its first LoRA adapter arrives, then the PeftModel around it
    context: int
    vocab: int  # token ids a prompt may hold: the input embedding's rows
    eos_ids: set[int]
    pad_id: int
    # The one adapter (or __base__) the model is set up to serve alone, with each swapped layer's weight.
    alone: str | None = None
    last_single: str | None = None  # the adapter of the last forward pass, when it had just one
    streak: int = 0  # forward passes in a row on `last_single`
    originals: list[tuple[torch.nn.Module, torch.nn.Parameter]] = field(default_factory=list)
    grammar_tokenizer: Any = None  # llguidance's view of `tokenizer`, made when a grammar first needs it


def adapter_name(model_id: str) -> str:
    """A PEFT adapter name for a model id: module names may not hold '.', and ids hold ':' and '/'."""
    digest = hashlib.sha1(model_id.encode()).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9_]", "_", model_id)[-40:] + "_" + digest


@lru_cache(maxsize=1024)
def adapter_kind(folder: Path) -> str:
    """'lora' (mixable), 'own' (its own model) or 'prompt' (its own, with virtual tokens) for a folder;
    raise if it cannot be served."""
    config_file = folder / "adapter_config.json"
    not_generative = "this is a classification model; it answers /v1/classifications, not completions"
    if not config_file.exists():
        if (folder / "config.json").exists():
            architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
            if any(name.endswith("ForSequenceClassification") for name in architectures):
                raise UnsupportedModel(not_generative)
            return "own"  # full or freeze fine-tune: whole weights
        raise UnsupportedModel(f"{folder} holds neither an adapter nor model weights")
    config = json.loads(config_file.read_text())
    peft_type, task = config.get("peft_type"), config.get("task_type")
    if task == "SEQ_CLS":
        raise UnsupportedModel(not_generative)
    if peft_type in UNSERVABLE:
        raise UnsupportedModel(UNSERVABLE[peft_type])
    if peft_type in VIRTUAL_TOKEN_TYPES:
        return "prompt"
    if (
        peft_type in MIXABLE_PEFT_TYPES
        and not config.get("use_dora")
        and not config.get("alora_invocation_tokens")
    ):
        return "lora"
    return "own"


def _virtual_tokens(folder: Path | None) -> int:
    """The context positions a prompt-learning adapter's virtual tokens take before every prompt."""
    if folder is None or adapter_kind(folder) != "prompt":
        return 0
    return int(json.loads((folder / "adapter_config.json").read_text())["num_virtual_tokens"])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(folder: Path, device: torch.device) -> Any:
    """A causal LM from a local folder: safetensors only, no remote code, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=_dtype(device), use_safetensors=True, trust_remote_code=False
    )
    return model.to(device).eval()


class Engine:
    """Resident base models and an LRU of active fine-tuned models; generates for batches of one group."""

    def __init__(
        self,
        *,
        max_active_adapters: int = 8,
        device: torch.device | None = None,
        merge_single_adapter: bool = True,
    ) -> None:
        if max_active_adapters < 1:
            raise ValueError("max_active_adapters must be at least 1")
        self.max_active = max_active_adapters
        self.merge_single_adapter = merge_single_adapter
        self.device = device or default_device()
        self._bases: dict[str, _Base] = {}
        # adapter name -> (kind, base id, own model or None), least recently used first
        self._active: OrderedDict[str, tuple[str, str, Any]] = OrderedDict()
        self.loads = 0  # adapters loaded so far: tests and metrics read it
        self._batches: dict[str, Batch] = {}  # group -> its running batch
        self._routes: dict[str, tuple[_Base, str | None]] = {}  # group -> its base, and own model's name

    # --- residency -------------------------------------------------------------------------------------
    def base(self, base_id: str, path: Path) -> _Base:
        """The resident base model `base_id`, loaded once from `path`."""
        if base_id not in self._bases:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            model = load_model(path, self.device)
            eos = model.generation_config.eos_token_id
            eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            eos_ids |= {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
            context = model.config.get_text_config().max_position_embeddings
            vocab = model.get_input_embeddings().num_embeddings
            self._bases[base_id] = _Base(tokenizer, model, context, vocab, eos_ids, pad)
        return self._bases[base_id]

    def active_adapters(self) -> list[str]:
        """Adapter names currently loaded, least recently used first."""
        return list(self._active)

    def group(self, target: Target) -> str:
        """Requests of one group can share a batch: a base with its LoRA adapters, or one own model."""
        if target.adapter_path is None or adapter_kind(target.adapter_path) == "lora":
            return f"base:{target.base_id}"
        return f"own:{adapter_name(target.model_id)}"

    def ensure_adapter(self, target: Target, *, pinned: frozenset[str] = frozenset()) -> str:
        """Make the target's adapter active (loading it if needed, evicting the LRU one); return its name."""
        if target.adapter_path is None:
            return BASE_ADAPTER
        name = adapter_name(target.model_id)
        if name in self._active:
            self._active.move_to_end(name)
            return name
        while len(self._active) >= self.max_active:
            victim = next((n for n in self._active if n not in pinned), None)
            if victim is None:
                raise RuntimeError("more adapters in one batch than max_active_adapters")
            self._evict(victim)
        kind = adapter_kind(target.adapter_path)
        base = self.base(target.base_id, target.base_path)
        own = None
        if kind == "lora":
            self._serve_mixed(base)  # a new adapter's layers must join the enabled, unswapped state
            if isinstance(base.model, PeftModel):
                base.model.load_adapter(str(target.adapter_path), adapter_name=name, is_trainable=False)
            else:
                base.model = PeftModel.from_pretrained(
                    base.model, str(target.adapter_path), adapter_name=name, is_trainable=False
                ).eval()
        elif (target.adapter_path / "adapter_config.json").exists():
            own = PeftModel.from_pretrained(
                load_model(target.base_path, self.device), str(target.adapter_path), is_trainable=False
            ).eval()
            # Its own copy of the base: merging costs nothing more and spares every step the adapter's work.
            # Virtual tokens and LLaMA-Adapter's gated attention have nothing to merge: they run as PEFT's.
            if kind == "own" and own.peft_config["default"].peft_type != PeftType.ADAPTION_PROMPT:
                own = own.merge_and_unload().eval()
        else:
            own = load_model(target.adapter_path, self.device)
        self._active[name] = (kind, target.base_id, own)
        self.loads += 1
        ADAPTER_LOADS.inc()
        return name

    def _evict(self, name: str) -> None:
        kind, base_id, _own = self._active.pop(name)
        ADAPTER_EVICTIONS.inc()
        if kind != "lora":
            return  # dropping the reference frees its own model
        base = self._bases[base_id]
        self._serve_mixed(base)
        model = base.model
        model.delete_adapter(name)
        remaining = [n for n in model.peft_config if n != name]
        # PEFT may leave no adapter active after a delete; mixed batches need an active one to route rows.
        if remaining and not set(model.active_adapters) <= set(remaining):
            model.set_adapter(remaining[0])

    # --- requests -------------------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> Prepared:
        """Render and tokenize the prompt, check it fits the context, and fix the token budget."""
        target = request.target
        base = self.base(target.base_id, target.base_path)
        group = self.group(target)  # raises UnsupportedModel early, before the request joins a batch
        field = "messages" if request.messages is not None else "prompt"
        if request.max_tokens is not None and request.max_tokens > base.context:
            raise Refused(
                f"{request.max_tokens} tokens asked for; model '{target.model_id}' has a context of "
                f"{base.context} tokens, prompt included. Ask for fewer tokens.",
                field="max_tokens",
            )
        ids = self._prompt_ids(request, base)
        room = base.context - len(ids) - _virtual_tokens(target.adapter_path)
        if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
            asked = f"; with max_tokens {request.max_tokens}" if request.max_tokens is not None else ""
            raise PromptTooLong(
                f"The prompt is {len(ids)} tokens{asked}; model '{target.model_id}' has a context of "
                f"{base.context} tokens. Shorten the prompt or ask for fewer tokens.",
                field=field,
            )
        max_tokens = request.max_tokens or min(request.default_max_tokens or room, room)
        outside = next((i for i in request.logit_bias if not 0 <= i < base.vocab), None)
        if outside is not None:
            raise Refused(
                f"logit_bias names token id {outside}, which is not in the vocabulary of model "
                f"'{target.model_id}' (ids 0 to {base.vocab - 1}).",
                field="logit_bias",
            )
        constraint = None
        if request.grammar is not None:
            if base.grammar_tokenizer is None:
                base.grammar_tokenizer = tokenizer_for(base.tokenizer, base.vocab, base.eos_ids)
            try:
                constraint = Constraint(base.grammar_tokenizer, request.grammar)
            except ValueError as exc:
                raise Refused(f"This format cannot be enforced: {exc}", field=request.grammar_field) from None
        row = Row(
            prompt_ids=list(ids),
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=list(request.stop),
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias=dict(request.logit_bias),
            logprobs=request.logprobs,
            project=request.project,
            constraint=constraint,
        )
        return Prepared(request, row, group)

    def _prompt_ids(self, request: GenerationRequest, base: _Base) -> list[int]:
        """The prompt's token ids: the chat rendered by its template, the text tokenized, or the ids given."""
        tokenizer = base.tokenizer
        if request.messages is not None:
            template = _chat_template(request.target.adapter_path)  # None: the base's own
            if template is None and not tokenizer.chat_template:
                raise Refused(
                    f"Model '{request.target.model_id}' has no chat template; use /v1/completions with a "
                    "plain prompt.",
                    field="model",
                    code="model_not_chat",
                )
            own_template = template if template is not None else tokenizer.chat_template
            messages, tools = tools_module.render(
                request.messages,
                request.tools,
                native=isinstance(own_template, str) and tools_module.template_knows_tools(own_template),
            )
            try:
                text = tokenizer.apply_chat_template(
                    messages, tools=tools, chat_template=template, add_generation_prompt=True, tokenize=False
                )
            except jinja2.TemplateSyntaxError:
                raise  # the model's template is broken, not the request: the server's error
            except jinja2.TemplateError as exc:  # the template refuses this chat (roles out of order, ...)
                raise Refused(
                    f"The chat template of model '{request.target.model_id}' refuses these messages: {exc}",
                    field="messages",
                    code="invalid_messages",
                ) from None
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if request.prompt_ids is not None:
            ids = list(request.prompt_ids)
            bad = next((i for i in ids if not 0 <= i < base.vocab), None)
            if bad is not None:
                raise Refused(
                    f"Token id {bad} is not in the vocabulary of model '{request.target.model_id}' "
                    f"(ids 0 to {base.vocab - 1}).",
                    field="prompt",
                )
        else:
            ids = list(tokenizer(request.prompt or "")["input_ids"])
        if not ids:  # nothing to condition on: start where a document starts, as OpenAI's empty prompt does
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else base.pad_id
            ids = [start]
        return ids

    # --- the running batches -------------------------------------------------------------------------
    def running_rows(self) -> list[Row]:
        """Every row decoding now, all groups."""
        return [row for batch in self._batches.values() for row in batch.rows]

    def adapters_in_use(self) -> set[str]:
        """The fine-tuned models running rows use: they cannot be evicted until those rows finish."""
        return {row.adapter for row in self.running_rows()} - {BASE_ADAPTER}

    def pinned(self, newcomers: list[Prepared]) -> frozenset[str]:
        """The fine-tuned models no load may evict while `newcomers` join: theirs and the running rows'."""
        return frozenset(self.adapters_in_use()) | {
            adapter_name(p.request.target.model_id) for p in newcomers if p.request.target.adapter_path
        }

    def admit(self, newcomers: list[Prepared]) -> list[Step]:
        """Prefill `newcomers` (any groups) and add them to their groups' running batches.

        The caller keeps the fine-tuned models of running rows and newcomers within `max_active`.
        """
        pinned = self.pinned(newcomers)
        groups: dict[str, list[Prepared]] = {}
        for prepared in newcomers:
            prepared.row.adapter = self.ensure_adapter(prepared.request.target, pinned=pinned)
            groups.setdefault(prepared.group, []).append(prepared)
        steps = []
        for group, members in groups.items():
            if group not in self._batches:
                base = self.base(members[0].request.target.base_id, members[0].request.target.base_path)
                own = members[0].row.adapter if group.startswith("own:") else None
                batch = Batch(base.tokenizer, eos_ids=base.eos_ids, pad_id=base.pad_id, device=self.device)
                self._batches[group] = batch
                self._routes[group] = (base, own)
            batch = self._batches[group]
            steps += batch.join([p.row for p in members], self._forward(group), **self._virtual(group))
            self._drop_if_idle(group)
        return steps

    def step(self) -> list[Step]:
        """One decode step of every running batch."""
        steps = []
        for group in list(self._batches):
            steps += self._batches[group].step(self._forward(group))
            self._drop_if_idle(group)
        return steps

    def generate(self, batch: list[Prepared]) -> Iterator[list[Step]]:
        """Serve `batch` to its end, alone, as one static batch; `Step.row` indexes into `batch`."""
        if self._batches:
            raise RuntimeError("generate() serves one batch alone; rows are running already")
        for index, prepared in enumerate(batch):
            prepared.row.id = index
        yield self.admit(batch)
        while self._batches:
            yield self.step()

    def abandon(self) -> None:
        """Drop every running row (after a failed pass, whose cache state is unknown)."""
        self._batches.clear()
        self._routes.clear()

    def _drop_if_idle(self, group: str) -> None:
        if not self._batches[group]:
            del self._batches[group], self._routes[group]

    def _forward(self, group: str) -> Forward:
        """The forward pass of `group`'s model, its rows routed to their adapters; last tokens' logits."""
        base, own = self._routes[group]

        def forward(adapters: list[str], **inputs: Any) -> torch.Tensor:
            if own is None:
                model, extra = base.model, self._routed(base, adapters)
            else:
                kind, _, model = self._active[own]
                extra = nullcontext({})
                if kind == "prompt":
                    inputs = _with_virtual_embeddings(model, inputs)
                    model = model.get_base_model()
            with extra as routing:
                out = model(**inputs, **routing, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1, :]

        return forward

    def _virtual(self, group: str) -> dict[str, Any]:
        """What a prompt-learning group's prefill puts before every prompt (see `Batch.join`)."""
        own = self._routes[group][1]
        if own is None or self._active[own][0] != "prompt":
            return {}
        model = self._active[own][2]
        config = model.active_peft_config
        prefix = config.peft_type == PeftType.PREFIX_TUNING
        return {
            "virtual_tokens": config.num_virtual_tokens,
            "start_cache": (lambda rows: model.get_prompt(rows)) if prefix else None,
        }

    @contextmanager
    def _routed(self, base: _Base, adapters: list[str]) -> Iterator[dict[str, Any]]:
        """Set the base's LoRA state up for rows on `adapters`; yield the forward's routing arguments.

        Rows on one adapter for SWAP_AFTER_STEPS forward passes in a row get it swapped in as merged
        weights (`_serve_alone`): swapping costs about one step's work, so it pays only for runs of one
        adapter, not for traffic that alternates. Otherwise PEFT routes them: `adapter_names` when the rows
        really mix adapters, the active adapter (or adapters disabled, for the base) when they do not,
        which skips the per-call hooks and indexing that cost more than the LoRA matmuls on small models.
        """
        model = base.model
        if not isinstance(model, PeftModel):
            yield {}
            return
        names = set(adapters)
        single = next(iter(names)) if len(names) == 1 else None
        base.streak = base.streak + 1 if single is not None and single == base.last_single else 1
        base.last_single = single
        if (
            self.merge_single_adapter
            and single is not None
            and (base.alone == single or base.streak >= SWAP_AFTER_STEPS)
            and self._serve_alone(base, single)
        ):
            yield {}
            return
        self._serve_mixed(base)
        if single is None:
            yield {"adapter_names": adapters}
        elif single == BASE_ADAPTER:
            with model.disable_adapter():
                yield {}
        else:
            if model.active_adapters != [single]:
                model.set_adapter(single)
            yield {}

    # --- single-adapter batches on merged weights ---------------------------------------------------------
    def _serve_alone(self, base: _Base, name: str) -> bool:
        """Set the base's model up to serve only `name` (or the base) at plain-model speed; False if it can't.

        Every LoRA layer is disabled, so it runs just its base layer, and each layer `name` adapts gets
        W + BA as its weight; the original W is kept to put back. Staying in this state between batches is
        what makes it pay: switching costs one pass over the modules and, for an adapter, its deltas.
        """
        if base.alone == name:
            return True
        if name != BASE_ADAPTER and not _mergeable(base.model, name):
            return False
        self._serve_mixed(base)
        with torch.no_grad():
            for module in base.model.modules():
                if not isinstance(module, LoraLayer):
                    continue
                module.enable_adapters(False)
                if name != BASE_ADAPTER and _adapts(module, name):
                    layer = module.get_base_layer()
                    merged = layer.weight + module.get_delta_weight(name).to(layer.weight.dtype)
                    base.originals.append((layer, layer.weight))
                    layer.weight = torch.nn.Parameter(merged, requires_grad=False)
        base.alone = name
        return True

    def _serve_mixed(self, base: _Base) -> None:
        """Undo `_serve_alone`: the original tensors go back, so nothing drifts however often it swaps."""
        if base.alone is None:
            return
        for layer, original in base.originals:
            layer.weight = original
        base.originals.clear()
        for module in base.model.modules():
            if isinstance(module, LoraLayer):
                module.enable_adapters(True)
        base.alone = None


def _with_virtual_embeddings(model: PeftModel, inputs: dict[str, Any]) -> dict[str, Any]:
    """A prompt- or P-tuning prefill's inputs with the learned virtual token embeddings before the prompt,
    at the first positions; decode steps, and prefix tuning (whose virtual tokens are its cache), as given.
    """
    config = model.active_peft_config
    if config.peft_type == PeftType.PREFIX_TUNING or inputs["past_key_values"].get_seq_length() > 0:
        return inputs
    input_ids, positions = inputs.pop("input_ids"), inputs["position_ids"]
    embeds = model.word_embeddings(input_ids)
    virtual = model.get_prompt(batch_size=input_ids.shape[0]).to(embeds.dtype)
    first = torch.arange(virtual.shape[1], device=positions.device).expand(input_ids.shape[0], -1)
    return inputs | {
        "inputs_embeds": torch.cat([virtual, embeds], dim=1),
        "position_ids": torch.cat([first, positions], dim=1),
    }


def _adapts(module: LoraLayer, name: str) -> bool:
    return name in module.lora_A or name in module.lora_embedding_A


def _mergeable(model: PeftModel, name: str) -> bool:
    """Whether swapping in W + BA serves `name` exactly as PEFT would: not for LoRA biases or Conv layers."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and _adapts(m, name)]
    return all(
        isinstance(m.get_base_layer(), torch.nn.Linear | torch.nn.Embedding) and not m.lora_bias.get(name)
        for m in layers
    )


@lru_cache(maxsize=1024)
def _chat_template(adapter_path: Path | None) -> str | None:
    """The adapter's own chat template when it ships one (training may set one), else the base's (None)."""
    if adapter_path is None:
        return None
    jinja = adapter_path / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    config = adapter_path / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None
