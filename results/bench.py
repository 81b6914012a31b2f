"""Training throughput of every model file, and of the same network in a pip-installed peer, side by side.

    python -m results.bench                          # every model file at a fixed small configuration
                                                     # (~3 min, CPU)
    python -m results.bench --only ddpm,flows --repeats 9 --threads 1
    python -m results.bench --gpu-ddpm --device cuda # the paper's CIFAR-10 U-Net: ours against
                                                     # lucidrains' Unet
    python -m results.bench --gpu-ddpm --tiny        # the same at a tiny size, on any device
                                                     # (what the tests run)
    git worktree add /tmp/before HEAD~3 && python -m results.bench --only pixelcnn --against /tmp/before
                                                     # this version against an older one of the same files

Each row builds the model and the optimizer from the model file's own classes, as its `train` does, and times
the training step (forward, backward, optimizer step, and what else the file's step does: SGLD chains, EMA,
gradient clipping) on a synthetic batch of the right shape, so no dataset is read. Three kinds of row time
an evaluation path instead, untrained (the cost does not depend on the weights): ddpm-bound, the variational
bound with 50 stratified t per image, and pixelcnn-sample-*, drawing whole images one sub-pixel at a time.
Where the same network exists in a pip package (requirements-bench.txt), the peer's step is built at matched
sizes and timed in the same run, ours and the peer's alternating `--repeats` times; the table gives the
medians, and ratio = our time per step / the peer's (below 1: ours is faster). A peer that is not installed
gets a one-line note and a "–". With --against DIR the peer column is instead the same row built from DIR's
copy of the model file (an older checkout, say), timed in the same run: how a speed-up is measured without
comparing against old numbers.

--gpu-ddpm measures the configuration of Ho et al. 2020 (arXiv:2006.11239, Appendix B) on CIFAR-10: the 35.7M
U-Net (128 channels, multipliers 1, 2, 2, 2, two residual blocks, attention at 16x16, dropout 0.1), batch 128,
bf16 autocast on cuda, in ddpm.py's training step (Adam, clipping, EMA) with channels-last and NCHW memory,
and lucidrains' Unet at the same widths in the same step; then sampling throughput (network forwards per
reverse step, scaled to 1000 ancestral steps and to 100 DDIM steps). Under 5 minutes on one GPU (`--compile`
adds torch.compile of our network, a few minutes more). On cuda it also counts host synchronizations
in the step.
"""

import argparse
import contextlib
import copy
import importlib.util
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the model files and common.py, wherever this is run from
import common  # noqa: E402

BLOCK_S = 0.25  # seconds of steps per timed block (at least one step); --tiny: one step
WARMUP = 2  # untimed steps first: data-dependent initializations, oneDNN / cuDNN kernel choices


@dataclass
class Side:
    """One side of a row: a training step to time, and what one step processes."""

    name: str  # "ours", or the peer's package and class
    step: Callable[[], None]
    items: int  # examples per step (images or 2D points)


@dataclass
class Row:
    key: str  # what --only matches: the model file's name, then a suffix
    model: str  # the first column
    config: str  # the second
    unit: str  # "img" or "pt"
    ours: Side
    peer: Side | None = None
    note: str = ""  # why there is no peer


# ----------------------------------------------------------------------------------------------------------
# Building blocks: fake datasets (shapes and kinds only), steps, peers
# ----------------------------------------------------------------------------------------------------------
def fake_data(name: str, kind: str, shape: tuple[int, ...], n: int = 1000) -> common.Data:
    """A common.Data with random contents of the right shape and kind, for the files' own builders."""
    if kind == "toy":
        x = common.toy_sample(name, n, torch.Generator().manual_seed(0))
    else:
        x = torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(0)).float() / 255
        x = x.round() if kind == "binary" else x
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(1))
    return common.Data(name, kind, x, y, x[:100], y[:100])


def batch(data: common.Data, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return data.train_x[:n].to(device), data.train_y[:n].to(device)


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor],
               clip: float = 0.0, after: Callable[[], None] | None = None) -> Callable[[], None]:
    """The step every train() runs: zero the gradients, the loss, backward, (clip,) optimizer step, (EMA)."""
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if after is not None:
            after()
    return step


def peer_missing(package: str, error: Exception) -> str:
    return (f"{package} is not installed or does not import "
            f"({type(error).__name__}: {str(error).splitlines()[0][:80]})")


