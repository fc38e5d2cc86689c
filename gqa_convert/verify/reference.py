"""The HF reference: transformers' own model of SRC, whole or one decoder layer at a time.

The model is built from config.json on the meta device (accelerate's `init_empty_weights`:
parameters on meta, buffers such as the rotary frequencies real), by the family's stock
transformers class, `trust_remote_code` never. A part (the embedding, layer i, the final
norm with the unembedding) is materialised from SRC's files by our checkpoint reader, cast
to the compute dtype, and moved back to meta when the stream has passed it.

What each decoder layer is called with (attention mask of its layer type, rotary cos / sin,
position ids) is taken from the family's own forward: the base model runs once per input on
the embeddings with every layer replaced by a recorder that keeps its arguments, and the
hidden state the first layer receives (Granite's embedding_multiplier is applied there).
So masks, sliding windows, per-layer rotary (SmolLM3's NoPE layers, dynamic / longrope
frequencies of this length) come from transformers' code for whatever
`model.model.layers[i]` is, and a new family needs no change here. Likewise the logits are
the family's `ForCausalLM.forward` on the final norm's output, the base model stubbed out
(Granite divides them by logits_scaling there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gqa_convert.errors import BadInputError, UsageError, listing
from gqa_convert.sources import Source, open_source
from gqa_convert.verify.report import COMPUTE_DTYPES
from gqa_convert.verify.sublayer import Split, hf_splits, is_placeholder, read_slice

log = logging.getLogger(__name__)

Part = str | int  # "embed", a layer index, or "final"


@contextmanager
def _loading(src: str | Path, what: str):
    """transformers' own failures to read `src` become a BadInputError naming it (exit 3)."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadInputError(
            f"{src}: transformers cannot load the reference {what} ({type(e).__name__}: {e})"
        ) from e


