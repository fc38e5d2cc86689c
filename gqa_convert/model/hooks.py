"""Hook points: identity modules at the places a researcher wants to read or patch."""

from torch import nn


class HookPoint(nn.Identity):
    """Returns its input. Attach `register_forward_hook` to read or replace the activation.

    A forward hook that returns a tensor replaces the activation downstream, as in
    TransformerLens.
    """

    @property
    def has_hooks(self) -> bool:
        return bool(self._forward_hooks or self._forward_pre_hooks)
