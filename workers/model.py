"""Convolutional autoencoders: the seed preset and the default design, plus their configs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

ARCHITECTURES = ("default", "seed")
CURRENT_REVISION = 2


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model from its saved weights."""

    architecture: str = "default"
    image_size: int = 64
    embedding_dim: int = 256
    # Design revision of the architecture: versions saved before revisions existed are 1.
    revision: int = CURRENT_REVISION

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


class SpatialCodeAutoencoder(nn.Module):
    """Revision 1 of "default": strided conv blocks down to S/16, a linear code of the flat map.

    Kept so that versions saved before revision 2 still load and answer queries.
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


class _Residual(nn.Module):
    """Two 3x3 conv + batch norm layers with an identity (or 1x1 strided) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class InvariantAutoencoder(nn.Module):
    """Default design (revision 2): residual conv encoder, global pooling, normalised code.

    Encoder: a strided stem and three residual stages (each halves the side) end in a feature
    map that global average pooling turns into one vector whatever the input size, so training
    can use smaller random crops than the images that get embedded. A linear layer + batch
    norm make the ``embedding_dim`` code. The decoder rebuilds a clean image from the code
    alone (nearest upsampling + conv, no checkerboard artefacts); a small projection head maps
    the code to the space where two augmented views of one image are pulled together (see
    ``workers.training``). Only ``encode`` is used for indexing and queries.
    """

    widths = (32, 64, 128, 256)
    blocks = (1, 1, 1)
    projection_dim = 128

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int) -> list[nn.Module]:
        return [_Residual(cin, cout, 2)] + [_Residual(cout, cout, 1) for _ in range(blocks - 1)]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.image_size % 16:
            raise ValueError("default architecture needs image_size divisible by 16")
        w = self.widths
        self.features = nn.Sequential(
            nn.Conv2d(3, w[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(w[0]),
            nn.ReLU(inplace=True),
            *self._stage(w[0], w[1], self.blocks[0]),
            *self._stage(w[1], w[2], self.blocks[1]),
            *self._stage(w[2], w[3], self.blocks[2]),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.to_code = nn.Sequential(nn.Linear(w[3], config.embedding_dim, bias=False),
                                     nn.BatchNorm1d(config.embedding_dim))
        self.projector = nn.Sequential(
            nn.Linear(config.embedding_dim, 512, bias=False), nn.BatchNorm1d(512),
            nn.ReLU(inplace=True), nn.Linear(512, self.projection_dim),
        )
        self.decoder_channels = w[3] // 2
        self.from_code = nn.Sequential(
            nn.Linear(config.embedding_dim, self.decoder_channels * 16), nn.ReLU(inplace=True))
        c = self.decoder_channels  # 4x4 -> up to 64x64: four doublings, halving the channels
        self.upsample = nn.ModuleList([_up(c, c // 2), _up(c // 2, c // 4), _up(c // 4, c // 8),
                                       _up(c // 8, c // 8)])
        self.to_pixels = nn.Sequential(nn.Conv2d(c // 8, 3, 3, padding=1), nn.Tanh())
        self.embedding_dim = config.embedding_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_code(self.features(x))

    def project(self, code: torch.Tensor) -> torch.Tensor:
        """The code mapped into the invariance objective's space (training only)."""
        return self.projector(code)

    def decode(self, code: torch.Tensor, size: int) -> torch.Tensor:
        """Images of side ``size`` rebuilt from codes.

        A 4x4 grid is doubled to 32x32, and once more to 64x64 only when ``size`` is above 32,
        so no work is spent at a finer scale than asked for; then it is resized to ``size``.
        """
        out = self.from_code(code).view(-1, self.decoder_channels, 4, 4)
        for i, block in enumerate(self.upsample):
            if i == 3 and size <= 32:
                break
            out = block(out)
        out = self.to_pixels(out)
        if out.shape[-1] != size:
            out = nn.functional.interpolate(out, size=(size, size), mode="bilinear",
                                            align_corners=False)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x.shape[-1])


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
        if config.revision == 1:
            return SpatialCodeAutoencoder(config)
        return InvariantAutoencoder(config)
    raise ValueError(f"unknown architecture {config.architecture!r}; choose one of {ARCHITECTURES}")
