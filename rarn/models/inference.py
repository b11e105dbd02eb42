"""An attack-ready copy of a classifier: batch norms folded, dead taps dropped, channels-last.

Attacking a model is thousands of forward and input-gradient passes through the same frozen
network. In eval mode a ``BatchNorm2d`` is a fixed per-channel affine map, so a convolution
followed by it is one convolution with other weights and a bias
(:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`), and on CPU oneDNN's convolutions run in
channels-last layout without reordering the tensors around every call; a convolution tap that
reads only padding on the input's size contributes nothing and is dropped
(:mod:`rarn.models.taps`). :func:`folded_copy` builds that copy; the caller's model is not
touched. It computes the same function up to float rounding (logits within about 1e-5 of the
model's, tested), which is the contract an attack needs: the evaluation's attacks, radii, images
and seeds are unchanged (``evaluation.fold_batchnorm``, docs/evaluation.md).

Measured on the default pipeline's retrained network (C = 8, 5 cells, 8 x 8 digits, a batch of
76, 1 thread, CPU): a forward and input-gradient pass 51.2 -> 35.7 ms, a forward 19.6 ->
13.5 ms (folding and layout). Dropping dead taps then took the folded copy of a network of its
genotype (a ``dil_conv_5x5`` on 2 x 2 maps in the last cells) from 42.9 to 31.9 ms and from
18.4 to 9.8 ms at 2 threads (docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from rarn.models.common import eval_mode
from rarn.models.taps import crop_conv2d

__all__ = ["FoldedModel", "fold_batchnorm", "folded_copy"]

logger = logging.getLogger(__name__)


def fold_batchnorm(
    module: nn.Module, pairs: list[tuple[str, str]] | None = None, prefix: str = ""
) -> int:
    """Fold, in place, every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` in an
    ``nn.Sequential`` (of ``module`` or below) into that convolution; the norm becomes an
    ``nn.Identity`` (the positions of a Sequential stay as they were).

    A norm is folded only when the pair is in eval mode and the norm normalises with running
    statistics (``track_running_stats``); any other is left as it is. Norms outside a
    Sequential (e.g. torchvision's ``bn1`` attributes, whose use only the module's ``forward``
    knows) are left too: the copy is then slower, never different.

    Args:
        module: the module to fold, in place.
        pairs: when given, each fold appends the ``(conv, norm)`` qualified names (relative to
            ``module``; the folded convolution keeps the conv's name), so that
            :meth:`FoldedModel.refresh` can fold the live pair again.
        prefix: the qualified name of ``module`` (for ``pairs``).

    Returns:
        How many norms were folded.
    """
    folded = 0
    for name, child in module.named_children():
        folded += fold_batchnorm(child, pairs, f"{prefix}{name}.")
    if not isinstance(module, nn.Sequential):
        return folded
    names = list(module._modules)
    for a, b in zip(names, names[1:]):
        conv, bn = module._modules[a], module._modules[b]
        if (
            type(conv) is nn.Conv2d
            and type(bn) is nn.BatchNorm2d
            and not (conv.training or bn.training)
            and bn.running_mean is not None
            and bn.num_features == conv.out_channels
        ):
            module._modules[a] = fuse_conv_bn_eval(conv, bn)
            module._modules[b] = nn.Identity()
            folded += 1
            if pairs is not None:
                pairs.append((f"{prefix}{a}", f"{prefix}{b}"))
    return folded


class _ChannelsLast(torch.autograd.Function):
    """``x`` in channels-last layout; its gradient handed back contiguous (NCHW), the layout an
    attack's own reshapes expect (FAB's ``.view``)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


class FoldedModel(nn.Module):
    """The copy :func:`folded_copy` returns: the folded network ``net``, fed channels-last when
    ``channels_last``, and the model it was made from (``original``).

    Its first call also drops the convolution taps that read only padding on that input's
    size (:mod:`rarn.models.taps`: exact; a call on inputs of another size puts them back),
    then checks the copy against the original on that input (both in eval mode, no
    gradients): logits equal up to float rounding (``|a - b| <= 1e-3 (1 + max |a|)``; folding
    itself is exact to about 1e-6 relative). A copy that raises or disagrees (a module whose
    ``forward`` uses its parts otherwise than in order, a reshape that needs NCHW strides) is
    dropped with a warning, and every call goes to the original: slower, never different.
    ``active`` is None before the first call, then whether the copy is used; ``folded`` is how
    many norms were folded, ``cropped`` how many convolutions lost dead taps. Other attributes
    are looked up on the network in use, so hooks that attacks look for (BPDA's
    ``input_transform`` and ``classifier``) are still there.
    """

    def __init__(
        self,
        net: nn.Module,
        original: nn.Module,
        channels_last: bool,
        pairs: list[tuple[str, str]],
    ):
        super().__init__()
        self.net = net
        self.original = original  # a submodule: eval_mode(copy) sets its mode too
        self.channels_last = channels_last
        self.folded = len(pairs)
        self.active: bool | None = None
        self._size: tuple[int, ...] | None = None  # the input size the taps were cropped for
        self._kept: dict[int, tuple[slice, slice]] = {}  # id(cropped weight) -> taps kept
        self._full: list[tuple[nn.Conv2d, tuple, tuple, tuple, tuple]] = []
        # for refresh(): the live pairs behind each folded convolution, and the copy's other
        # tensors beside the live ones they copy (the same objects while the model trains)
        nets, lives = dict(net.named_modules()), dict(original.named_modules())
        self._fold = [(nets[c], lives[c], lives[b]) for c, b in pairs]
        fused = {c for c, _ in pairs}
        sources = dict(original.named_parameters()) | dict(original.named_buffers())
        self._same = [
            (t, sources[name])
            for name, t in [*net.named_parameters(), *net.named_buffers()]
            if name.rpartition(".")[0] not in fused
        ]

    @torch.no_grad()
    def refresh(self) -> None:
        """Make the copy the original's current self again: after a training step, the folded
        convolutions from the live conv and norm (weights and running statistics), every other
        parameter and buffer copied. Adversarial training calls it before each inner
        maximisation (``retrain.fold_batchnorm``); a few small tensor operations per norm."""
        for fused, conv, bn in self._fold:
            w, b = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            fused.weight.copy_(self._live(fused.weight, w))
            fused.bias.copy_(b)
        for dst, src in self._same:
            dst.copy_(self._live(dst, src))

    @property
    def cropped(self) -> int:
        """How many convolutions of the copy have lost dead taps (for the current input size)."""
        return len(self._full)

    def _live(self, dst: Tensor, full: Tensor) -> Tensor:
        """The part of ``full`` that the (possibly cropped) copy tensor ``dst`` holds."""
        kept = self._kept.get(id(dst))
        return full if kept is None else full[:, :, kept[0], kept[1]]

    def _crop(self, x: Tensor) -> None:
        """Drop the dead taps of every convolution of the copy that sees one input size on
        ``x`` (:func:`rarn.models.taps.crop_conv2d`)."""
        sizes: dict[nn.Conv2d, set[tuple[int, ...]]] = {}
        handles = [
            m.register_forward_pre_hook(
                lambda mod, args: sizes.setdefault(mod, set()).add(tuple(args[0].shape[2:]))
            )
            for m in self.net.modules()
            if type(m) is nn.Conv2d
        ]
        try:
            self._fast(x)
        finally:
            for h in handles:
                h.remove()
        for conv, seen in sizes.items():
            full = (tuple(conv.weight.shape), conv.kernel_size, conv.padding, conv.dilation)
            kept = crop_conv2d(conv, next(iter(seen))) if len(seen) == 1 else None
            if kept is not None:
                self._kept[id(conv.weight)] = kept
                self._full.append((conv, *full))
        self._size = tuple(x.shape[2:])

    @torch.no_grad()
    def _uncrop(self) -> None:
        """Every convolution whole again (an input of another size), re-derived from the
        original (:meth:`refresh`)."""
        logger.debug("input size changed from %s: the copy's convolutions whole again", self._size)
        for conv, shape, kernel, padding, dilation in self._full:
            conv.weight.data = conv.weight.data.new_empty(shape)
            conv.kernel_size, conv.padding, conv.dilation = kernel, padding, dilation
        self._kept, self._full, self._size = {}, [], None
        self.refresh()

    def _fast(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = _ChannelsLast.apply(x)
        return self.net(x)

    def _check(self, x: Tensor) -> None:
        with eval_mode(self.original), torch.no_grad():  # every submodule's mode comes back
            want = self.original(x)
            try:
                if x.dim() == 4:
                    self._crop(x)
                got, why = self._fast(x), ""
            except RuntimeError as e:  # e.g. a .view that needs NCHW strides
                got, why = None, f"it raised {e}"
        if got is not None:
            gap = float((got - want).abs().max()) if got.shape == want.shape else math.inf
            if not gap <= 1e-3 * (1.0 + float(want.abs().max())):
                why = f"its outputs differ by {gap:.3g}"
        self.active = not why
        if why:
            logger.warning(
                "the copy of %s with folded batch norms is not used (%s): attacking the model"
                " as given",
                type(self.original).__name__,
                why,
            )

    def __getattr__(self, name: str):
        """Anything else is the model's: an attack's hooks (e.g. BPDA's ``input_transform`` and
        ``classifier``) come from the copy, or from the original once the copy is dropped."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {})  # no recursion while (un)pickling
            use = inner.get("original" if self.__dict__.get("active") is False else "net")
            if name.startswith("_") or use is None:
                raise
            return getattr(use, name)

    def forward(self, x: Tensor) -> Tensor:
        if self.active is None:
            self._check(x)
        elif self.active and self._size is not None and tuple(x.shape[2:]) != self._size:
            self._uncrop()
        return self._fast(x) if self.active else self.original(x)


def folded_copy(model: nn.Module, device: torch.device | str | None = None) -> FoldedModel:
    """A frozen eval-mode copy of ``model`` for attacking it: batch norms folded into the
    convolutions before them (:func:`fold_batchnorm`), in channels-last layout when it runs on
    CPU (``device``, default: where ``model``'s first parameter is). GPU layouts are left as the
    model has them (not measured here). Its first call checks it against ``model``
    (:class:`FoldedModel`).

    The copy's parameters do not require gradients (an attack needs input gradients only); the
    model itself, its mode and its ``requires_grad`` flags are unchanged.

    Raises:
        TypeError, RuntimeError, copy.Error: ``model`` cannot be deep-copied.

    Example:
        >>> fast = folded_copy(model)
        >>> x_adv = pgd(fast, x, y, eps=8 / 255, step_size=2 / 255, steps=10)
    """
    net = copy.deepcopy(model).eval()
    pairs: list[tuple[str, str]] = []
    fold_batchnorm(net, pairs)
    for p in net.parameters():
        p.requires_grad_(False)
    if device is None:
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
    cpu = torch.device(device).type == "cpu"
    if cpu:
        net = net.to(memory_format=torch.channels_last)
    return FoldedModel(net, model, channels_last=cpu, pairs=pairs)
