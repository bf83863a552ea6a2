"""Convolutional autoencoders: the seed preset and the default design, plus their configs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

ARCHITECTURES = ("default", "seed")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model from its saved weights."""

    architecture: str = "default"
    image_size: int = 64
    embedding_dim: int = 256

    def to_dict(self) -> dict:
        return asdict(self)


class SeedAutoencoder(nn.Module):
    """The seed design: 3 conv+ReLU+maxpool layers 3->16->8->4, mirrored decoder, tanh, flat code.

    The embedding is the flattened 4-channel bottleneck (4 * (S/8)^2 values).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.image_size % 8:
            raise ValueError("seed architecture needs image_size divisible by 8")
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(4, 8, 2, stride=2), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(8, 16, 2, stride=2), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(16, 3, 2, stride=2), nn.Tanh(),
        )
        self.embedding_dim = 4 * (config.image_size // 8) ** 2

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.encoder(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.SiLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.SiLU(inplace=True),
    )


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.SiLU(inplace=True),
    )


class ConvAutoencoder(nn.Module):
    """Default design: strided conv blocks with batch norm down to S/16, a compact global code.

    The code is a linear projection of the flattened S/16 feature map to ``embedding_dim``
    values; the decoder mirrors it with nearest upsampling + conv (no checkerboard artefacts).
    """

    widths = (32, 64, 96, 128)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.image_size % 16:
            raise ValueError("default architecture needs image_size divisible by 16")
        w = self.widths
        self.grid = config.image_size // 16
        self.features = nn.Sequential(_down(3, w[0]), _down(w[0], w[1]), _down(w[1], w[2]),
                                      _down(w[2], w[3]))
        flat = w[3] * self.grid * self.grid
        self.to_code = nn.Linear(flat, config.embedding_dim)
        self.from_code = nn.Sequential(nn.Linear(config.embedding_dim, flat), nn.SiLU(inplace=True))
        self.decoder = nn.Sequential(
            _up(w[3], w[2]), _up(w[2], w[1]), _up(w[1], w[0]), _up(w[0], w[0]),
            nn.Conv2d(w[0], 3, 3, padding=1), nn.Tanh(),
        )
        self.embedding_dim = config.embedding_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_code(torch.flatten(self.features(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.encode(x)
        grid = self.from_code(code).view(-1, self.widths[3], self.grid, self.grid)
        return self.decoder(grid)


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the architecture named in ``config``.

    Args:
        config: architecture name and sizes.

    Returns:
        An untrained model with ``encode(x)`` and ``forward(x)``.
    """
    if config.architecture == "seed":
        return SeedAutoencoder(config)
    if config.architecture == "default":
        return ConvAutoencoder(config)
    raise ValueError(f"unknown architecture {config.architecture!r}; choose one of {ARCHITECTURES}")
