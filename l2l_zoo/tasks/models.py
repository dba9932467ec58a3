"""Optimizee architectures used in the papers.

* ``MLP``: 784→500→10 ReLU, the "base MLP" of Chen et al. (2020, §4) and Andrychowicz et al.
  (2016, §3.2 uses 20 hidden units; the later papers use 500). 397,510 parameters.
* ``deep_mlp``: a 5-layer MLP with ≈16× the base MLP's parameters (Chen et al. 2020, Fig. 5a):
  784→2000→1500→1000→500→10 (6,578,010 parameters).
* ``LeNet``: LeNet-5 on 28×28 MNIST (padding 2 on the first convolution), 61,706 parameters
  (Chen et al. 2020 Fig. 4a; smoothness paper §5.1.3).
* ``ConvNet``: the 3-layer, 32-channel CNN on CIFAR-10 of the smoothness paper (§5.1.4):
  3 × [conv3×3(32) – ReLU – maxpool2] → Linear(512→10), 24,522 parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "LeNet", "ConvNet", "glorot_init_"]


class MLP(nn.Module):
    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (500,), num_classes: int = 10,
                 activation: str = "relu"):
        super().__init__()
        sizes = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        acts = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        self.act = acts[activation]

    def forward(self, x):
        x = x.flatten(1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):  # no slicing: higher's patched ModuleList can't slice
            x = layer(x)
            if i < last:
                x = self.act(x)
        return x


class LeNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2 if image_size == 28 else 0)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


class ConvNet(nn.Module):
    def __init__(self, in_channels: int = 3, channels: int = 32, num_classes: int = 10,
                 image_size: int = 32):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(in_channels, channels, 3, padding=1),
                                    nn.Conv2d(channels, channels, 3, padding=1),
                                    nn.Conv2d(channels, channels, 3, padding=1)])
        self.fc = nn.Linear(channels * (image_size // 8) ** 2, num_classes)

    def forward(self, x):
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return self.fc(x.flatten(1))


def glorot_init_(model: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases (TensorFlow's default, used by the MARTHE paper)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