@contextmanager
def _quiet_hf():
    """transformers' "Loading weights" bars would cut into our output."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def attention_implementation(config: Any) -> dict[str, str]:
    """`attn_implementation="eager"` where the scores are soft-capped (Gemma 2): only
    transformers' eager attention applies the cap, and transformers before 5.2x serves Gemma 2
    with SDPA by default, which drops it (5.9.0: 1.8 off on the tiny Gemma 2's logits)."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return {"attn_implementation": "eager"}
    return {}


def load_reference(src: str | Path, dtype: str = "float32") -> nn.Module:
    """The whole HF model of `src` in `dtype`, by transformers' `from_pretrained` (never
    remote code). `verify(..., reference=)` takes it as is."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with _quiet_hf(), _loading(src, "model"):
        config = AutoConfig.from_pretrained(src, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            src,
            config=config,
            dtype=COMPUTE_DTYPES[dtype],
            trust_remote_code=False,
            **attention_implementation(config),
        )
    return model.eval()


def skeleton(source: Source, dtype: str = "float32") -> tuple[nn.Module, Any]:
    """The HF model of `source` with every parameter on the meta device (no weight read), and
    the transformers quantizer that dequantises its tensors while they load (None: dense).

    A quantised source is prepared as `from_pretrained` prepares it (`get_hf_quantizer`,
    `preprocess_model`), with the source's `hf_quantization`: its quantization_config with
    `dequantize` on, so the reference holds transformers' own dequantisation."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    quantizer = None
    with _quiet_hf(), _loading(source.path, "model"):
        config = source.transformers_config()
        if source.hf_quantization is not None:
            from transformers.quantizers.auto import get_hf_quantizer

            config.quantization_config = dict(source.hf_quantization)
            quantizer, config, _ = get_hf_quantizer(config, None, None, True, {})
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(
                config,
                dtype=COMPUTE_DTYPES[dtype],
                trust_remote_code=False,
                **attention_implementation(config),
            )
        if quantizer is not None:
            quantizer.preprocess_model(
                model=model,
                dtype=COMPUTE_DTYPES[dtype],
                device_map=None,
                checkpoint_files=None,
                use_kernels=False,
            )
    return model.eval(), quantizer


class _Recorder(nn.Module):
    """Stands in for a decoder layer: keeps its arguments, returns its input unchanged.
    Other attributes (`attention_type`, ...) are the real layer's, for forwards that read
    them."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        self.call: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.call = (args, kwargs)
        return hidden_states


class _Stub(nn.Module):
    """Stands in for the base model under ForCausalLM.forward: returns a given stream."""

    def __init__(self, hidden: Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # The MoE output type: MoE ForCausalLM forwards also read `router_logits` (None);
        # Gemma 4's also `shared_kv_states` (None).
        from transformers.modeling_outputs import MoeModelOutputWithPast

        out = MoeModelOutputWithPast(last_hidden_state=self.hidden)
        out.shared_kv_states = None
        return out


def _fresh_rotary(body: nn.Module) -> None:
    """Reset HF's dynamic-NTK rotary to its initial frequencies: it keeps those of the
    longest sequence seen so far, so each input is compared as a fresh model runs it."""
    rotary = getattr(body, "rotary_emb", None)
    if "dynamic" in str(getattr(rotary, "rope_type", "")) and hasattr(rotary, "original_inv_freq"):
        rotary.inv_freq = rotary.original_inv_freq.clone()
        rotary.max_seq_len_cached = rotary.original_max_seq_len


class PartHolder:
    """Holds the parts of a model ("embed", layer i, "final") materialised while in use:
    all of them, once read, in whole-model mode; one at a time, sent back to the meta device
    after use, when `streaming`. Subclasses give `n_layers`, `preloaded`, `streaming`,
    `modules(part)`, `layer(i)` and `_materialise(part)`, and start `_held` empty."""

    n_layers: int
    preloaded: bool
    streaming: bool
    _held: set[Part]

    def modules(self, part: Part) -> dict[str, nn.Module]:
        raise NotImplementedError

    def layer(self, part: int) -> nn.Module:
        raise NotImplementedError

    def _materialise(self, part: Part) -> None:
        raise NotImplementedError

    @contextmanager
    def holding(self, part: Part) -> Iterator[nn.Module | None]:
        """The part materialised for the duration (None for a layer the model lacks)."""
        if isinstance(part, int) and part >= self.n_layers:
            yield None
            return
        if not self.preloaded and part not in self._held:
            self._materialise(part)
            self._held.add(part)
        try:
            yield self.layer(part) if isinstance(part, int) else None
        finally:
            if self.streaming and part in self._held:
                for split in self._splits.pop(part, []):
                    split.remove()
                self._release(part)
                self._held.discard(part)

    def _release(self, part: Part) -> None:
        """Send a held part's tensors back to the meta device (streaming)."""
        for module in self.modules(part).values():
            module.to("meta")

    # Sub-layer streaming (sublayer.py): the part's Splits while it is held, and how many
    # weights one of their parts holds (0: off, every part held whole).
    _splits: dict[Part, list[Split]]
    part_elements: int = 0

    def _split(self, part: Part) -> set[str]:
        """Install the part's Splits (sub-layer streaming); the names of the parameters they
        hold themselves, a slice at a time."""
        if not self.part_elements:
            return set()
        splits = self._make_splits(part)
        for split in splits:
            split.install()
        self._splits[part] = splits
        return {name for split in splits for name in split.names()}

    def _make_splits(self, part: Part) -> list[Split]:
        raise NotImplementedError


class Reference(PartHolder):
    """HF's model of `source` as parts that can be held and released.

    `model` is a preloaded HF model (whole, nothing released); otherwise a skeleton whose
    parts are read from the source on demand (through transformers' loader, and its
    dequantisation of a quantised source), kept once read when not `streaming`.
    `device_of` maps a part to its device (one device, or accelerate's device map over
    several GPUs).
    """

    def __init__(
        self,
        source: Source | str | Path,
        dtype: str,
        *,
        model: nn.Module | None = None,
        streaming: bool = False,
        device_of: Callable[[Part], torch.device] = lambda part: torch.device("cpu"),
        sub_layer: tuple[Any, int] | None = None,
    ):
        if not isinstance(source, Source):  # a checkpoint folder, or a .gguf file
            source = open_source(source)
        self.source, self.src = source, source.path
        self.dtype, self.streaming, self.device_of = dtype, streaming, device_of
        self._splits = {}
        if sub_layer is not None:  # (our config of the source, weights per part)
            if source.quantized or source.hf_quantization is not None:
                raise UsageError(
                    f"{source.path}: sub-layer verification reads slices of dense tensors; "
                    "a quantised source is verified whole or layer-streamed"
                )
            self.cfg, self.part_elements = sub_layer
        self.preloaded = model is not None
        self.quantizer = None
        if model is None:
            model, self.quantizer = skeleton(source, dtype)
        self.model = model
        self.body = self.model.model
        self.n_layers = len(self.body.layers)
        # transformers' loader input: each stored tensor (a GGUF's: as transformers reads it)
        self.sources: dict[str, Any] = {} if self.preloaded else dict(source.hf_inputs(model))
        self.tied: dict[str, str] = dict(getattr(self.model, "_tied_weights_keys", None) or {})
        self._held: set[Part] = set()
        if not self.preloaded:
            self.routes = self._route_sources()
            self._check_sources()

    def place(self, device_of: Callable[[Part], torch.device]) -> None:
        """Put parts on devices; the skeleton's real buffers (rotary frequencies) go with
        the embedding, where the family's forward computes masks and cos / sin."""
        from accelerate.utils import set_module_tensor_to_device

        self.device_of = device_of
        if self.preloaded:
            return
        first = device_of("embed")
        for name, buffer in self.model.named_buffers():
            if buffer.device.type != "meta" and buffer.device != first:
                set_module_tensor_to_device(self.model, name, first)

    # ---- which tensors make which part ------------------------------------------------

    def modules(self, part: Part) -> dict[str, nn.Module]:
        """The HF modules of a part, by their name in the model."""
        if part == "embed":
            embed = self.model.get_input_embeddings()
            # and the body's other modules before its layers (Gemma 4's per-layer inputs)
            extra = {
                f"model.{name}": child
                for name, child in self.body.named_children()
                if child is not embed
                and name not in ("layers", "norm")
                and next(child.parameters(), None) is not None
            }
            return {"model.embed_tokens": embed, **extra}
        if part == "final":
            return {"model.norm": self.body.norm, "lm_head": self.model.get_output_embeddings()}
        return {f"model.layers.{part}": self.body.layers[part]}

    def _parameters(self, part: Part) -> Iterator[tuple[str, nn.Module, str]]:
        """Parameters, and the buffers the checkpoint holds (Gemma 4's layer_scalar, GLM-4.5's
        e_score_correction_bias: the skeleton holds them as built)."""
        for prefix, module in self.modules(part).items():
            for name, _ in module.named_parameters(remove_duplicate=False):
                yield f"{prefix}.{name}", module, name
            stored = module.state_dict(keep_vars=True)
            for name, _ in module.named_buffers(remove_duplicate=False):
                if name in stored:
                    yield f"{prefix}.{name}", module, name

    def _route_sources(self) -> dict[str, list[str]]:
        """Each HF parameter -> the source tensors transformers' loader builds it from, by the
        loader's own key renaming (`rename_source_key` over the model's conversion mapping):
        the identity for most, the per-expert tensors of a fused `experts.gate_up_proj`."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        self.conversions = get_model_conversion_mapping(self.model, None, self.quantizer)
        renamings = [c for c in self.conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in self.conversions if isinstance(c, WeightConverter)]
        meta = self.model.state_dict()
        prefix = self.model.base_model_prefix
        routes: dict[str, list[str]] = {}
        for name in self.sources:
            target, _ = rename_source_key(name, renamings, converters, prefix, meta)
            if target not in meta and name in meta:
                target = name
            routes.setdefault(target, []).append(name)
        return routes

    def _sources_of(self, full: str) -> list[str]:
        tied = self.tied.get(full, "")
        return self.routes.get(full) or ([tied] if tied in self.sources else [])

    def _check_sources(self) -> None:
        parts: list[Part] = ["embed", *range(self.n_layers), "final"]
        missing = [n for p in parts for n, _, _ in self._parameters(p) if not self._sources_of(n)]
        if missing:
            raise BadInputError(
                listing(f"{self.src}: tensors the {type(self.model).__name__} needs", missing)
            )

    # ---- holding parts ----------------------------------------------------------------

    def layer(self, part: int) -> nn.Module:
        return self.body.layers[part]

    def _materialise(self, part: Part) -> None:
        """The part's source tensors, read by our reader, through transformers' own loader
        (`convert_and_load_state_dict_in_model`: key renaming, experts stacked and fused,
        the cast to the skeleton's dtype) into the skeleton's parameters."""
        device, dtype = self.device_of(part), COMPUTE_DTYPES[self.dtype]
        split = self._split(part)  # held by sub-layer Splits, a slice at a time
        state: dict[str, Any] = {}
        for full, _, _ in self._parameters(part):
            if full in split:
                continue
            own = full in self.routes  # else tied: read the tie's source under our name
            for source in self._sources_of(full):
                state[source if own else full] = self.sources[source]
        loading = self._load(state, device, dtype)
        names = {full for full, _, _ in self._parameters(part)}
        problems = [
            f"{name} has shape {list(got)}, the {type(self.model).__name__} expects {list(want)}"
            for name, got, want in sorted(loading.mismatched_keys, key=str)
            if name in names
        ]
        problems += [
            f"{full}: not loaded from {self._sources_of(full)}"
            for full, module, name in self._parameters(part)
            if _tensor(module, name).device.type == "meta" and full not in split
        ]
        if problems:
            raise BadInputError(listing(f"{self.src}: the tensors do not fit the model", problems))
        if self.quantizer is not None:
            self._to_compute_dtype(part, dtype)

    def _to_compute_dtype(self, part: Part, dtype: torch.dtype) -> None:
        """Float parameters the quantizer's dequantisation left in another dtype, cast to
        the compute dtype that was asked for: transformers 5.24's compressed-tensors path
        hands MoE experts over in the scales' dtype (bfloat16) whatever the model's dtype
        (its values are kept; widening is exact), dense layers in the model's."""
        for _, module, name in self._parameters(part):
            param = _tensor(module, name)
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)

    def tensor_of_source(self, part: Part, source: str, expert: int | None = None) -> Tensor:
        """The held HF tensor that was read from the source tensor `source` (a tied
        `lm_head.weight` is read from the embedding's); with `expert`, a stacked source's
        [1, ...] slice of that expert, read alone where it is not held (sub-layer mode)."""
        for full, module, name in self._parameters(part):
            tensor = _tensor(module, name)  # not held by a sub-layer Split
            held = tensor.device.type != "meta" and not is_placeholder(tensor)
            if source in (full, self.tied.get(full)) and held:
                tensor = _tensor(module, name).detach()
                return tensor if expert is None else tensor[expert : expert + 1]
        if source in self.sources and not self.preloaded:
            # A source the loader fused into a bigger tensor (an expert of gate_up_proj), or
            # one a Split holds in slices: read again from its file, cast as the loader casts.
            info = getattr(self.sources[source], "info", None)
            if expert is not None and info is not None:
                tensor = read_slice(info, 0, slice(expert, expert + 1))
            elif expert is not None:
                tensor = self.sources[source][...][expert : expert + 1]
            else:
                tensor = self.sources[source][...]
            return tensor.to(device=self.device_of(part), dtype=COMPUTE_DTYPES[self.dtype])
        raise BadInputError(f"{self.src}: no tensor {source!r} in the {part} part of the model")

    def _make_splits(self, part: Part) -> list[Split]:
        """sublayer.hf_splits of the part, over the parameters the loader reads as stored
        (one source tensor, renamed at most: a tied lm_head reads the embedding's)."""

        def sliceable(full: str) -> bool:
            sources = self._sources_of(full)
            return len(sources) == 1 and sources[0] in (full, self.tied.get(full))

        def read(full: str, dim: int | None, index: Any) -> Tensor:
            stored = self.sources[self._sources_of(full)[0]]
            info = getattr(stored, "info", None)
            if index is None or info is None:
                tensor = stored[...]
                tensor = tensor if index is None else tensor[(slice(None),) * dim + (index,)]
            else:
                tensor = read_slice(info, dim, index)
            return tensor.to(device=self.device_of(part), dtype=COMPUTE_DTYPES[self.dtype])

        def experts(prefix: str, module: nn.Module) -> Callable[[int], dict[str, Tensor]] | None:
            return self._expert_loader(part, prefix, module, sliceable)

        return hf_splits(
            self.cfg, part, self.modules(part), read, self.part_elements, sliceable, experts
        )

    def _expert_loader(
        self, part: Part, prefix: str, module: nn.Module, sliceable: Callable[[str], bool]
    ) -> Callable[[int], dict[str, Tensor]] | None:
        """`Experts.load` for the stacked experts module `module` (named `prefix`): expert e's
        [1, ...] slice of each parameter, read from the source as stored (a memory map of
        its bytes) or, where the loader stacks per-expert source tensors
        (`experts.{e}.w1.weight`, ...), by transformers' loader from expert e's tensors
        only, renumbered expert 0, into [1, ...] parameters. None (held whole) if a
        parameter is built from neither."""
        import re

        names = [n for n, p in module._parameters.items() if p is not None]
        stacked = [n for n in names if not sliceable(f"{prefix}{n}")]
        numbered = re.compile(r"\.experts\.(\d+)\.")
        for name in stacked:
            if not all(numbered.search(s) for s in self._sources_of(f"{prefix}{name}")):
                return None
        device, dtype = self.device_of(part), COMPUTE_DTYPES[self.dtype]

        def load(e: int) -> dict[str, Tensor]:
            got: dict[str, Tensor] = {}
            for name in names:
                if name in stacked:
                    continue
                stored = self.sources[self._sources_of(f"{prefix}{name}")[0]]
                info = getattr(stored, "info", None)
                one = read_slice(info, 0, slice(e, e + 1)) if info else stored[...][e : e + 1]
                got[name] = one.to(device=device, dtype=dtype)
            if stacked:
                state = {
                    numbered.sub(".experts.0.", source): self.sources[source]
                    for name in stacked
                    for source in self._sources_of(f"{prefix}{name}")
                    if numbered.search(source).group(1) == str(e)
                }
                shapes = {name: module._parameters[name].shape for name in stacked}
                for name in stacked:  # the loader checks each tensor against these
                    module._parameters[name] = nn.Parameter(
                        torch.empty((1, *shapes[name][1:]), device="meta"), requires_grad=False
                    )
                self._load(state, device, dtype)
                for name in stacked:
                    got[name] = module._parameters[name].detach()
                    if got[name].device.type == "meta":
                        raise BadInputError(f"{self.src}: {prefix}{name} of expert {e} not loaded")
            return got

        return load

    def _load(self, state: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
        """transformers' `convert_and_load_state_dict_in_model` of `state` into the model."""
        import inspect

        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        quantizer = {} if self.quantizer is None else {"hf_quantizer": self.quantizer}
        config = LoadStateDictConfig(
            device_map={"": device}, dtype=dtype, weight_mapping=self.conversions, **quantizer
        )
        extra = {}
        if "tp_plan" in inspect.signature(convert_and_load_state_dict_in_model).parameters:
            extra["tp_plan"] = None  # transformers < 5.10
        with _quiet_hf(), torch.no_grad():
            result = convert_and_load_state_dict_in_model(self.model, state, config, **extra)
        return result[0] if isinstance(result, tuple) else result

    def device(self, part: Part) -> torch.device:
        if self.preloaded:
            module = next(iter(self.modules(part).values()))
            return next(module.parameters()).device
        return self.device_of(part)

    # ---- running ----------------------------------------------------------------------

    def embed(self, tokens: Tensor) -> Tensor:
        """[1, pos] -> [1, pos, d_model], by the held embedding."""
        module = self.model.get_input_embeddings()
        return module(tokens.to(self.device("embed")))

    def layer_calls(
        self, embeds: Tensor, tokens: Tensor | None = None
    ) -> tuple[Tensor, list[tuple[tuple[Any, ...], dict[str, Any]]]]:
        """The hidden state the family's forward gives the first decoder layer for these
        embeddings, and the arguments it passes each layer (mask of the layer's type,
        rotary cos / sin, position ids; Gemma 4's per-layer inputs and the store its
        layers share K/V through), from its own code. With `tokens` (the embedding part
        held), the forward embeds them itself, as from_pretrained's model does."""
        recorders = nn.ModuleList(_Recorder(layer) for layer in self.body.layers)
        layers, norm = self.body.layers, self.body.norm
        self.body.layers, self.body.norm = recorders, nn.Identity()
        _fresh_rotary(self.body)
        try:
            with torch.no_grad():
                if tokens is not None:
                    out = self.body(input_ids=tokens.to(embeds.device), use_cache=False)
                else:
                    out = self.body(inputs_embeds=embeds, use_cache=False)
        finally:
            self.body.layers, self.body.norm = layers, norm
        # Recorders return their input: the output is what entered the first layer.
        return out.last_hidden_state, [r.call for r in recorders]

    def final(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The final norm and logits of a held "final" part: the logits by the family's
        ForCausalLM forward with the base model replaced by the normed stream; and the
        unembedding's own output, before what that forward does after it (Granite's
        logits_scaling, Gemma 2's soft-cap)."""
        normed = self.body.norm(hidden.to(self.device("final")))
        raw: list[Tensor] = []
        hook = self.model.get_output_embeddings().register_forward_hook(
            lambda _m, _i, out: raw.append(out)
        )
        # the attribute holding the base model (Llama 4's `model`, whose class names
        # `language_model` as its base_model_prefix)
        prefix = next(name for name, m in self.model.named_children() if m is self.body)
        stub = _Stub(normed)
        setattr(self.model, prefix, stub)
        try:
            ids = torch.zeros(normed.shape[:2], dtype=torch.long, device=normed.device)
            logits = self.model(input_ids=ids, use_cache=False).logits
        finally:
            hook.remove()
            setattr(self.model, prefix, self.body)
        return normed, logits, raw[0]

    def info(self) -> dict[str, Any]:
        return {
            "transformers_class": type(self.model).__name__,
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
        }


def _tensor(module: nn.Module, name: str) -> Tensor:
    """A parameter or buffer of `module` by its dotted name."""
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)
