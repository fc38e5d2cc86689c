"""Our side of the comparison: a GQATransformer whose parts are held one at a time.

Its tensors come from one of three places:
  model     a GQATransformer already in memory (whole; `verify(..., model=)`)
  files     an export folder (CONVERTED, or convert's temporary folder): each part's
            tensors read from its safetensors files, so the gate checks the bytes shipped
  views     SRC mapped through the weight map: each row's einops layout applied to the HF
            reference's tensor of the part being held (a view, no second copy)
  source    SRC quantised: its tensors dequantised by our reader (sources/), then mapped,
            so that our dequantisation is what is compared with transformers'
The model is built on the meta device from the config and a part (embedding, block i, final
norm + unembedding) is loaded into it while held, then moved back to meta when streaming.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gqa_convert.checkpoint import TensorInfo, map_array, read_weights
from gqa_convert.config import ModelConfig
from gqa_convert.errors import BadInputError, listing
from gqa_convert.verify.reference import Part, PartHolder, Reference
from gqa_convert.verify.report import COMPUTE_DTYPES
from gqa_convert.verify.sublayer import Split, ours_splits, read_slice

if TYPE_CHECKING:
    from gqa_convert.mapping import ConversionPlan, TensorTask
    from gqa_convert.model.decoder import GQATransformer


def part_of(name: str) -> Part:
    """Which part a parameter of ours belongs to: "embed", a block index, or "final"."""
    if name.startswith(("embed.", "embed_per_layer.")):
        return "embed"
    if name.startswith("blocks."):
        return int(name.split(".")[1])
    return "final"


def count_nonfinite(tensor: Tensor, chunk: int = 1 << 22) -> int:
    """NaN / Inf values in `tensor`, `chunk` elements at a time (`torch.isfinite` of a whole
    128k-vocabulary embedding allocates 2.5 GB of temporaries: an fp32 `abs` and two masks).

    A chunk whose sum (in fp32, fp64 for fp64) is finite holds neither: a NaN or an Inf
    makes the sum NaN or +-Inf. Only a chunk whose sum is not (one of them, or finite
    values summing past the range) is counted element by element. One read of a clean
    tensor instead of a mask and its count: a fifth of `verify SRC`'s load was this check.
    """
    if not tensor.is_floating_point():
        return 0
    flat = tensor.reshape(-1)  # a view when contiguous, as HF's parameters are
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    bad = 0
    for i in range(0, flat.numel(), chunk):
        part = flat[i : i + chunk]
        if not bool(torch.isfinite(part.sum(dtype=wide))):
            bad += int((~torch.isfinite(part)).sum())
    return bad


def read_export_config(folder: Path) -> ModelConfig:
    """The config of an export folder (this process's own work folder too: convert's gate;
    another process's is refused, as `load_export` does)."""
    from gqa_convert.config import read_json
    from gqa_convert.export import refuse_foreign_work_folder

    refuse_foreign_work_folder(Path(folder))
    data = read_json(Path(folder) / "config.json")
    data.pop("hf_config", None)
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError, KeyError) as e:
        raise BadInputError(f"{folder}/config.json: not a config of ours ({e})") from None


