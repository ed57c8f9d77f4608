"""Drop visual tokens inside a decoder from layer K on (SGP in the large model, FastV, consistency).

Layers ``0..K-1`` see every token; layers ``K..L-1`` see only the kept ones, in prefill and in every
decode step. It is done with forward *pre*-hooks (``register_forward_pre_hook(with_kwargs=True)``)
on decoder layers ``>= K``; transformers' code is neither patched nor copied:

* at layer K in prefill, the hook gathers the kept rows of ``hidden_states``; every layer >= K gets
  the kept rows of ``position_embeddings`` (cos, sin) and ``position_ids``, so kept tokens keep their
  *original* RoPE positions, and a causal mask over the kept (left re-padded) tokens;
* in decode, layers >= K hold a shorter KV cache (P' + t entries instead of P + t), so the hook
  gives them a mask of that length: the kept prompt tokens, then the model-level 2-D mask over the
  generated entries. A decode forward may carry several new tokens (speculative verification,
  ``lmms_sgl.method.drafting``) and generated entries may be masked out (rejected drafts of other
  rows of a batch): both come with the model's mask. Position embeddings need no change: new
  tokens are numbered after the full prompt, as the official code does.

A forward is a prefill when the cache of layer K is still empty (or there is no cache), else a
decode step.

Positions are gathered along their token dimension whatever their leading dimensions, so
multimodal RoPE (Qwen-VL: 3-D temporal/height/width positions, ``rope_deltas`` continuing the
decode positions) keeps each kept token's original 3-D position. Features a text model adds at
visual positions after its first layers (Qwen3-VL's deepstack, ``deepstack_visual_embeds``) are
added by forward hooks at the kept visual positions in layers >= K, K = 0 included.

Each sample of a batch may keep a different number of tokens: the kept tokens are re-packed with
left padding to the longest, and the padding is masked. The model-level ``attention_mask`` and
``position_ids`` keep their full, unpruned meaning throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lmms_sgl.method.selection import KeepPlan
from lmms_sgl.method.stages import compose

PlanSource = KeepPlan | Callable[[], KeepPlan]
SUPPORTED_ATTENTION = ("sdpa", "eager")


def decoder_layers(text_model: nn.Module) -> nn.ModuleList:
    layers = getattr(text_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(text_model).__name__} has no `layers` ModuleList of decoder layers")
    return layers


def mask_kind(layer: nn.Module) -> str:
    """``"additive"`` for eager attention, ``"bool"`` for SDPA-style (SDPA and our recording SDPA)."""
    implementation = layer.self_attn.config._attn_implementation
    if implementation in ("eager", "sgl_eager_record"):
        return "additive"
    if implementation == "sdpa" or implementation.startswith("sgl_sdpa"):
        return "bool"
    raise ValueError(
        f"visual-token pruning supports attn_implementation in {SUPPORTED_ATTENTION}, got {implementation!r}"
    )


def format_mask(allowed: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` [B, 1, Q, K] bool -> the tensor the attention implementation expects."""
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def pruned_prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """Causal mask over re-packed kept tokens; padding keys hidden, padding queries see themselves."""
    width = valid.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=valid.device).tril()
    allowed = causal[None] & valid[:, None, :]
    allowed |= torch.eye(width, dtype=torch.bool, device=valid.device)[None]  # no all-masked rows
    return allowed[:, None]


def gather_tokens(tensor: torch.Tensor, index: torch.Tensor, token_dim: int) -> torch.Tensor:
    """Rows ``index`` [B, P'] of ``tensor`` along its token dimension ``token_dim``, the batch being
    the dimension before it, whatever comes before or after: position ids ``[B, P]`` or multimodal
    ``[3, B, P]`` (``token_dim=-1``), cos/sin ``[B, P, D]`` or ``[3, B, P, D]`` (``token_dim=-2``).
    A batch dimension of 1 is broadcast to B."""
    token_dim %= tensor.dim()
    if token_dim < 1:
        raise ValueError(f"tensor of shape {tuple(tensor.shape)} has no batch dimension before {token_dim}")
    shape = list(tensor.shape)
    shape[token_dim - 1] = index.shape[0]
    tensor = tensor.expand(*shape)
    view = [1] * (token_dim - 1) + list(index.shape) + [1] * (tensor.dim() - token_dim - 1)
    shape[token_dim] = index.shape[1]
    return tensor.gather(token_dim, index.view(view).expand(*shape))


