"""A modality discriminator: an MLP that scores an embedding as image-like (high) or text-like (low).

Used by ``AlignGAN`` on the dual encoder's normalised features. It scores each row on its own
(no batch statistics, so no BatchNorm): the adversarial losses can then be normalised over the
global batch and stay exact across processes, and the gradient penalty's per-sample gradients are
well defined.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm


class ModalityDiscriminator(nn.Module):
    """MLP ``in_dim → hidden_dim (× depth) → 1`` with LeakyReLU and optional dropout.

    With ``spectral_norm`` every linear layer's weight is divided by (a power-iteration estimate
    of) its largest singular value; LeakyReLU is 1-Lipschitz, so in eval mode the whole network is
    1-Lipschitz (dropout scales by ``1/(1−p)`` in training mode).

    Args:
        in_dim: width of the features it scores (the model's embedding width).
        hidden_dim: width of the hidden layers.
        depth: number of hidden layers (0 gives a linear discriminator).
        dropout: dropout probability after each hidden activation.
        spectral_norm: spectrally normalise every linear layer (Miyato et al., 2018).
        negative_slope: slope of the LeakyReLU for negative inputs.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 256,
        depth: int = 2,
        dropout: float = 0.0,
        spectral_norm: bool = True,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.in_dim = in_dim

        def linear(i: int, o: int) -> nn.Module:
            layer = nn.Linear(i, o)
            return _spectral_norm(layer) if spectral_norm else layer

        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [linear(width, hidden_dim), nn.LeakyReLU(negative_slope)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden_dim
        layers.append(linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        """(N, in_dim) features → (N,) scores (logits for BCE, critic values for WGAN)."""
        weight = next(self.parameters())
        if features.dtype != weight.dtype:  # bf16 weights without autocast (DeepSpeed), or the reverse
            features = features.to(weight.dtype)
        for buf in self.buffers():  # spectral norm's power-iteration vectors must follow the weights' type
            if buf.is_floating_point() and buf.dtype != weight.dtype:
                buf.data = buf.data.to(weight.dtype)
        return self.net(features).squeeze(-1)