class Ours(PartHolder):
    """Our model, held part by part (see the module docstring)."""

    def __init__(
        self,
        dtype: str,
        *,
        model: GQATransformer | None = None,
        files: Path | None = None,
        plan: ConversionPlan | None = None,
        reference: Reference | None = None,
        streaming: bool = False,
        allow_nonfinite: bool = False,
        device_of: Callable[[Part], torch.device] = lambda part: torch.device("cpu"),
        part_elements: int = 0,
    ):
        from gqa_convert.model.decoder import GQATransformer

        self.dtype, self.streaming, self.device_of = dtype, streaming, device_of
        self.part_elements, self._splits = part_elements, {}  # sub-layer streaming
        self.allow_nonfinite = allow_nonfinite
        self.preloaded = model is not None
        self.plan, self.reference = plan, reference
        self.files: dict[str, TensorInfo] = {}
        if model is not None:
            self.model = model.to(COMPUTE_DTYPES[dtype]).eval()
            self.cfg = model.cfg
            self.where = "the model given"
        else:
            if files is not None:
                from gqa_convert.export import check_export_tensors

                self.cfg = read_export_config(files)
                self.files = read_weights(files)
                check_export_tensors(files, self.cfg, self.files)
                self.where = str(files)
            else:
                self.cfg = plan.config
                self.tasks: dict[str, TensorTask] = {t.target: t for t in plan.tasks}
                self.where = str(plan.src)
            with torch.device("meta"):
                self.model = GQATransformer(self.cfg).eval()
            self.model.reset_rotary()
            self._check_names()
        self.n_layers = len(self.model.blocks)
        self._held: set[Part] = set()
        # A released layer's cast tensors by their name in the block, for the next layer's
        # casts of the same name and shape (`_cast`); what a part has cast, by part.
        self._free: dict[str, Tensor] = {}
        self._cast_by_part: dict[Part, dict[str, Tensor]] = {}
        # Ours are views of the HF reference's tensors (SRC mapped in memory, dense).
        source = plan.source if plan is not None else None
        self.dequantised = not self.files and source is not None and source.quantized
        self.views = not self.preloaded and not self.files and not self.dequantised
        self._last: tuple[str, Tensor] | None = None  # a stacked source, for its next expert

    def _check_names(self) -> None:
        from gqa_convert.model.decoder import _zero_by_config

        wanted = {n for n in self.model.state_dict() if not _zero_by_config(self.cfg, n)}
        have = set(self.files) if self.files else set(self.tasks)
        problems = [f"missing tensor {n}" for n in sorted(wanted - have)]
        problems += [f"unexpected tensor {n}" for n in sorted(have - set(self.model.state_dict()))]
        if problems:
            what = f"{self.where}: the tensors do not match config.json"
            raise BadInputError(listing(what, problems))

    def modules(self, part: Part) -> dict[str, nn.Module]:
        if part == "embed":
            extra = getattr(self.model, "embed_per_layer", None)  # Gemma 4's per-layer inputs
            return {"embed": self.model.embed} | ({"embed_per_layer": extra} if extra else {})
        if part == "final":
            return {"ln_final": self.model.ln_final, "unembed": self.model.unembed}
        return {f"blocks.{part}": self.model.blocks[part]}

    def layer(self, part: int) -> nn.Module:
        return self.model.blocks[part]

    def _materialise(self, part: Part) -> None:
        from gqa_convert.model.decoder import _zero_by_config
        from gqa_convert.model.moe import param_dtype

        device, dtype = self.device_of(part), COMPUTE_DTYPES[self.dtype]
        split = self._split(part)  # held by sub-layer Splits, a slice at a time
        self._keep_free_for(part)
        cast_here = self._cast_by_part.setdefault(part, {})
        for prefix, module in self.modules(part).items():
            state = {}
            for name, param in module.state_dict(keep_vars=True).items():
                full = f"{prefix}.{name}"
                if full in split:
                    continue
                if _zero_by_config(self.cfg, full) and full not in (self.files or self.tasks):
                    tensor = torch.zeros(param.shape, dtype=dtype)
                else:
                    tensor = self._tensor(part, full)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise BadInputError(
                        f"{self.where}: {full} has shape {list(tensor.shape)}, config.json "
                        f"implies {list(param.shape)}"
                    )
                # The embedding is only indexed: it stays in its storage dtype and the rows
                # taken are cast (a cast commutes with indexing), not the whole table.
                keep = part == "embed" and self.files
                cast = param_dtype(self.model, full, dtype)  # a router kept in fp32
                if keep or (tensor.device == device and tensor.dtype == cast):
                    state[name] = tensor.to(device=device)
                else:
                    state[name] = cast_here[name] = self._cast(name, tensor, device, cast)
            missing = module.load_state_dict(state, assign=True, strict=not split).missing_keys
            if {f"{prefix}.{name}" for name in missing} - split:
                raise BadInputError(f"{self.where}: {missing} not loaded")  # not reached

    # ---- casts into released layers' arrays ----------------------------------------------
    # Streaming, each layer's weights are cast into new arrays: fresh pages, which the
    # kernel zeroes and maps one fault at a time (at 16 layers of 1.7 GB bf16, 3.4 GB of
    # them: more system time than the forward's arithmetic, measured). The next layer has
    # the same tensors: its casts go into the released layer's arrays instead.

    def _release(self, part: Part) -> None:
        cast = self._cast_by_part.pop(part, {})
        # kept for the next layer only: after the last, HF's unembedding is read next, and
        # a layer's arrays held beside it would pass the streamed estimate (8B: +0.9 GB)
        self._free = cast if isinstance(part, int) and part + 1 < self.n_layers else {}
        super()._release(part)

    def _keep_free_for(self, part: Part) -> None:
        """Drop the free arrays `part` cannot use (another part kind, names or shapes)
        before it allocates: at most one layer's arrays are ever held beyond the budget's."""
        if not isinstance(part, int):
            self._free = {}
            return
        shapes = {n: t.shape for n, t in self.layer(part).state_dict(keep_vars=True).items()}
        self._free = {n: t for n, t in self._free.items() if shapes.get(n) == t.shape}

    def _cast(self, name: str, tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        free = self._free.pop(name, None)
        if free is not None and free.dtype == dtype and free.device == torch.device(device):
            return free.copy_(tensor)
        return tensor.to(device=device, dtype=dtype)

    def _make_splits(self, part: Part) -> list[Split]:
        """sublayer.ours_splits of the part: slices of the export's tensors read from its
        files; of SRC mapped in memory, the mapped tensor (read whole) sliced."""
        from gqa_convert.model.decoder import _zero_by_config
        from gqa_convert.model.moe import param_dtype

        device, dtype = self.device_of(part), COMPUTE_DTYPES[self.dtype]
        shapes = {f"{p}.{n}": t.shape for p, m in self.modules(part).items()
                  for n, t in m.state_dict(keep_vars=True).items()}  # fmt: skip

        def read(full: str, dim: int | None, index: Any) -> Tensor:
            where = (slice(None),) * (dim or 0) + (index,)
            if _zero_by_config(self.cfg, full) and full not in (self.files or self.tasks):
                tensor = torch.zeros(shapes[full], dtype=dtype)
                tensor = tensor if index is None else tensor[where]
            elif self.files and index is not None:
                tensor = read_slice(self.files[full], dim, index)
            else:
                tensor = self._tensor(part, full)
                tensor = tensor if index is None else tensor[where].clone()
            keep = part == "embed" and self.files  # as `_materialise`: indexed, then cast
            cast = param_dtype(self.model, full, dtype)
            return tensor.to(device=device, dtype=None if keep else cast)

        return ours_splits(self.cfg, part, self.modules(part), read, self.part_elements)

    def _tensor(self, part: Part, name: str) -> Tensor:
        from gqa_convert.checkpoint import to_torch
        from gqa_convert.mapping import apply_layout

        if self.files:
            info = self.files[name]
            return to_torch(map_array(info), info.dtype)
        task = self.tasks[name]
        if self.dequantised:
            source = self._dequantised(task.source)
        elif task.expert is not None and self.part_elements:  # one expert of a stacked source
            source = self.reference.tensor_of_source(part, task.source, task.expert)
            task = dataclasses.replace(task, expert=0)
        else:
            source = self.reference.tensor_of_source(part, task.source)
        bad = 0 if self.allow_nonfinite else count_nonfinite(source)  # before the permute
        tensor = apply_layout(task, source, self.cfg)
        if bad:
            raise BadInputError(
                f"{self.plan.sources[task.source].path}: tensor {task.source!r} has {bad} "
                f"NaN/Inf value(s) of {tensor.numel()}; convert with --allow-nonfinite to keep them"
            )
        return tensor

    def _dequantised(self, name: str) -> Tensor:
        """The source tensor `name` as our reader dequantises it (the last one is kept: a
        stacked source serves its experts in turn)."""
        from gqa_convert.checkpoint import to_torch

        if self._last is None or self._last[0] != name:
            self._last = None
            info = self.plan.sources[name]
            self._last = (name, to_torch(self.plan.source.read(name), info.dtype))
        return self._last[1]

    # ---- running ----------------------------------------------------------------------

    def device(self, part: Part) -> torch.device:
        if self.preloaded:
            return next(next(iter(self.modules(part).values())).parameters()).device
        return self.device_of(part)

    # What GQATransformer.forward does around its blocks, part by part.

    def embed(self, tokens: Tensor) -> Tensor:
        """The stream entering block 0 (Granite, Gemma: times embedding_multiplier)."""
        from gqa_convert.model.decoder import scale_embeddings

        out = self.model.embed(tokens.to(self.device("embed")))
        return self.model.hook_embed(scale_embeddings(self.cfg, out.to(COMPUTE_DTYPES[self.dtype])))

    def block_inputs(self, tokens: Tensor, embeds: Tensor) -> dict[str, Any]:
        """What the blocks take beside the stream, for one input (the embedding part held):
        Gemma 4's per-layer inputs [batch, pos, n_layers, p] and the store its layers share
        K/V through (filled as the blocks run); empty for other families."""
        if not self.cfg.d_per_layer_input and not self.cfg.kv_shared_layers:
            return {}
        extra: dict[str, Any] = {"shared_kv": {}}
        if self.cfg.d_per_layer_input:
            tokens = tokens.to(self.device("embed"))
            extra["per_layer"] = self.model.embed_per_layer(tokens, embeds)
        return extra

    def block_kwargs(self, extra: dict[str, Any], layer: int, device: torch.device) -> dict:
        """`block_inputs`' share of block `layer`, as its keyword arguments."""
        kwargs = {k: v for k, v in extra.items() if k == "shared_kv"}
        if "per_layer" in extra:
            kwargs["per_layer_input"] = extra["per_layer"][:, :, layer].to(device)
        return kwargs

    def rotary(self, n_pos: int, part: Part) -> tuple[Tensor, Tensor]:
        """cos / sin for a sequence of `n_pos` at layer `part` (Gemma 3: local layers have
        their own; Granite SWA: a theta per layer; OLMo2: kept in fp32)."""
        dtype = torch.float32 if self.cfg.rotary_in_fp32 else COMPUTE_DTYPES[self.dtype]
        layer = part if isinstance(part, int) and part < self.cfg.n_layers else None
        return self.model.rotary(n_pos, dtype, self.device(part), layer=layer)

    def final(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The final norm, the logits (Granite: divided by logits_scaling; Gemma 2:
        soft-capped), and the unembedding's output before those."""
        from gqa_convert.model.decoder import final_logits

        normed = self.model.ln_final(hidden.to(self.device("final")))
        raw = self.model.unembed(normed)
        return normed, final_logits(self.cfg, raw), raw