def import_lucidrains_unet():
    """denoising_diffusion_pytorch.Unet. Its package imports torchvision for the Trainer's data pipeline,
    which the Unet never uses; where torchvision is absent or does not load next to this torch (PyPI has no
    CPU build), the import goes through a placeholder module that is removed again right after."""
    try:
        import torchvision  # noqa: F401
        stubbed = []
    except Exception:  # noqa: BLE001 - ImportError, or a torchvision built for another torch (RuntimeError)
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        stub = types.ModuleType("torchvision")
        stub.transforms, stub.utils = (types.ModuleType("torchvision.transforms"),
                                       types.ModuleType("torchvision.utils"))
        stubbed = {"torchvision": stub, "torchvision.transforms": stub.transforms,
                   "torchvision.utils": stub.utils}
        sys.modules.update(stubbed)
    try:
        from denoising_diffusion_pytorch.denoising_diffusion_pytorch import Unet
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)
    return Unet


# ----------------------------------------------------------------------------------------------------------
# The rows: one per model file (more where a file holds several networks), at fixed small configurations
# ----------------------------------------------------------------------------------------------------------
def row_vae(device, b):
    import vae
    data = fake_data("binarized_mnist", "binary", (1, 28, 28))
    model = vae.VAE(data.shape, vae.LIKELIHOOD_OF[data.kind], "mlp", 400, 20, 0.0).to(device)
    opt = common.adam(model.parameters(), lr=1e-3)
    x, _ = batch(data, b, device)
    return Row("vae", "vae.py VAE", f"binarized MNIST, MLP 784-400-20, batch {b}", "img",
               Side("ours", plain_step(model, opt, lambda: model(x, 1.0, 0.0)[0]), b),
               note="peer: the PyTorch example is not a pip package")


def row_iwae(device, b):
    import iwae
    data = fake_data("binarized_mnist", "binary", (1, 28, 28))
    model = iwae.IWAE(data.shape, iwae.LIKELIHOOD_OF[data.kind], 1).to(device)
    opt = common.adam(model.parameters(), lr=1e-3, eps=1e-4)
    x, _ = batch(data, b, device)
    return Row("iwae", "iwae.py IWAE", f"binarized MNIST, 1 stochastic layer, k = 5, batch {b}", "img",
               Side("ours", plain_step(model, opt, lambda: model(x, 5, "iwae", False)[0]), b))


def row_savae(device, b):
    import savae
    data = fake_data("binarized_mnist", "binary", (1, 28, 28))
    model = savae.SAVAE(data.shape, "made", 128, 32).to(device)
    opt = common.adam(model.parameters(), lr=1e-3)
    x, _ = batch(data, b, device)
    return Row("savae", "savae.py SA-VAE",
               f"binarized MNIST, MADE decoder, 128 units, K = 5 SVI steps, batch {b}", "img",
               Side("ours", plain_step(model, opt, lambda: model(x, "savae", 5, 0.03, 0.5, 5.0)[0]), b))


def row_vqvae(device, b):
    import vqvae
    data = fake_data("mnist", "8bit", (1, 28, 28))
    config = dataclasses.asdict(dataclasses.replace(vqvae.Args(), **vqvae.QUICK))
    model = vqvae.build_vqvae(config, data).to(device)
    opt = common.adam(model.parameters(), lr=config["lr"])
    x, _ = batch(data, b, device)
    return Row("vqvae", "vqvae.py VQ-VAE (stage one)",
               f"8-bit MNIST, --quick sizes (hidden 32, K = 64), batch {b}",
               "img", Side("ours", plain_step(model, opt, lambda: model(x)[0]), b))


def row_nvae(device, b):
    import nvae
    a = nvae.Args()
    data = fake_data("binarized_mnist", "binary", (1, 28, 28))
    model = nvae.NVAE(data.shape, nvae.LIKELIHOOD_OF[data.kind], a.channels, a.pre_blocks, a.scales, a.groups,
                      a.z_channels, a.cells, a.expansion,
                      a.mixtures).to(device).to(memory_format=torch.channels_last)  # as its train()
    opt = torch.optim.Adamax(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, eps=1e-3)
    x, _ = batch(data, b, device)
    return Row("nvae", "nvae.py NVAE",
               f"binarized MNIST, defaults (8 channels, 2 scales x 2 groups), batch {b}", "img",
               Side("ours", plain_step(model, opt, lambda: model(x, 1.0, True, a.sr_weight, 1)[0]), b))


