"""Models by name: ``build_model(name, input_shape, num_classes, **options)``.

``input_shape`` excludes the batch dimension: ``(C, H, W)`` for images, ``(C, L)`` for 1-D
signals, ``(D,)`` for vectors, ``(T,)`` for token windows (language models, ``num_classes`` = the
vocabulary). Every model supports double backward, so Hessian-vector products work for all of
them: the ViT writes its attention out with matmul + softmax; the GPT uses
``F.scaled_dot_product_attention`` (fused kernels), whose fused kernels have no double backward, so
every pass that builds a double-backward graph runs it with the math kernel
(:func:`sassha_tune.optim.base.double_backward_context`).

Names (``MODELS``):

* ``mlp`` - flatten + ReLU MLP; option ``hidden`` (list of widths, default ``[256, 256]``).
* ``cnn1d`` - small 1-D CNN for MNIST-1D; options ``channels`` (32), ``kernel_size`` (5).
* ``cnn`` - small 2-D CNN (two conv+pool stages); options ``channels`` ([32, 64]), ``hidden`` (128).
* ``resnet20`` / ``resnet32`` / ``resnet56`` (any ``resnet{6n+2}``) - CIFAR ResNets, 16/32/64
  channels, BatchNorm, 1x1 conv + BN shortcuts; option ``width`` (base channels, 16).
* ``wrn16_4`` / ``wrn28_10`` (any ``wrn{6n+4}_{k}``) - pre-activation wide ResNets; option
  ``dropout`` (0.0).
* ``vit`` - small ViT; options ``patch_size`` (4), ``dim`` (128), ``depth`` (6), ``heads`` (4),
  ``mlp_ratio`` (2), ``dropout`` (0.0). Inputs are zero-padded to a multiple of the patch size.
* ``gpt`` - a nanoGPT-style causal transformer for token windows: token and position embeddings,
  pre-norm blocks (causal self-attention, GELU MLP of 4x width), final LayerNorm, output head tied
  to the token embedding; options ``n_layer`` (4), ``n_head`` (4), ``n_embd`` (128), ``dropout``
  (0.0), ``bias`` (False). Its context length is the window length of the inputs; logits have
  shape (batch, T, vocabulary).
* ``"package.module:factory"`` - a plug-in, called as
  ``factory(input_shape=..., num_classes=..., **options)``; it must return an ``nn.Module``.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..plugins import is_plugin, load_plugin

MODELS = ["mlp", "cnn1d", "cnn", "resnet20", "resnet32", "resnet56", "wrn16_4", "wrn28_10", "vit", "gpt"]


def _image_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise UserError(f"model {model!r} needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# small models


class MLP(nn.Module):
    def __init__(
        self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 256)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN1D(nn.Module):
    """Three conv layers (stride 1, 2, 2) on a (C, L) signal, then a linear classifier."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, channels: int = 32, kernel_size: int = 5
    ) -> None:
        super().__init__()
        if len(input_shape) == 1:
            input_shape = (1, input_shape[0])
        if len(input_shape) != 2:
            raise UserError(
                f"model 'cnn1d' needs (C, L) or (L,) inputs, got input shape {tuple(input_shape)}"
            )
        c_in, length = int(input_shape[0]), int(input_shape[1])
        pad = kernel_size // 2
        self.in_shape = (c_in, length)
        self.features = nn.Sequential(
            nn.Conv1d(c_in, channels, kernel_size, padding=pad),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size, stride=2, padding=pad),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size, stride=2, padding=pad),
            nn.ReLU(),
        )
        with torch.no_grad():
            n_out = self.features(torch.zeros(1, c_in, length)).numel()
        self.head = nn.Linear(n_out, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], *self.in_shape)
        return self.head(self.features(x).flatten(1))


