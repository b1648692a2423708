"""A weather/climate emulator for lat-lon grids: a U-Net that is periodic in longitude and predicts increments."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def periodic_pad(x: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Pad (n, c, lat, lon): wrap around in longitude, repeat the edge rows at the poles."""
    x = F.pad(x, (width, width, 0, 0), mode="circular")
    return F.pad(x, (0, 0, width, width), mode="replicate")


class PeriodicConv(nn.Module):
    """A 3x3 convolution that sees across the date line (zero padding would invent a wall at 0/360 degrees)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve with periodic longitude."""
        return self.conv(periodic_pad(x))


def latitude_channels(x: torch.Tensor) -> torch.Tensor:
    """sin and cos of the cell-centre latitude of a regular grid (south to north), shaped (n, 2, lat, lon) like x."""
    n, _, nlat, nlon = x.shape
    lat = -torch.pi / 2 + (torch.arange(nlat, device=x.device, dtype=x.dtype) + 0.5) * torch.pi / nlat
    maps = torch.stack([lat.sin(), lat.cos()])[:, :, None].expand(2, nlat, nlon)
    return maps.unsqueeze(0).expand(n, -1, -1, -1)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(PeriodicConv(cin, cout), nn.GELU(), PeriodicConv(cout, cout), nn.GELU())


class ClimateNet(nn.Module):
    """A two-level U-Net, periodic in longitude, that predicts the change of the state over one step.

    Input channels are ``window`` consecutive records of each state variable (``out_channels`` of them, first),
    then of each forcing, as ``caldera.data.scientific`` stacks them; the output is the state one step after the
    last record: that record + a learned increment. Learning the increment starts the model at persistence, the
    baseline it must beat; two records let it see how fast the flow is changing.

    Given the forcings of k - 1 further steps after the inputs (one channel per forcing and step), the model rolls
    itself out k steps, feeding each prediction back in, and returns the k states stacked (``k * out_channels``
    channels): trained so, on targets k steps ahead (``climate`` source, ``rollout = k``), it learns to keep its
    own errors from growing, which one-step training never sees (as GraphCast and FourCastNet are fine-tuned)."""

    def __init__(self, in_channels: int = 8, out_channels: int = 3, channels: int = 16, window: int = 2,
                 increment_scale: float = 0.05, coords: bool = False) -> None:  # fmt: skip
        super().__init__()
        if window < 1 or in_channels < out_channels * window:
            raise ValueError(
                f"in_channels={in_channels}, out_channels={out_channels}, window={window}: the inputs must start "
                "with `window` records of each predicted variable (inputs = [T, u, v, insolation], targets = "
                "[T, u, v], window = 2 gives in_channels = 8)"
            )
        c = channels
        self.window, self.n_state = window, out_channels
        self.n_forcing = in_channels // window - out_channels
        self.in_channels = in_channels
        self.last = [
            v * window + window - 1 for v in range(out_channels)
        ]  # the newest record of each variable
        # A 6-hour change is a few % of a variable's spread: scaling the head keeps its weights O(1) (as
        # GraphCast normalises increments by their own standard deviation).
        self.increment_scale = increment_scale
        # Convolutions do not know where they are: sin and cos of latitude as two more input channels let the model
        # learn what depends on latitude (the albedo, the equilibrium temperature, the climatology) (CoordConv).
        self.coords = coords
        # One convolution per full-resolution stage: those dominate the cost on a CPU.
        self.enc1 = nn.Sequential(PeriodicConv(in_channels + 2 * coords, c), nn.GELU())
        self.enc2, self.mid = _block(c, 2 * c), _block(2 * c, 2 * c)
        self.up2 = nn.ConvTranspose2d(2 * c, 2 * c, 2, stride=2)
        self.dec2 = _block(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = nn.Sequential(PeriodicConv(2 * c, c), nn.GELU())
        self.out = nn.Conv2d(c, out_channels, 1)
        nn.init.zeros_(self.out.weight)  # start exactly at persistence
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (n, in, lat, lon) to the next state (n, out, lat, lon); with (k - 1) * forcings more input channels,
        roll out k steps and return (n, k * out, lat, lon). lat and lon must be divisible by 4."""
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"grid {tuple(x.shape[-2:])}: ClimateNet needs lat and lon divisible by 4")
        extra = x.shape[1] - self.in_channels
        if extra == 0:
            return self.step(x)
        if self.n_forcing == 0 or extra % self.n_forcing:
            raise ValueError(f"{x.shape[1]} input channels: expected {self.in_channels} plus a multiple of "
                             f"{self.n_forcing} (the forcings of each further step)")  # fmt: skip
        window, future = x[:, : self.in_channels], x[:, self.in_channels :]
        states = [self.step(window)]
        for s in range(extra // self.n_forcing):
            window = self.advance(
                window, states[-1], future[:, s * self.n_forcing : (s + 1) * self.n_forcing]
            )
            states.append(self.step(window))
        return torch.cat(states, dim=1)

    def advance(self, window: torch.Tensor, state: torch.Tensor, forcing: torch.Tensor) -> torch.Tensor:
        """The input window one step later: each variable drops its oldest record and takes the new one."""
        w, newest = self.window, torch.cat([state, forcing], dim=1)
        per_var = window.unflatten(1, (-1, w))  # (n, variables, window, lat, lon)
        return torch.cat([per_var[:, :, 1:], newest.unsqueeze(2)], dim=2).flatten(1, 2)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One step: (n, in, lat, lon) -> the state after the newest input record."""
        e1 = self.enc1(torch.cat([x, latitude_channels(x)], dim=1) if self.coords else x)
        e2 = self.enc2(F.avg_pool2d(e1, 2))
        m = self.mid(F.avg_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return x[:, self.last] + self.increment_scale * self.out(d1)