def ddpm_pair(device, b, shape, unet_sizes: dict, peer_sizes: dict, amp: bool = False,
              channels_last: bool = False):
    """ddpm.py's training step (L_simple, Adam, clip 1, EMA) around our U-Net and around lucidrains' Unet."""
    import ddpm
    data = fake_data("cifar10" if shape[1] == 32 else "mnist", "8bit", shape)
    x = ddpm.to_model(batch(data, b, device)[0], "8bit")

    def side(name, net):
        model = ddpm.Diffusion(net, "8bit").to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        ema = ddpm.EMA(model, 0.9999)
        opt = common.adam(model.parameters(), lr=2e-4)
        counter = iter(range(10**9))

        def loss():
            with common.autocast(device, amp):
                return model(x)[0]
        return Side(name, plain_step(model, opt, loss, clip=1.0,
                                     after=lambda: ema.update(model, next(counter))), b), \
            model, ema

    ours = side("ours", ddpm.UNet(shape, **unet_sizes))
    try:
        Unet = import_lucidrains_unet()
        # its default (einsum) attention: its flash path would mix dtypes under autocast (float32 memory keys
        # concatenated to bf16 keys, then a flash-only kernel choice)
        peer = side("lucidrains Unet", Unet(channels=shape[0], **peer_sizes))
        note = ""
    except Exception as e:  # noqa: BLE001 - any failure to import or build means: no peer
        peer, note = None, peer_missing("denoising-diffusion-pytorch", e)
    return ours, peer, note


