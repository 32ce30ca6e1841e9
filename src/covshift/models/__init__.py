"""Model builders: MLPs and small CNNs with a choice of width, depth, activation,
normalization, its placement, and initialization.

Module names are stable so that probes can address layers by pattern: an MLP has
``hidden.<i>.linear``, ``hidden.<i>.norm`` (absent without normalization),
``hidden.<i>.act`` and ``head``; the input of ``hidden.<i>.act`` is the
pre-activation that Ioffe & Szegedy (2015, Fig. 1) plot.

One concept a module:

- :mod:`.blocks`: what every builder shares (choices, bias cancelling, argument
  checks, weight initialization, :class:`HiddenBlock`);
- :mod:`.mlp`: :class:`MLP`, :func:`build_mlp`, :func:`build_deep_linear`;
- :mod:`.conv`: :class:`CNN`, :func:`build_cnn`, :class:`VGG`, :func:`build_vgg`;
- :mod:`.transformer`: :class:`Transformer`, :func:`build_transformer`, a GPT-style
  byte-level language model (``blocks.<i>.ln_1``/``attn``/``ln_2``/``mlp.act``,
  ``ln_f``, ``head``).

Everything is imported from here (``from covshift.models import build_mlp``).
"""

from covshift.models.blocks import ACTIVATIONS, INITS, HiddenBlock, cancels_bias
from covshift.models.conv import CNN, VGG, build_cnn, build_vgg
from covshift.models.mlp import MLP, build_deep_linear, build_mlp
from covshift.models.transformer import (
    TRANSFORMER_NORMS,
    Transformer,
    TransformerConfig,
    build_transformer,
)

__all__ = [
    "ACTIVATIONS",
    "CNN",
    "INITS",
    "MLP",
    "TRANSFORMER_NORMS",
    "VGG",
    "HiddenBlock",
    "Transformer",
    "TransformerConfig",
    "build_cnn",
    "build_deep_linear",
    "build_mlp",
    "build_transformer",
    "build_vgg",
    "cancels_bias",
]