@dataclass
class _Deepstack:
    """Features a text model adds to its hidden states at visual positions after its first layers
    (Qwen3-VL's deepstack): ``embeds[j]`` is added after layer ``layer_k + j``, in pruned space."""

    visual: torch.Tensor  # [B, P] the visual positions of the unpruned prompt
    embeds: list[torch.Tensor]  # one [n_visual_in_batch, d] per layer >= K, rows in visual order


@dataclass(frozen=True)
class LayerInputs:
    """What layer K receives in a prefill, as its pre-hook sees it (after earlier stages' hooks): a
    plan source that ranks with layer K's own projections reads it (PDrop's light attention)."""

    layer: nn.Module
    hidden: torch.Tensor
    kwargs: dict


@dataclass
class _ForwardState:
    plan: KeepPlan  # as applied (rows repeated for beam search)
    pruned_kwargs: dict
    decoding: bool
    armed: KeepPlan  # as given (one row per sample)


class VisualTokenPruner:
    """Installs pre-hooks on decoder layers ``>= layer_k`` of ``text_model``; arm it per batch.

    Usage::

        with VisualTokenPruner(model.model.language_model, layer_k).installed() as pruner:
            pruner.arm(plan)                 # or a callable returning the plan at layer K (FastV)
            model.generate(...)
    """

    def __init__(self, text_model: nn.Module, layer_k: int):
        layers = decoder_layers(text_model)
        if not 0 <= layer_k < len(layers):
            raise ValueError(
                f"layer_k={layer_k} is outside [0, {len(layers)}) for a {len(layers)}-layer model"
            )
        self.text_model = text_model
        self.layer_k = layer_k
        self._layers = layers
        self._handles: list = []
        self._source: PlanSource | None = None
        self._state: _ForwardState | None = None
        self._deepstack: _Deepstack | None = None
        # Pruners stacked after this one (later stages, installed after it): the deepstack features
        # this pruner took are added in their pruned sequences once they have run.
        self.later: list[VisualTokenPruner] = []
        self._model_mask: torch.Tensor | None = None
        self.inputs_at_k: LayerInputs | None = None  # layer K's inputs in the last prefill

    @contextmanager
    def installed(self) -> Iterator[VisualTokenPruner]:
        self.install()
        try:
            yield self
        finally:
            self.remove()

    def install(self) -> VisualTokenPruner:
        if self._handles:
            return self
        for index in range(self.layer_k, len(self._layers)):
            hook = self._make_hook(index)
            self._handles.append(self._layers[index].register_forward_pre_hook(hook, with_kwargs=True))
            self._handles.append(self._layers[index].register_forward_hook(self._make_deepstack_hook(index)))
        self._handles.append(
            self.text_model.register_forward_pre_hook(self._take_deepstack, with_kwargs=True)
        )
        self._handles.append(self.text_model.register_forward_pre_hook(self._take_mask, with_kwargs=True))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.disarm()

    def arm(self, source: PlanSource) -> None:
        """Prune the next prefill (and its decode steps) with ``source``."""
        self._source = source
        self._state = None

    def disarm(self) -> None:
        self._source = None
        self._state = None
        self._deepstack = None

    @property
    def plan(self) -> KeepPlan | None:
        return self._state.armed if self._state else None

    def _make_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if self._source is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == self.layer_k:
                self._begin(module, hidden, kwargs)
            if self._state is None:
                raise RuntimeError("pruning state missing: layer K did not run before a later layer")
            kwargs = {**kwargs, **self._state.pruned_kwargs}
            if index == self.layer_k and not self._state.decoding:
                plan = self._state.plan
                gather = plan.index[:, :, None].expand(-1, -1, hidden.shape[-1])
                hidden = hidden.gather(1, gather)
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _take_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Text-model pre-hook: keep the model-level 2-D ``attention_mask`` (the per-layer masks of
        a decode step are sized by layer 0's cache, which is the pruned one when K = 0)."""
        mask = kwargs.get("attention_mask")
        self._model_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _take_deepstack(self, module: nn.Module, args: tuple, kwargs: dict):
        """Text-model pre-hook: the model itself adds the deepstack features of layers < K (full
        sequence); those of layers >= K are taken from it and added by :meth:`_make_deepstack_hook`
        at the kept visual positions."""
        self._deepstack = None
        embeds = kwargs.get("deepstack_visual_embeds")
        if self._source is None or embeds is None or len(embeds) <= self.layer_k:
            return None
        self._deepstack = _Deepstack(kwargs["visual_pos_masks"], list(embeds[self.layer_k :]))
        return args, {**kwargs, "deepstack_visual_embeds": list(embeds[: self.layer_k])}

    def _make_deepstack_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output):
            stack, step = self._deepstack, index - self.layer_k
            if stack is None or step >= len(stack.embeds) or self._state is None or self._state.decoding:
                return None
            plan = self._state.plan
            for later in self.later:  # rows of this layer's output: positions in the later stage's plan
                if later.layer_k <= index and later._state is not None:
                    plan = compose(plan, later._state.plan)
            visual = stack.visual.to(output.device)
            row_of = (visual.flatten().cumsum(0) - 1).view(visual.shape)  # feature row of each position
            kept = visual.gather(1, plan.index) & plan.valid
            rows = row_of.gather(1, plan.index)[kept]
            output = output.clone()
            output[kept] = output[kept] + stack.embeds[step].to(output.device, output.dtype)[rows]
            return output

        return hook

    def _begin(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> None:
        """At layer K: start a prefill (compute the pruned kwargs) or a decode step (its mask)."""
        q_len = hidden.shape[1]
        kind = mask_kind(layer)
        cache = kwargs.get("past_key_values")
        cached = cache.get_seq_length(self.layer_k) if cache is not None else 0
        if self._state is None or cached == 0:  # a (new) prefill
            self.inputs_at_k = LayerInputs(layer, hidden, kwargs)
            armed = self._source() if callable(self._source) else self._source
            self.inputs_at_k = None  # hold no activations past the plan
            plan = armed.to(hidden.device)
            if hidden.shape[0] != plan.index.shape[0]:
                if hidden.shape[0] % plan.index.shape[0]:
                    raise RuntimeError(
                        f"batch of {hidden.shape[0]} rows for a plan of {plan.index.shape[0]} samples"
                    )
                plan = plan.repeat_rows(hidden.shape[0] // plan.index.shape[0])
            if q_len != plan.prompt_length:
                raise RuntimeError(
                    f"pruning plan is for a prompt of {plan.prompt_length} tokens, prefill has {q_len}"
                )
            cos, sin = kwargs["position_embeddings"]
            cos, sin = gather_tokens(cos, plan.index, -2), gather_tokens(sin, plan.index, -2)
            pruned = {"position_embeddings": (cos, sin)}
            if kwargs.get("position_ids") is not None:
                pruned["position_ids"] = gather_tokens(kwargs["position_ids"], plan.index, -1)
            if kind == "bool" and bool(plan.valid.all()):
                pruned["attention_mask"] = None  # SDPA's is_causal, as the model itself would do
            else:
                pruned["attention_mask"] = format_mask(pruned_prefill_mask(plan.valid), kind, hidden.dtype)
            self._state = _ForwardState(plan, pruned, decoding=False, armed=armed)
            return
        plan = self._state.plan
        generated = cached + q_len - plan.pruned_length
        tail = generated_allowed(self._model_mask, q_len, generated, hidden.shape[0])
        prompt = plan.valid[:, None, None, :].expand(-1, 1, q_len, -1)
        allowed = torch.cat([prompt, tail.to(prompt.device)], dim=-1)
        plain = kind == "bool" and q_len == 1 and bool(allowed.all())
        mask = None if plain else format_mask(allowed, kind, hidden.dtype)
        self._state = _ForwardState(plan, {"attention_mask": mask}, decoding=True, armed=self._state.armed)


def generated_allowed(
    model_mask: torch.Tensor | None, q_len: int, generated: int, batch: int
) -> torch.Tensor:
    """Which of the last ``generated`` cache entries (answer tokens, this step's included) each of
    the ``q_len`` new queries may see, ``[B, 1, q, generated]`` bool: causal within the step, and
    only entries the model-level 2-D ``attention_mask`` keeps (a batch row's rejected drafts are
    masked out there); ``None`` keeps all."""
    rows = torch.arange(q_len)[:, None] + generated - q_len
    allowed = (torch.arange(generated)[None, :] <= rows)[None, None].expand(batch, 1, q_len, generated)
    if model_mask is None:
        return allowed
    if model_mask.dim() != 2 or model_mask.shape[-1] < generated:
        raise RuntimeError(
            f"pruned decoding needs the model's 2-D attention_mask, got shape {tuple(model_mask.shape)} "
            f"for {generated} answer entries"
        )
    keep = model_mask[:, -generated:].bool().cpu()
    return allowed & keep.expand(batch, -1)[:, None, None, :]