def millions(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"


def row_ddpm(device, b):
    # two residual blocks per level, as the peer has (ours then has 3 up-blocks per level to its 2, as in the
    # paper); the peer's attention single-headed at our widths,
    # full at 14x14 (its linear attention at 28x28 stays)
    ours, peer, note = ddpm_pair(device, b, (1, 28, 28),
                                 dict(channels=32, channel_mult=(1, 2), num_res_blocks=2, attn_res=(14,)),
                                 dict(dim=32, dim_mults=(1, 2), dropout=0.1, attn_heads=1,
                                      attn_dim_head=(32, 64)))
    row = Row("ddpm", "ddpm.py DDPM U-Net",
              f"8-bit MNIST, 32 ch, x1 x2, 2 blocks, attention at 14, batch {b}; "
              f"ours {millions(ours[1])}" + (f", the peer's {millions(peer[1])}" if peer else ""), "img",
              ours[0], peer and peer[0], note)
    return row


def row_ddpm_bound(num_t: int):
    def build(device, b):
        """Not a training step: the evaluation's bound (num_t stratified t per image, 0: all T - 1 of them) of
        the --quick U-Net, untrained."""
        import ddpm
        a = dataclasses.replace(ddpm.Args(), **ddpm.QUICK)
        data = fake_data("mnist", "8bit", (1, 28, 28))
        model = ddpm.build_model(data, a).to(device).eval()
        x = ddpm.to_model(batch(data, b, device)[0], "8bit")
        what = f"{num_t} stratified t" if num_t else f"exact, all {a.timesteps - 1} t"
        return Row("ddpm-bound" + ("" if num_t else "-exact"), "ddpm.py variational bound",
                   f"8-bit MNIST, --quick U-Net, {what} per image (evaluation, no gradient), "
                   f"{b} image{'s' * (b > 1)}", "img",
                   Side("ours", lambda: ddpm.nll_bound(model, x, num_t), b), note="peer: none has this bound")
    return build


def row_ebm_jem(device, b):
    import ebm_jem
    a = dataclasses.replace(ebm_jem.Args(), **ebm_jem.QUICK)
    data = fake_data("mnist", "8bit", (1, 28, 28))
    lo, hi = ebm_jem.box(a, data.kind)
    model = ebm_jem.EnergyModel(data.shape, a.model, a.arch, a.hidden, a.spectral_norm).to(device)
    buffer = ebm_jem.ReplayBuffer(a.buffer_size, data.shape, lo, hi).to(device)
    opt = common.adam(model.parameters(), lr=a.lr)
    x, y = batch(data, b, device)
    x = ebm_jem.to_model(x, data.kind)

    def loss():  # the JEM step: chains from the buffer, SGLD, back into the buffer, the contrastive loss
        x_init, index = buffer.sample(b, a.reinit)
        model.eval()
        x_sample = ebm_jem.sgld(model.energy, x_init, a.sgld_steps, a.sgld_step, a.sgld_noise, lo, hi)
        model.train()
        buffer.push(x_sample, index)
        return model(x + a.data_noise * torch.randn_like(x), y, x_sample, a.energy_reg)[0]
    return Row("ebm_jem", "ebm_jem.py JEM", f"8-bit MNIST, conv net, {a.sgld_steps} SGLD steps, batch {b}",
               "img", Side("ours", plain_step(model, opt, loss), b))


def row_ncsn_sde(device, b):
    import ncsn_sde
    a = dataclasses.replace(ncsn_sde.Args(), **ncsn_sde.QUICK, dataset="mnist")
    data = fake_data("mnist", "8bit", (1, 28, 28))
    model = ncsn_sde.build_model(data, a).to(device)
    ema = ncsn_sde.EMA(model, a.ema_decay)
    opt = common.adam(model.parameters(), lr=a.lr)
    x = ncsn_sde.to_model(batch(data, b, device)[0], data.kind, ncsn_sde.centered(a.method, a.sde))
    counter = iter(range(10**9))
    return Row("ncsn_sde", "ncsn_sde.py score SDE (VP)",
               f"8-bit MNIST, --quick U-Net (16 ch, x1 x2), DSM, batch {b}",
               "img", Side("ours", plain_step(model, opt, lambda: model(x)[0], clip=a.grad_clip,
                                              after=lambda: ema.update(model, next(counter))), b))


def row_pixelcnn(arch):
    def build(device, b):
        import pixelcnn
        data = fake_data("binarized_mnist", "binary", (1, 28, 28))
        sizes = pixelcnn.paper_config(arch, data.name)
        model = pixelcnn.PixelModel(pixelcnn.ARCHS[arch], 1, 2, **sizes).to(device)
        opt = common.adam(model.parameters(), lr=1e-3)
        x, _ = batch(data, b, device)
        return Row(f"pixelcnn-{arch}", f"pixelcnn.py {arch}",
                   f"binarized MNIST, paper size ({sizes['layers']} layers, h = {sizes['hidden']}), "
                   f"batch {b}", "img",
                   Side("ours", plain_step(model, opt, lambda: pixelcnn.loss(model(x).float(), x)[0]), b))
    return build


def row_pixelcnn_sample(arch):
    def build(device, b):
        """Not a training step: drawing b whole images (H W C sub-pixels in turn) from the
        untrained network."""
        import pixelcnn
        sizes = pixelcnn.paper_config(arch, "binarized_mnist")
        model = pixelcnn.PixelModel(pixelcnn.ARCHS[arch], 1, 2, **sizes).to(device).eval()
        return Row(f"pixelcnn-sample-{arch}", f"pixelcnn.py {arch} sampling",
                   f"binarized MNIST 28x28, paper size, {b} images at once", "img",
                   Side("ours", lambda: pixelcnn.sample(model, b, (1, 28, 28)), b), note="peer: not timed")
    return build


def row_flows_realnvp(device, b):
    import flows
    data = fake_data("8gaussians", "toy", (2,), n=max(b, 1000))
    x = data.train_x[:b].to(device)
    model = flows.toy_flow("realnvp", 2, 8, 64).to(device)
    opt = common.adam(model.parameters(), lr=1e-3)
    ours = Side("ours", plain_step(model, opt, lambda: -model.log_prob(x).mean()), b)
    try:
        import normflows as nf
        layers = []
        # affine coupling with one 1-64-64-2 MLP (shift and log-scale), then swap the halves
        for _ in range(8):
            layers += [nf.flows.AffineCouplingBlock(nf.nets.MLP([1, 64, 64, 2], init_zeros=True)),
                       nf.flows.Permute(2, mode="swap")]
        peer_model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), layers).to(device)
        peer_opt = common.adam(peer_model.parameters(), lr=1e-3)
        peer, note = Side("normflows",
                          plain_step(peer_model, peer_opt, lambda: peer_model.forward_kld(x)), b), ""
    except Exception as e:  # noqa: BLE001
        peer, note = None, peer_missing("normflows", e)
    return Row("flows-realnvp", "flows.py RealNVP", f"2D toy, 8 affine couplings of 64-64 MLPs, batch {b}",
               "pt", ours, peer, note)


def _maf_ours(device, b):
    import flows
    x = fake_data("8gaussians", "toy", (2,), n=max(b, 1000)).train_x[:b].to(device)
    model = flows.toy_flow("maf", 2, 8, 64).to(device)
    opt = common.adam(model.parameters(), lr=1e-3)
    return x, Side("ours", plain_step(model, opt, lambda: -model.log_prob(x).mean()), b)


def row_flows_maf_zuko(device, b):
    x, ours = _maf_ours(device, b)
    try:
        import zuko
        peer_model = zuko.flows.MAF(features=2, context=0, transforms=8, hidden_features=(64, 64)).to(device)
        peer_opt = common.adam(peer_model.parameters(), lr=1e-3)
        peer, note = Side("zuko MAF",
                          plain_step(peer_model, peer_opt, lambda: -peer_model().log_prob(x).mean()), b), ""
    except Exception as e:  # noqa: BLE001
        peer, note = None, peer_missing("zuko", e)
    return Row("flows-maf-zuko", "flows.py MAF", f"2D toy, 8 MADE layers of 64-64 units, batch {b}", "pt",
               ours, peer, note)


