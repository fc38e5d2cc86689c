"""Hook points and TransformerLens's hook API on our model: `hooks`, `run_with_hooks`,
`run_with_cache`, `add_hook`, `reset_hooks`, with the semantics of TL 3.9's
`HookedRootModule` (forward hooks only).

A hook is `fn(activation, hook=hook_point) -> None | Tensor`: returning a tensor replaces the
activation downstream. Hook points are named by their module path (`blocks.0.hook_resid_post`,
`blocks.0.attn.hook_pattern`, ...): TL's names. Hooks added inside `with model.hooks(...)`
carry the context's level and are removed when it exits, also on an exception; `reset_hooks`
removes every hook that is not permanent. A plain `register_forward_hook` still works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

HookFn = Callable[..., Tensor | None]  # fn(activation, *, hook: HookPoint)
NamesFilter = str | Sequence[str] | Callable[[str], bool] | None


@dataclass
class Handle:
    """One hook added through `HookPoint.add_hook` (TL's LensHandle)."""

    hook: RemovableHandle
    is_permanent: bool = False
    context_level: int | None = None


class HookPoint(nn.Module):
    """Returns its input; a place to read or replace an activation. `name` is set by the
    model that holds it (its module path)."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None
        self.fwd_hooks: list[Handle] = []

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
        if name not in self.hook_dict:
            raise KeyError(f"no hook point named {name!r} (see model.hook_dict for the names)")
        return [self.hook_dict[name]]

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
        **model_kwargs: Any,
    ) -> tuple[Any, dict[str, Tensor]]:
        """The model's output and {hook name: activation}, detached, moved to `device` and
        cast to `dtype` (floating-point ones; None: as computed). `names_filter`: a name, a
        list of names or a predicate (None: every hook point). Caching `hook_attn_scores` or
        `hook_pattern` runs attention on the explicit path, which computes them."""
        keep = _names_filter(names_filter)
        cache: dict[str, Tensor] = {}

        def save(tensor: Tensor, hook: HookPoint) -> None:
            tensor = tensor.detach()
            cast = dtype if dtype is not None and tensor.is_floating_point() else None
            tensor = tensor.to(device=device, dtype=cast)
            cache[hook.name] = tensor[0] if remove_batch_dim else tensor

        with self.hooks([(name, save) for name in self.hook_dict if keep(name)]):
            out = self(*model_args, **model_kwargs)
        return out, cache


def _names_filter(names_filter: NamesFilter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    names = set(names_filter)
    return lambda name: name in names