class CNN(nn.Module):
    """conv3x3-ReLU-maxpool twice, adaptive pooling to 4x4, one hidden linear layer."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        c_in = _image_shape(input_shape, "cnn")[0]
        c1, c2 = (int(c) for c in channels)
        self.features = nn.Sequential(
            nn.Conv2d(c_in, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------------------------
# CIFAR ResNets (6n+2)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, depth: int, input_shape: Sequence[int], num_classes: int, width: int = 16) -> None:
        super().__init__()
        if error := _depth_error(ResNet, (depth,)):
            raise UserError(error)
        n = (depth - 2) // 6
        c_in = _image_shape(input_shape, f"resnet{depth}")[0]
        self.stem = nn.Sequential(
            nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        c = width
        for stage, mult in enumerate((1, 2, 4)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c, width * mult, stride))
                c = width * mult
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------------
# Wide ResNets (pre-activation)


class WideBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + skip


class WideResNet(nn.Module):
    def __init__(
        self, depth: int, k: int, input_shape: Sequence[int], num_classes: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if error := _depth_error(WideResNet, (depth, k)):
            raise UserError(error)
        n = (depth - 4) // 6
        c_in = _image_shape(input_shape, f"wrn{depth}_{k}")[0]
        widths = (16 * k, 32 * k, 64 * k)
        self.stem = nn.Conv2d(c_in, 16, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        c = 16
        for stage, w in enumerate(widths):
            for i in range(n):
                blocks.append(WideBlock(c, w, 2 if stage > 0 and i == 0 else 1, dropout))
                c = w
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.layers(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------------
# ViT


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise UserError(f"vit: dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        attn = self.drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, t, d)
        return self.drop(self.proj(out))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding (conv with stride = patch), class token, learned positions, pre-norm blocks."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) not in (2, 3):
            raise UserError(f"model 'vit' needs (C, H, W) or (C, L) inputs, got input shape {shape}")
        self.patch = int(patch_size)
        spatial = shape[1:]
        n_patches = math.prod(math.ceil(s / self.patch) for s in spatial)
        conv = nn.Conv2d if len(shape) == 3 else nn.Conv1d
        self.embed = conv(shape[0], dim, self.patch, stride=self.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        pads: list[int] = []
        for s in reversed(x.shape[2:]):
            pads += [0, (-s) % self.patch]
        if any(pads):
            x = F.pad(x, pads)
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


# --------------------------------------------------------------------------------------------
# GPT (language models)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = float(dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.drop(self.proj(out.transpose(1, 2).contiguous().view(b, t, d)))


class GPTBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=bias),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A nanoGPT-style decoder: token windows (batch, T) -> next-token logits (batch, T, vocabulary).

    Initialization as GPT-2: normal(0, 0.02) weights, zero biases, the residual projections scaled
    by 1/sqrt(2 n_layer). The output head shares the token embedding's weight."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 1:
            raise UserError(f"model 'gpt' needs token windows (T,) as inputs, got input shape {shape}")
        if n_embd % n_head:
            raise UserError(f"gpt: n_embd {n_embd} must be divisible by n_head {n_head}")
        self.block_size = shape[0]
        self.tok = nn.Embedding(num_classes, n_embd)
        self.pos = nn.Embedding(self.block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[GPTBlock(n_embd, n_head, dropout, bias) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, num_classes, bias=False)
        self.head.weight = self.tok.weight  # weight tying
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("attn.proj", "mlp.2")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise UserError(f"gpt: a window of {t} tokens is longer than the context of {self.block_size}")
        positions = torch.arange(t, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(positions))
        return self.head(self.ln_f(self.blocks(x)))


# --------------------------------------------------------------------------------------------
# the factory


def _plugin(name: str, input_shape: tuple, num_classes: int, options: dict) -> nn.Module:
    factory = load_plugin(name, "model plug-in")
    model = factory(input_shape=input_shape, num_classes=num_classes, **options)
    if not isinstance(model, nn.Module):
        raise UserError(f"model plug-in {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _depth_error(cls: type, encoded: tuple[int, ...]) -> str | None:
    """Why the depth (and width) a ResNet/WRN name encodes cannot be built; None if it can."""
    if cls is ResNet and ((encoded[0] - 2) % 6 or encoded[0] < 8):
        return f"ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {encoded[0]}"
    if cls is WideResNet and ((encoded[0] - 4) % 6 or encoded[0] < 10 or encoded[1] < 1):
        return f"WRN depth must be 6n+4 (16, 22, 28, ...) and width >= 1, got {encoded[0]} and {encoded[1]}"
    return None


def model_name_error(name: str) -> str | None:
    """Why built-in model ``name`` cannot be built (e.g. ``resnet21``); None if it can or is a plug-in."""
    found = None if is_plugin(name) else _builtin(name)
    return None if found is None else _depth_error(*found)


def _builtin(name: str) -> tuple[type[nn.Module], tuple[int, ...]] | None:
    """The class that builds built-in model ``name`` and the arguments its name encodes (depth, k)."""
    classes: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn1d": CNN1D, "cnn": CNN, "vit": ViT, "gpt": GPT}
    if name in classes:
        return classes[name], ()
    if m := re.fullmatch(r"resnet(\d+)", name):
        return ResNet, (int(m.group(1)),)
    if m := re.fullmatch(r"wrn(\d+)_(\d+)", name):
        return WideResNet, (int(m.group(1)), int(m.group(2)))
    return None


def is_builtin_model(name: str) -> bool:
    """Whether ``name`` is a built-in model (``mlp``, ``resnet20``, ``wrn16_4``, ...; the depth may
    still be one that cannot be built, see :func:`model_name_error`)."""
    return not is_plugin(name) and _builtin(name) is not None


def is_language_model(name: str) -> bool:
    """Whether built-in model ``name`` takes token windows (a language model)."""
    found = None if is_plugin(name) else _builtin(name)
    return found is not None and found[0] is GPT


#: The layers that make a network (mostly) invariant to the scale of the weights before them, so
#: that it absorbs the large steps SASSHA takes where its lazy Hessian estimate is near zero.
NORMALIZATION_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm,
                        nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.RMSNorm)


def has_normalization_layers(model: nn.Module) -> bool:
    """Whether a built model has any normalization layer (:data:`NORMALIZATION_LAYERS`, subclasses
    included): how a plug-in model is judged once built."""
    return any(isinstance(m, NORMALIZATION_LAYERS) for m in model.modules())


def has_normalization(name: str) -> bool | None:
    """Whether built-in model ``name`` has normalization layers (BatchNorm/LayerNorm); ``None``
    for plug-ins and unknown names, which are judged once built (:func:`has_normalization_layers`)."""
    found = None if is_plugin(name) else _builtin(name)
    if found is None:
        return None
    return found[0] in (ResNet, WideResNet, ViT, GPT)


def model_option_parameters(name: str) -> tuple[inspect.Parameter, ...] | None:
    """The ``model_options`` built-in model ``name`` accepts: its constructor's parameters after
    those ``build_model`` fills (the ones the name encodes, ``input_shape``, ``num_classes``), with
    their annotations evaluated (``int``, ``float``, ``bool``, ``tuple[int, int]``, ``Sequence[int]``)
    and defaults. ``None`` for plug-ins (``package.module:factory``) and unknown names. The config
    validates ``task.model_options`` (names and values) with this.
    """
    if is_plugin(name):
        return None
    found = _builtin(name)
    if found is None:
        return None
    cls, encoded = found
    params = list(inspect.signature(cls.__init__, eval_str=True).parameters.values())[1 + len(encoded) + 2 :]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p for p in params if p.kind in kinds)


def model_option_names(name: str) -> tuple[str, ...] | None:
    """The ``model_options`` keys built-in model ``name`` accepts (:func:`model_option_parameters`)."""
    params = model_option_parameters(name)
    return None if params is None else tuple(p.name for p in params)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **options) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (no batch dim) and ``num_classes`` outputs."""
    shape = tuple(int(s) for s in input_shape)
    if is_plugin(name):
        return _plugin(name, shape, num_classes, options)
    found = _builtin(name)
    if found is None:
        raise UserError(
            f"Unknown model {name!r} (expected one of {', '.join(MODELS)} or 'package.module:factory')"
        )
    cls, encoded = found
    unknown = sorted(set(options) - set(model_option_names(name) or ()))
    if unknown:
        raise UserError(
            f"model {name!r}: unexpected keyword argument(s) {', '.join(unknown)} "
            f"(known: {', '.join(model_option_names(name) or ())})"
        )
    return cls(*encoded, shape, num_classes, **options)