def row_flows_maf_nflows(device, b):
    x, ours = _maf_ours(device, b)
    try:
        import torch.nn.functional as F
        from nflows.distributions.normal import StandardNormal
        from nflows.flows.base import Flow
        from nflows.transforms import (CompositeTransform, MaskedAffineAutoregressiveTransform,
                                       ReversePermutation)
        layers = []
        for _ in range(8):  # MADE 2-64-64-4 (one feed-forward block between the input and output layers)
            layers += [MaskedAffineAutoregressiveTransform(features=2, hidden_features=64, num_blocks=1,
                                                           use_residual_blocks=False, activation=F.relu),
                       ReversePermutation(features=2)]
        peer_model = Flow(CompositeTransform(layers), StandardNormal([2])).to(device)
        peer_opt = common.adam(peer_model.parameters(), lr=1e-3)
        peer, note = Side("nflows MAF",
                          plain_step(peer_model, peer_opt, lambda: -peer_model.log_prob(x).mean()), b), ""
    except Exception as e:  # noqa: BLE001
        peer, note = None, peer_missing("nflows", e)
    return Row("flows-maf-nflows", "flows.py MAF", f"2D toy, 8 MADE layers of 64-64 units, batch {b}", "pt",
               ours, peer, note)


def row_flows_glow(device, b):
    import flows
    levels, depth, width = 2, 4, 32
    data = fake_data("mnist", "8bit", (1, 28, 28))
    x = common.uniform_dequantize(batch(data, b, device)[0])
    model = flows.image_flow("glow", data.shape, levels, depth, width).to(device)
    opt = common.adam(model.parameters(), lr=1e-3)

    def loss():
        z, log_det = model(x)
        return -(flows.log_normal(z) + log_det).mean()
    ours = Side("ours", plain_step(model, opt, loss), b)
    try:
        import normflows as nf
        q0, blocks, merges = [], [], []
        for i in range(levels):  # coarsest level first, as normflows' MultiscaleFlow takes them
            channels = data.shape[0] * 2 ** (levels + 1 - i)  # 8 at 7 x 7, 4 at 14 x 14
            blocks.append(
                [nf.flows.GlowBlock(channels, width, split_mode="channel", scale=True) for _ in range(depth)]
                + [nf.flows.Squeeze()])
            side = data.shape[1] // 2 ** (levels - i)
            q0.append(nf.distributions.DiagGaussian((channels if i == 0 else channels // 2, side, side)))
            if i > 0:
                merges.append(nf.flows.Merge())
        peer_model = nf.MultiscaleFlow(q0, blocks, merges,
                                       transform=nf.transforms.Logit(alpha=flows.LOGIT_ALPHA),
                                       class_cond=False).to(device)
        peer_opt = common.adam(peer_model.parameters(), lr=1e-3)
        peer, note = Side("normflows Glow",
                          plain_step(peer_model, peer_opt, lambda: peer_model.forward_kld(x)), b), ""
    except Exception as e:  # noqa: BLE001
        peer, note = None, peer_missing("normflows", e)
    return Row("flows-glow", "flows.py Glow",
               f"dequantized MNIST, {levels} levels x depth {depth}, width {width}, "
               f"batch {b}", "img", ours, peer, note)


def row_ffjord(device, b):
    import ffjord
    a = dataclasses.replace(ffjord.Args(), **ffjord.QUICK)
    x = fake_data("8gaussians", "toy", (2,), n=max(b, 1000)).train_x[:b].to(device)
    model = ffjord.FFJORD((2,), a.hidden, a.nonlinearity, a.blocks, a.alpha, time_length=a.time_length,
                          solver=a.solver, rtol=a.rtol, atol=a.atol, step_size=a.step_size, adjoint=a.adjoint,
                          noise=a.noise).to(device)
    opt = common.adam(model.parameters(), lr=a.lr)
    return Row("ffjord", "ffjord.py FFJORD", f"2D toy, --quick (32-32 net, dopri5 at 1e-3), batch {b}", "pt",
               Side("ours", plain_step(model, opt, lambda: model(x)[0]), b),
               note="peer: the authors' code is not a pip package")


ROWS = {  # key -> (builder, batch size); --tiny divides the batch sizes
    "vae": (row_vae, 128), "iwae": (row_iwae, 20), "savae": (row_savae, 50), "vqvae": (row_vqvae, 64),
    "nvae": (row_nvae, 32), "ddpm": (row_ddpm, 64), "ddpm-bound": (row_ddpm_bound(50), 16),
    "ddpm-bound-exact": (row_ddpm_bound(0), 1), "ebm_jem": (row_ebm_jem, 32), "ncsn_sde": (row_ncsn_sde, 128),
    "pixelcnn-pixelcnn": (row_pixelcnn("pixelcnn"), 32), "pixelcnn-rowlstm": (row_pixelcnn("rowlstm"), 32),
    "pixelcnn-diagbilstm": (row_pixelcnn("diagbilstm"), 32), "pixelcnn-sample-pixelcnn": (row_pixelcnn_sample(
        "pixelcnn"), 16), "pixelcnn-sample-rowlstm": (row_pixelcnn_sample("rowlstm"), 16),
    "pixelcnn-sample-diagbilstm": (row_pixelcnn_sample("diagbilstm"), 16),
    "flows-realnvp": (row_flows_realnvp, 512),
    "flows-maf-zuko": (row_flows_maf_zuko, 512), "flows-maf-nflows": (row_flows_maf_nflows, 512),
    "flows-glow": (row_flows_glow, 64), "ffjord": (row_ffjord, 200),
}


# ----------------------------------------------------------------------------------------------------------
# Timing: ours and the peer alternate, medians of seconds per step
# ----------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block_size(side: Side, device: torch.device, tiny: bool) -> int:
    """Warm up, then the number of steps that fill BLOCK_S seconds."""
    for _ in range(WARMUP):
        side.step()
    sync(device)
    t0 = time.perf_counter()
    side.step()
    sync(device)
    return 1 if tiny else max(1, round(BLOCK_S / max(time.perf_counter() - t0, 1e-6)))


def time_block(side: Side, steps: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        side.step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def measure(sides: list[Side], repeats: int, device: torch.device, tiny: bool) -> list[float]:
    """Median seconds per step of each side, the sides timed in turn `repeats` times (same load for all)."""
    sizes = [block_size(s, device, tiny) for s in sides]
    times = [[] for _ in sides]
    for _ in range(repeats):
        for i, s in enumerate(sides):
            times[i].append(time_block(s, sizes[i], device))
    return [statistics.median(t) for t in times]


def rate(items: int, seconds: float, unit: str) -> str:
    per_s = items / seconds
    return f"{per_s:,.0f} {unit}/s" if per_s >= 100 else f"{per_s:.3g} {unit}/s"


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------
def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def header(device: torch.device, args) -> list[str]:
    first = (f"hardware: {hardware(device)}; device: {device}; threads: {torch.get_num_threads()}; "
             f"torch {torch.__version__}; python {platform.python_version()}; repeats: {args.repeats}"
             f"{'; --tiny' if args.tiny else ''}")
    return [first, f"load average (1, 5, 15 min) before: {load()}"]


def table(rows: list[list[str]]) -> list[str]:
    lines = ["| model | config | ours | peer | ratio (ours / peer time) |", "| --- | --- | --- | --- | --- |"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


@contextlib.contextmanager
def model_file_from(folder: Path, name: str):
    """While inside, `import name` gives folder/name.py (it still imports this checkout's common.py)."""
    path = folder / f"{name}.py"
    if not path.is_file():
        refuse(f"--against {folder}: no {name}.py there")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get(name)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved


def against_side(args, key: str, build, device: torch.device, b: int) -> Side:
    """The row's `ours` side built from the --against folder's copy of the model file."""
    torch.manual_seed(0)
    with model_file_from(args.against, key.split("-")[0]):
        side = build(device, b).ours
    side.name = f"{args.against.name}/{key.split('-')[0]}.py"
    return side


def peak_memory(args, key: str, side: str) -> str:
    """Peak memory of one step of a row's side, measured in a fresh process (`--peak-of`): on a CPU the
    process's high-water resident set (imports and the built model included, the same for both sides), on cuda
    the largest allocation by torch."""
    command = [sys.executable, "-m", "results.bench", "--peak-of", f"{key}:{side}", "--device", args.device,
               "--threads", str(args.threads)] + (["--against", str(args.against)] if args.against else []) \
        + (["--tiny"] if args.tiny else [])
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    lines = result.stdout.strip().splitlines()
    return lines[-1] if result.returncode == 0 and lines else "n/a"


def print_peak(args, device: torch.device) -> None:
    """The child of `peak_memory`: build one side of one row, run one step, print its peak memory."""
    key, side = args.peak_of.rsplit(":", 1)
    build, b = ROWS[key]
    b = max(2, b // 16) if args.tiny else b
    torch.manual_seed(0)
    if side == "peer" and args.against:
        step = against_side(args, key, build, device, b).step
    else:
        row = build(device, b)
        step = (row.peer if side == "peer" else row.ours).step
    step()
    sync(device)
    if device.type == "cuda":
        print(f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB (cuda, allocated)")
    else:
        print(f"{peak_rss_mib():,.0f} MiB (peak RSS)")


def peak_rss_mib() -> float:
    """The process's high-water resident set: VmHWM on Linux (reset by exec, unlike ru_maxrss, which a child
    inherits from the parent that forked it), else ru_maxrss."""
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines()
                    if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin"
                                                                     else 1024)


def run_table(args, device: torch.device) -> list[str]:
    keys = [k for k in ROWS if not args.only or any(k == o or k.startswith(o + "-") for o in args.only)]
    if not keys:
        refuse(f"--only {','.join(args.only)} matches no row; rows: {', '.join(ROWS)}")
    out, notes, after = [], [], []
    for key in keys:
        build, b = ROWS[key]
        torch.manual_seed(0)
        b = max(2, b // 16) if args.tiny else b
        row = build(device, b)
        if args.against:
            row.peer, row.note = against_side(args, key, build, device, b), ""
        sides = [row.ours] + ([row.peer] if row.peer else [])
        seconds = measure(sides, args.repeats, device, args.tiny)
        peer = f"{row.peer.name}: {rate(row.peer.items, seconds[1], row.unit)}" if row.peer else "–"
        ratio = f"{seconds[0] / seconds[1]:.2f}" if row.peer else "–"
        out.append([row.model, row.config, rate(row.ours.items, seconds[0], row.unit), peer, ratio])
        if row.note and not row.note.startswith("peer:"):  # a peer that exists but is not installed here
            notes.append(f"note: {key}: {row.note}; skipped its peer (see requirements-bench.txt)")
        print(f"  {key}: {out[-1][2]}" + (f", {peer}, ratio {ratio}" if row.peer else ""),
              file=sys.stderr, flush=True)
        if args.memory:
            memory = f"peak memory of one step, {key}: ours {peak_memory(args, key, 'ours')}"
            if row.peer:
                memory += f", {row.peer.name} {peak_memory(args, key, 'peer')}"
            after.append(memory + " (each in a fresh process)")
    return notes + table(out) + after


def run_gpu_ddpm(args, device: torch.device) -> list[str]:
    """The paper's CIFAR-10 U-Net training step and sampling, ours (NHWC and NCHW) against
    lucidrains' Unet."""
    import ddpm
    amp = device.type == "cuda"
    if args.tiny:  # seconds on a CPU: the same code at a toy size
        shape, b, n_sample = (3, 16, 16), 4, 4
        unet = dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_res=(8,), dropout=0.1)
        peer_sizes = dict(dim=32, dim_mults=(1, 2), dropout=0.1, full_attn=(False, True), attn_heads=1,
                          attn_dim_head=(32, 64))
        config = f"tiny: {shape[1]}x{shape[2]}, 32 ch, x1 x2, 1 block, attention at 8, batch {b}"
    else:  # Ho et al. 2020, Appendix B: CIFAR-10, 35.7M parameters, batch 128
        shape, b, n_sample = (3, 32, 32), 128, 256
        unet = dict(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,), dropout=0.1)
        peer_sizes = dict(dim=128, dim_mults=(1, 2, 2, 2), dropout=0.1, full_attn=(False, True, False, True),
                          attn_heads=1, attn_dim_head=(128, 256, 256, 256))  # one head of our widths
        config = "CIFAR-10 32x32, 128 ch, x1 x2 x2 x2, 2 blocks, attention at 16, dropout 0.1, batch 128"
    config += ", bf16 autocast" if amp else ", float32"
    layouts = [("NHWC", True), ("NCHW", False)]
    rows, notes = [], []
    for layout, channels_last in layouts:
        torch.manual_seed(0)
        ours, peer, note = ddpm_pair(device, b, shape, unet, peer_sizes, amp=amp, channels_last=channels_last)
        sides = [ours[0]] + ([peer[0]] if peer else [])
        if args.compile and layout == "NHWC":
            compiled = copy.deepcopy(ours[1])
            compiled.net.compile()
            opt = common.adam(compiled.parameters(), lr=2e-4)
            x = ddpm.to_model(batch(fake_data("cifar10", "8bit", shape), b, device)[0], "8bit")

            def loss(m=compiled, x=x):
                with common.autocast(device, amp):
                    return m(x)[0]
            sides.append(Side("ours, compiled", plain_step(compiled, opt, loss, clip=1.0), b))
        seconds = measure(sides, args.repeats, device, args.tiny)
        peer_text, ratio = "–", "–"
        if peer:
            peer_text = f"lucidrains Unet: {rate(b, seconds[1], 'img')} ({millions(peer[1])})"
            ratio = f"{seconds[0] / seconds[1]:.2f}"
        elif note:
            notes.append(f"note: {note}; skipped the peer (see requirements-bench.txt)")
        ours_text = f"{rate(b, seconds[0], 'img')} ({millions(ours[1])})"
        rows.append([f"ddpm.py U-Net training step, {layout}", config, ours_text, peer_text, ratio])
        if len(sides) > 2:
            rows.append([f"ddpm.py U-Net training step, {layout}, --compile", config,
                         rate(b, seconds[2], "img"), "–", "–"])
        if channels_last == (device.type == "cuda"):  # sampling and host syncs in ddpm.py's default layout
            rows.append(sampling_row(ours[1], ours[2], peer, shape, n_sample, amp, device, args, layout))
            if device.type == "cuda":
                notes.append(
                    f"host synchronizations per training step ({layout}): {count_syncs(ours[0], device)}")
    return notes + table(rows)


def sampling_row(model, ema, peer, shape, n, amp, device, args, layout) -> list[str]:
    """Samples/s of the reverse process: one network forward per step at n samples, with ddpm.py's DDIM
    sampler, scaled to 1000 ancestral steps (Algorithm 2) and 100 DDIM steps."""
    import ddpm
    steps = 2 if args.tiny else 10
    sides = []
    for name, m in [("ours", ema.model)] + ([("lucidrains Unet", peer[2].model)] if peer else []):
        def step(m=m):
            with torch.no_grad(), common.autocast(device, amp):
                ddpm.sample(m, n, shape, "ddim", steps)
        sides.append(Side(name, step, n))
    seconds = [s / steps for s in measure(sides, args.repeats, device, args.tiny)]  # per reverse step

    def per_s(sec):
        return f"{n / (1000 * sec):.3g} samples/s at 1000 steps, {n / (100 * sec):.3g} at 100 DDIM steps"
    peer_text = f"lucidrains Unet: {per_s(seconds[1])}" if peer else "–"
    ratio = f"{seconds[0] / seconds[1]:.2f}" if peer else "–"
    return [f"ddpm.py sampling, {layout}", f"{n} samples per batch, EMA weights, no grad"
            + (", bf16 autocast" if amp else ""), per_s(seconds[0]), peer_text, ratio]


def count_syncs(side: Side, device: torch.device) -> int:
    """Host synchronizations that torch reports in a few training steps (cuda only; warm-up already done)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                side.step()
        return sum("synchroniz" in str(w.message) for w in caught) // 3
    finally:
        torch.cuda.set_sync_debug_mode("default")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, or auto (common.get_device)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default, one per core or "
                        "$OMP_NUM_THREADS)")
    p.add_argument("--only", type=lambda s: [k for k in s.split(",") if k], default=[],
                   help=f"comma-separated rows or model files (e.g. ddpm,flows); rows: {', '.join(ROWS)}")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed blocks per side, alternating; medians reported")
    p.add_argument("--gpu-ddpm", action="store_true",
                   help="the paper's CIFAR-10 DDPM U-Net step and sampling, ours "
                        "against lucidrains' Unet (meant for --device cuda)")
    p.add_argument("--compile", action="store_true",
                   help="with --gpu-ddpm: also time torch.compile of our network")
    p.add_argument("--against", type=Path, default=None,
                   help="a folder with other copies of the model files (an "
                   "older checkout): its version of each row is timed in the peer column, in the same run")
    p.add_argument("--memory", action="store_true",
                   help="also the peak memory of one step of each side, each in a "
                   "fresh process (peak RSS on a CPU, torch's largest allocation on cuda)")
    p.add_argument("--peak-of", default="", help=argparse.SUPPRESS)  # KEY:ours|peer, the child of --memory
    p.add_argument("--tiny", action="store_true",
                   help="toy sizes and one step per block: a check that runs in "
                        "seconds on a CPU, not a measurement")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 0:
        p.error("--repeats must be >= 1 and --threads >= 0")
    if args.against is not None and not args.against.is_dir():
        p.error(f"--against {args.against}: not a folder")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.get_device(args.device)
    if args.peak_of:
        return print_peak(args, device)
    print("\n".join(header(device, args)), flush=True)
    body = run_gpu_ddpm(args, device) if args.gpu_ddpm else run_table(args, device)
    print("\n".join(body + [f"load average after: {load()}"]), flush=True)


if __name__ == "__main__":
    main()
