"""Hook points and TransformerLens's hook API on our model: `hooks`, `run_with_hooks`,
`run_with_cache`, `add_hook`, `reset_hooks`, with the semantics of TL 3.9's
`HookedRootModule` (forward hooks only).

A hook is `fn(activation, hook=hook_point) -> None | Tensor`: returning a tensor replaces the
activation downstream. Hook points are named by their module path (`blocks.0.hook_resid_post`,
`blocks.0.attn.hook_pattern`, ...): TL's names. Hooks added inside `with model.hooks(...)`
carry the context's level and are removed when it exits, also on an exception; `reset_hooks`
removes every hook that is not permanent. A plain `register_forward_hook` still works.
A name that is not a hook point of the model (in `add_hook`, `hooks`, `run_with_hooks`,
`run_with_cache`'s `names_filter`) raises `HookNameError`, naming it.

`through` is the pattern for a hook point on a value the plain forward does not use as such
(a norm's `hook_scale`): the model computes as before unless a hook returns a new tensor or
edits it in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

HookFn = Callable[..., Tensor | None]  # fn(activation, *, hook: HookPoint)
NamesFilter = str | Sequence[str] | Callable[[str], bool] | None


class HookNameError(KeyError):
    """A hook name the model does not have (a KeyError, as TL's `hook_dict[name]`)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class Handle:
    """One hook added through `HookPoint.add_hook` (TL's LensHandle)."""

    hook: RemovableHandle
    is_permanent: bool = False
    context_level: int | None = None


class HookPoint(nn.Module):
    """Returns its input; a place to read or replace an activation. `name` is set by the
    model that holds it (its module path)."""

    def __init__(self, has_batch_dim: bool = True) -> None:
        super().__init__()
        self.name: str | None = None
        self.fwd_hooks: list[Handle] = []
        # False: the activation's rows are tokens of the whole batch (a MoE's routing), so
        # run_with_cache(remove_batch_dim=True) keeps it whole
        self.has_batch_dim = has_batch_dim

    def forward(self, x: Tensor) -> Tensor:
        return x

    @property
    def has_hooks(self) -> bool:
        """Any forward hook, added here or with `register_forward_hook`."""
        return bool(self._forward_hooks or self._forward_pre_hooks)

    def add_hook(
        self,
        hook: HookFn,
        dir: str = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Call `hook(activation, hook=self)` on every forward; a tensor it returns replaces
        the activation."""
        if dir != "fwd":
            raise ValueError(f"only forward hooks are supported (dir={dir!r})")
        handle = self.register_forward_hook(
            lambda _module, _inputs, output: hook(output, hook=self), prepend=prepend
        )
        entry = Handle(handle, is_permanent, level)
        self.fwd_hooks.insert(0, entry) if prepend else self.fwd_hooks.append(entry)

    def remove_hooks(
        self, dir: str = "fwd", including_permanent: bool = False, level: int | None = None
    ) -> None:
        """Remove the hooks of `level` (None: every level), permanent ones only if asked."""
        kept = []
        for entry in self.fwd_hooks:
            if (including_permanent or not entry.is_permanent) and (
                level is None or entry.context_level == level
            ):
                entry.hook.remove()
            else:
                kept.append(entry)
        self.fwd_hooks = kept

    def __repr__(self) -> str:
        return f"HookPoint(name={self.name!r})"


def through(hook: HookPoint, value: Tensor, rows: bool = False) -> tuple[Tensor, bool]:
    """`hook`'s output for `value`, in `value`'s shape, and whether a hook changed it
    (returned another tensor or edited it in place): the pattern for a hook point on a value
    the plain forward does not use as such, which then keeps its own, bit-identical path
    unless changed. `rows`: the hook sees `value` as [-1, value.shape[-1]] (TL's view of a
    q/k norm's inputs)."""
    seen = value.reshape(-1, value.shape[-1]) if rows else value
    version = seen._version
    out = hook(seen)
    return out.reshape(value.shape), out is not seen or seen._version != version


class HookedRootModule(nn.Module):
    """TL's hook API for a module tree holding HookPoints. Call `setup()` at the end of
    `__init__` (it names the hook points)."""

    def setup(self) -> None:
        self.context_level = 0
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    def hook_points(self) -> list[HookPoint]:
        return list(self.hook_dict.values())

    def _points(self, name: str | Callable[[str], bool]) -> list[HookPoint]:
        if callable(name):
            return [hp for n, hp in self.hook_dict.items() if name(n)]
        self.check_hook_names([name])
        return [self.hook_dict[name]]

    def inactive_hooks(self) -> dict[str, str]:
        """{name: the setting that makes it fire} of the hook points that never fire now."""
        return {}

    def check_hook_names(self, names: Iterable[str]) -> None:
        """HookNameError naming every name in `names` that is not a hook point here, or one
        that cannot fire as the model is set (TL's optional points: it says the setting)."""
        unknown = [name for name in names if name not in self.hook_dict]
        if unknown:
            near = {n for name in unknown for n in get_close_matches(name, self.hook_dict, 2)}
            hint = f"; close: {', '.join(sorted(near))}" if near else ""
            raise HookNameError(
                f"no hook point named {', '.join(map(repr, unknown))} on this model "
                f"(model.hook_dict lists the {len(self.hook_dict)} names{hint})"
            )
        inactive = self.inactive_hooks()
        if off := [f"{name!r} (needs {inactive[name]})" for name in names if name in inactive]:
            raise HookNameError(f"hook point {', '.join(off)} never fires as the model is set")

    def add_hook(
        self,
        name: str | Callable[[str], bool],
        hook: HookFn,
        dir: str = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Add `hook` at the hook point `name`, or at every point whose name passes it."""
        for hp in self._points(name):
            hp.add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def add_perma_hook(self, name: str | Callable[[str], bool], hook: HookFn) -> None:
        self.add_hook(name, hook, is_permanent=True)

    def reset_hooks(self, including_permanent: bool = False, level: int | None = None) -> None:
        """Remove every hook (of `level`; permanent ones only if asked)."""
        for hp in self.hook_dict.values():
            hp.remove_hooks("fwd", including_permanent=including_permanent, level=level)

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
        bwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
        reset_hooks_end: bool = True,
    ) -> Iterator[HookedRootModule]:
        """Hooks for the duration of the block; removed on exit, also after an exception
        (and if adding one of them fails)."""
        if bwd_hooks:
            raise ValueError("backward hooks are not supported")
        self.context_level += 1
        try:
            for name, hook in fwd_hooks:
                self.add_hook(name, hook, level=self.context_level)
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks(level=self.context_level)
            self.context_level -= 1

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
        reset_hooks_end: bool = True,
        **model_kwargs: Any,
    ) -> Any:
        """`self(*model_args, **model_kwargs)` with `fwd_hooks` added for the call."""
        with self.hooks(fwd_hooks, reset_hooks_end=reset_hooks_end):
            return self(*model_args, **model_kwargs)

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NamesFilter = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        pos_slice: Any = None,
        **model_kwargs: Any,
    ) -> tuple[Any, dict[str, Tensor]]:
        """The model's output and {hook name: activation}, detached, moved to `device` and
        cast to `dtype` (floating-point ones; None: as computed). `names_filter`: a name, a
        list of names (each must be a hook point: HookNameError otherwise) or a predicate
        (None: every hook point). `pos_slice` (TL's `Slice` input) keeps those positions
        (dim -3 of q/k/v/z/result/rot_q/rot_k, -2 elsewhere); `incl_bwd`: call `.backward()` on the
        output (a scalar, e.g. `return_type="loss"`) and cache each gradient as
        `name + "_grad"`. Caching `hook_attn_scores` or `hook_pattern` runs attention on the
        explicit path, which computes them."""
        from gqa_convert.model.activation_cache import Slice

        keep = self._names_filter(names_filter)
        pos = Slice.unwrap(pos_slice)
        cache: dict[str, Tensor] = {}

        def store(name: str, tensor: Tensor, batched: bool) -> None:
            tensor = tensor.detach()
            cast = dtype if dtype is not None and tensor.is_floating_point() else None
            tensor = tensor.to(device=device, dtype=cast)
            if remove_batch_dim and batched:
                tensor = tensor[0]
            pos_dim = -3 if name.endswith(POS_DIM_3) else -2
            if tensor.dim() >= -pos_dim:
                tensor = pos.apply(tensor, dim=pos_dim)
            cache[name] = tensor

        def save(tensor: Tensor, hook: HookPoint) -> None:
            store(hook.name, tensor, hook.has_batch_dim)
            if incl_bwd and tensor.requires_grad:
                tensor.register_hook(
                    lambda grad, name=hook.name: store(f"{name}_grad", grad, hook.has_batch_dim)
                )

        inactive = self.inactive_hooks()  # they would not fire
        points = [(n, save) for n in self.hook_dict if keep(n) and n not in inactive]
        with self.hooks(points, reset_hooks_end=reset_hooks_end):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                out.backward()
        return out, cache

    def _names_filter(self, names_filter: NamesFilter) -> Callable[[str], bool]:
        """`names_filter` as a predicate; the names it lists must be hook points."""
        if names_filter is None:
            return lambda name: True
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if callable(names_filter):
            return names_filter
        names = set(names_filter)
        self.check_hook_names(sorted(names))
        return lambda name: name in names


# Hooks whose position dimension is -3 ([batch, pos, head, d]); -2 everywhere else. TL's
# list lacks hook_rot_q / hook_rot_k, so its pos_slice cuts their head dimension instead.
POS_DIM_3 = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_rot_q", "hook_rot_k")
