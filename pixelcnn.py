"""PixelCNN, Row LSTM and Diagonal BiLSTM: van den Oord, Kalchbrenner & Kavukcuoglu 2016, "Pixel Recurrent
Neural Networks", arXiv:1601.06759.

An image is a sequence of sub-pixels in raster order, R -> G -> B within a pixel, and p(x) is the product of
the conditionals p(x_i | x_<i), each a softmax over the 256 values (2 for binarized MNIST). Three networks
compute all the conditionals in one pass: masked convolutions (PixelCNN), an LSTM down the rows (Row LSTM), an
LSTM along the diagonals in both directions (Diagonal BiLSTM). The test NLL is exact; sampling is sequential.

    python pixelcnn.py --quick                                  # a smoke test of seconds on a CPU
    python pixelcnn.py --arch pixelcnn --epochs 6 --eval-n 1000   # CPU recipe: 17 minutes (binarized MNIST)
    python pixelcnn.py --arch rowlstm --steps 5000 --eval-n 1000   # CPU recipe: 30 minutes
    python pixelcnn.py --arch diagbilstm --steps 2800 --eval-n 1000   # CPU recipe: 30 minutes
    python pixelcnn.py --dataset mnist --arch pixelcnn --epochs 4 --eval-n 1000   # CPU recipe: 30 min, 8-bit
    python pixelcnn.py                                          # PixelCNN, binarized MNIST: 7 layers, h = 16
    python pixelcnn.py --arch diagbilstm                        # the paper's best MNIST model, one epoch
    python pixelcnn.py --arch rowlstm --epochs 2
    python pixelcnn.py --arch wavenet --steps 2500 --eval-n 1000   # CPU recipe: 25 minutes, a causal 1D CNN
    python pixelcnn.py --arch pixelcnn --dataset cifar10        # the paper's CIFAR-10 size: 15 blocks,
                                                                # h = 128
    torchrun --nproc_per_node=2 pixelcnn.py --arch pixelcnn

Architecture (the paper's Table 1): a 7x7 mask-A convolution; `--layers` residual blocks (PixelCNN: 1x1, 3x3
mask B, 1x1) or residual LSTM layers (Row LSTM: input-to-state 3x1 mask B, state-to-state 3x1; Diagonal
BiLSTM: input-to-state 1x1 mask B, state-to-state 2x1 on the skewed map); ReLU and two 1x1 mask-B
convolutions; a softmax per sub-pixel. Units: nats per image for binarized MNIST, bits/dim for 8-bit data.

Deviations from the paper:
- Binarized MNIST is dynamically binarized (a fresh draw per batch, test set drawn once); the paper reports a
  fixed binarization (--dataset static_binarized_mnist trains on the usual one).
- Binary pixels use a 2-way softmax, which equals the paper's sigmoid with logit l_1 - l_0.
- Optimizer (Adam, lr 1e-3, batch 32), the width of the two output convolutions (--out-hidden) and the
  training length are ours; CPU budgets are far shorter than the paper's training.
- Skewed-map positions outside the image hold zero states (a zero boundary, as above the first row); the
  paper leaves the boundary open.
- The state-to-state kernels are applied as matrices on the stacked neighbouring states (the same linear map
  as the paper's k x 1 and 2 x 1 convolutions; a matmul is several times cheaper than a tiny conv1d on a CPU).

A finding the tests pin down: the Diagonal BiLSTM sees the whole context but for one pixel. The 7x7 mask-A
first layer keeps x_(i-1, W-1) out of every feature of row i - 1, and the shifted right-to-left pass reads
only row i - 1, so pixels (i, j) with j < W - 4 never see the last pixel of the row above. The last pixel of
the image does depend on every earlier pixel. PixelCNN has its blind spot to the upper right;
the Row LSTM a triangle.

The one-dimensional view (--arch wavenet, the lecture's "x_<k as a one-dimensional vector"; WaveNet, van den
Oord et al. 2016, arXiv:1609.03499): the sub-pixels in the same order form one sequence, and a stack of
causal, dilated kernel-2 convolutions with gated residual layers and skip connections computes every
conditional at once, with the same exact NLL. Dilations 1, 2, ..., 512 reach 1025 sub-pixels back, the whole
of a 28 x 28 image; unlike PixelCNN it has no blind spot, but it sees pixels above only through the long
dilations (not in the paper above; sizes ours: 10 layers, 32 channels).

Sampling: the Row LSTM and the Diagonal BiLSTM carry their states pixel by pixel (one pixel of each layer per
sub-pixel, and for the Diagonal BiLSTM one right-to-left sweep per finished row); the PixelCNN has no state
and reruns its network once per sub-pixel on the 4 + layers rows its receptive field spans.

Expected result: README.md's rows pixelcnn-bmnist, rowlstm-bmnist, diagbilstm-bmnist and pixelcnn-mnist have
the measured test NLL (30-minute CPU budgets) next to the paper's 81.30 (PixelCNN), 80.54 (Row LSTM) and 79.20
(Diagonal BiLSTM, 7 layers, h = 16) nats on binarized MNIST. Trained long (row pixelcnn-long-bmnist,
`--arch pixelcnn --epochs 36 --eval-n 1000`, 99 to 115 minutes on one thread) the PixelCNN flattens at about
88 nats (87.96 at the end, between 87.83 and 88.02 over its last eight epochs) at the constant learning rate.
"""

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import common


@dataclass
class Args:
    dataset: str = "binarized_mnist"  # an image dataset (see README)
    arch: Literal["pixelcnn", "rowlstm", "diagbilstm", "wavenet"] = "pixelcnn"  # the paper's three networks,
                                                                             # or a 1D causal dilated CNN
                                                                     # (the fastest)
    layers: int = 0  # residual blocks or LSTM layers (0: the paper's: 7; CIFAR-10 15 PixelCNN, 12 LSTM); >= 0
    hidden: int = 0  # h: LSTM state size; the layers carry 2h features (0: the paper's, 16 MNIST,
                     # 128 CIFAR-10); >= 0
    out_hidden: int = 0  # units of the two 1x1 output convolutions (0: 32, or 1024 for CIFAR-10; ours); >= 0
    epochs: int = 1  # passes over the training set; >= 1
    steps: int = 0  # stop after this many optimizer steps instead (0: epochs x steps per epoch); >= 0
    batch_size: int = 32  # minibatch per process; >= 1
    lr: float = 1e-3  # Adam learning rate; > 0
    samples: int = 16  # images drawn for samples.png at each evaluation; >= 1
    eval_n: int = 0  # test examples to evaluate (0: all); >= 0
    eval_every: int = 0  # steps between test evaluations (0: once per epoch); >= 0
    log_every: int = 100  # steps between log lines; >= 1
    ckpt_every: int = 1000  # steps between checkpoints; >= 1
    seed: int = 0  # random seed; >= 0
    device: str = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default, one per core or $OMP_NUM_THREADS); >= 0
    amp: bool = False  # bf16 autocast on cuda
    data_dir: str = ""  # dataset cache (default: $DATA_DIR or ./data)
    out: str = ""  # run folder (default: runs/pixelcnn-<arch>-<dataset>)
    resume: bool = False  # continue the run in --out from its checkpoint
    overwrite: bool = False  # start again in an --out that already holds a run
    quick: bool = False  # a few seconds on a CPU: 2 small layers, 40 steps, 200 test images, 4 samples


QUICK = dict(layers=2, hidden=8, out_hidden=16, steps=40, eval_n=200, samples=4, eval_every=0, log_every=20,
             ckpt_every=40)


def paper_config(arch: str, dataset: str) -> dict:
    """Sizes of the paper's models: MNIST 7 layers with h = 16 (Table 6); CIFAR-10 12 LSTM layers or 15
    PixelCNN blocks with h = 128 (Sec. 5). The other 28 x 28 sets (8-bit MNIST, Fashion-MNIST) take the
    MNIST sizes."""
    if arch == "wavenet":  # ours: dilations 1 .. 512 reach 1025 sub-pixels back, all of a 28 x 28 image
        return dict(layers=10 if dataset != "cifar10" else 24, hidden=16 if dataset != "cifar10" else 64,
                    out_hidden=32 if dataset != "cifar10" else 256)
    if dataset == "cifar10":
        return dict(layers=15 if arch == "pixelcnn" else 12, hidden=128, out_hidden=1024)
    return dict(layers=7, hidden=16, out_hidden=32)


# ----------------------------------------------------------------------------------------------------------
# Masks: spatial causality and the R -> G -> B order within a pixel
# ----------------------------------------------------------------------------------------------------------
def channel_groups(n: int, colors: int) -> torch.Tensor:
    """Split n feature maps into `colors` contiguous groups (R, G, B): the colour each feature may
    know up to."""
    return torch.arange(n) * colors // n


def causal_mask(out_groups: torch.Tensor, in_groups: torch.Tensor, kernel: tuple[int, int], kind: str):
    """(out, in, kh, kw) 0/1 mask. Sec. 3.4: a position sees the rows above and the pixels to its left; at the
    centre, mask A connects colour group g only to groups < g (the first layer, x_i itself is unseen) and
    mask B to groups <= g (later layers, whose features at i already exclude x_i's own and later channels)."""
    kh, kw = kernel
    mask = torch.zeros(len(out_groups), len(in_groups), kh, kw)
    mask[:, :, : kh // 2] = 1  # rows above the centre
    mask[:, :, kh // 2, : kw // 2] = 1  # left of the centre, same row
    earlier = (in_groups[None, :] < out_groups[:, None] if kind == "A"
               else in_groups[None, :] <= out_groups[:, None])
    mask[:, :, kh // 2, kw // 2] = earlier.float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """A 'same' convolution whose weights are multiplied by a causal mask, so masked weights get exactly zero
    influence (and gradient)."""

    def __init__(self, n_in: int, n_out: int, kernel: tuple[int, int], kind: str, colors: int,
                 out_groups: torch.Tensor | None = None):
        super().__init__(n_in, n_out, kernel, padding=(kernel[0] // 2, kernel[1] // 2))
        in_groups = channel_groups(n_in, colors)
        out_groups = channel_groups(n_out, colors) if out_groups is None else out_groups
        self.register_buffer("mask", causal_mask(out_groups, in_groups, kernel, kind))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def pointwise(conv: MaskedConv2d, u: torch.Tensor) -> torch.Tensor:
    """A masked 1x1 convolution applied to feature vectors u (..., n_in) at single positions."""
    return F.linear(u, (conv.weight * conv.mask)[:, :, 0, 0], conv.bias)


def lstm_update(gates: torch.Tensor, c: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    # Eq. 3: [o, f, i, g] = [sigma, sigma, sigma, tanh](K^ss * h_{i-1} + K^is * x_i)
    #        c_i = f . c_{i-1} + i . g,   h_i = o . tanh(c_i)
    sigmoids, g = gates.split([3 * c.shape[dim], c.shape[dim]], dim=dim)
    o, f, i = sigmoids.sigmoid().chunk(3, dim=dim)  # one sigmoid for the three gates
    c = torch.addcmul(f * c, i, torch.tanh(g))  # f . c + i . g
    return o * torch.tanh(c), c


def gate_groups(hidden: int, colors: int) -> torch.Tensor:
    """Colour groups of the 4h gate features [o, f, i, g]: each gate split like the state it updates, so the
    elementwise LSTM update keeps every colour group apart."""
    return channel_groups(hidden, colors).repeat(4)


# ----------------------------------------------------------------------------------------------------------
# The three kinds of layer; each maps 2h features to 2h features with a residual connection (Sec. 3.3)
# ----------------------------------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """PixelCNN block (Fig. 5, left): ReLU, 1x1 (2h -> h), ReLU, 3x3 mask B, ReLU, 1x1 (h -> 2h), plus
    the input."""

    recurrent = False  # no state: sampling reruns the network on the rows the receptive field spans

    def __init__(self, hidden: int, colors: int):
        super().__init__()
        self.reduce = MaskedConv2d(2 * hidden, hidden, (1, 1), "B", colors)
        self.conv = MaskedConv2d(hidden, hidden, (3, 3), "B", colors)
        self.expand = MaskedConv2d(hidden, 2 * hidden, (1, 1), "B", colors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(F.relu(self.reduce(F.relu(x))))
        return x + self.expand(F.relu(h))


class RowLSTM(nn.Module):
    """Sec. 3.1: an LSTM that runs down the image one row at a time, the whole row at once.

    Input-to-state: a k x 1 convolution along the row (mask B), computed for the whole image up front.
    State-to-state: a k x 1 convolution over the previous row's hidden state (no mask: that row is all past).
    The receptive field is a triangle above the pixel, widening by (k - 1) / 2 columns per row (Fig. 4).
    """

    recurrent = True  # states carried pixel by pixel when sampling (`pixel`), kept in a cache of these names
    cache_names = ("h", "c")

    def __init__(self, hidden: int, colors: int, k: int = 3):
        super().__init__()
        self.hidden, self.k = hidden, k
        self.input_to_state = MaskedConv2d(2 * hidden, 4 * hidden, (1, k), "B", colors,
                                           gate_groups(hidden, colors))
        # K^ss as a matrix on the k neighbouring states stacked: a matmul is far cheaper than conv1d on a CPU
        self.state_to_state = nn.Linear(k * hidden, 4 * hidden)
        self.output = MaskedConv2d(hidden, 2 * hidden, (1, 1), "B", colors)  # residual: h -> 2h (Fig. 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2h, H, W) -> (B, 2h, H, W), fastest when x is stored batch innermost (see `batch_innermost`).

        Rows are laid out channels first with the batch innermost, (4h, W B): a gate is a contiguous block,
        and the k taps of K^ss are views of one zero-padded copy of the row above, stacked for one
        matmul per row."""
        b, _, rows, width = x.shape
        k, pad = self.k, self.k // 2
        # K^is for the whole image in one matmul: taps j - k//2 .. j of the 1 x k kernel (the mask B zeroes
        # those right of j) stacked tap-major, with the biases of K^is and K^ss folded in
        # (4h, 2h, k//2 + 1)
        K_is = (self.input_to_state.weight * self.input_to_state.mask)[:, :, 0, : pad + 1]
        u = F.pad(x.permute(1, 2, 3, 0), (0, 0, pad, 0))  # (2h, H, W + k//2, B), zero left of the row
        taps = torch.cat([u[:, :, t : t + width] for t in range(pad + 1)])  # ((k//2 + 1) 2h, H, W, B)
        bias = (self.input_to_state.bias + self.state_to_state.bias)[:, None]  # (4h, 1)
        x_is = torch.addmm(bias, K_is.transpose(1, 2).flatten(1), taps.flatten(1)).view(-1, rows, width * b)
        h = c = x.new_zeros(self.hidden, width * b)
        states = []
        for i, gates in enumerate(x_is.unbind(1)):  # (4h, W B) for row i
            # Eq. 3 for row i: gates = K^ss * h_{i-1} + K^is * x_i, all columns at once; K^ss reads columns
            # j - k//2 .. j + k//2 of the row above (zero beyond the edges), and nothing above the first row
            if i > 0:
                padded = F.pad(h, (pad * b, pad * b))  # (h, (W + k - 1) B)
                # (k h, W B), tap-major
                taps = torch.cat([padded[:, t * b : (t + width) * b] for t in range(k)])
                gates = torch.addmm(gates, self.state_to_state.weight, taps)  # (4h, W B)
            h, c = lstm_update(gates, c, dim=0)  # (h, W B)
            states.append(h)
        states = torch.stack(states, dim=1).flatten(1)  # (h, H W B)
        out = torch.addmm(self.output.bias[:, None],
                          (self.output.weight * self.output.mask)[:, :, 0, 0], states)
        return x + out.view(-1, rows, width, b).permute(3, 0, 1, 2)  # (2h, H, W, B) -> (B, 2h, H, W)

    def pixel(self, u: torch.Tensor, i: int, j: int, cache: dict) -> torch.Tensor:
        """The layer at one pixel, for sampling: input u (B, 2h) at (i, j) -> output (B, 2h), from the inputs
        to its left and the finished row above held in `cache`; the same numbers as `forward`."""
        cache["u"][:, i, j] = u
        k = self.k
        # (4h, 2h, 1, k); taps right of j are 0
        weight = self.input_to_state.weight * self.input_to_state.mask
        left = cache["u"][:, i, max(0, j - k // 2) : j + 1]  # (B, <= k/2 + 1, 2h): inputs j - k//2 .. j
        taps = weight[:, :, 0, k // 2 - left.shape[1] + 1 : k // 2 + 1]  # (4h, 2h, same count)
        gates = torch.einsum("bts,gst->bg", left, taps) + self.input_to_state.bias
        if i > 0:  # K^ss over the states j - k//2 .. j + k//2 of row i - 1, zero beyond the edges
            above = F.pad(cache["h"][:, i - 1], (0, 0, k // 2, k // 2))[:, j : j + k]  # (B, k, h)
            gates = gates + self.state_to_state(above.flatten(1))
        else:
            gates = gates + self.state_to_state.bias
        c_above = cache["c"][:, i - 1, j] if i > 0 else u.new_zeros(u.shape[0], self.hidden)
        h, cache["c"][:, i, j] = lstm_update(gates, c_above)
        cache["h"][:, i, j] = h
        return u + pointwise(self.output, h)

    def finish_row(self, i: int, cache: dict) -> None:
        """Nothing to do: row i's states were all made pixel by pixel."""


def skew(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W + H - 1): row r moves r positions right, so each diagonal of the image
    becomes a column (Sec. 3.2, Fig. 3). Positions outside the image are zero."""
    b, c, rows, width = x.shape
    index = (torch.arange(rows, device=x.device)[:, None]
             + torch.arange(width, device=x.device)).expand(b, c, -1, -1)
    return x.new_zeros(b, c, rows, width + rows - 1).scatter(3, index, x)


def unskew(x: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of skew: (B, C, H, W + H - 1) -> (B, C, H, W)."""
    b, c, rows, _ = x.shape
    index = (torch.arange(rows, device=x.device)[:, None]
             + torch.arange(width, device=x.device)).expand(b, c, -1, -1)
    return x.gather(3, index)


def diagonal_order(rows: int, width: int, device: torch.device) -> torch.Tensor:
    """(2, H W): the pixels (flat index i W + j) in the order the column scan visits them, left-to-right and
    right-to-left. The skew (Fig. 3) makes diagonal i + j column i + j of the skewed map, with pixel (i, j) in
    its row i; the scan reads column by column, top to bottom, and visits only the positions holding a pixel.
    The right-to-left direction is the same order on the mirrored image, column i + (W - 1 - j)."""
    i, j = torch.meshgrid(torch.arange(rows, device=device), torch.arange(width, device=device),
                          indexing="ij")
    left_to_right = ((i + j) * rows + i).flatten().argsort()  # sorted by (column, row) of the skewed map
    right_to_left = ((i + width - 1 - j) * rows + i).flatten().argsort()
    return torch.stack([left_to_right, right_to_left])


def diagonal_lengths(rows: int, width: int) -> list[int]:
    """Pixels in each of the W + H - 1 columns of the skewed map: column t holds rows max(0, t - W + 1) ..
    min(t, H - 1)."""
    return [min(t, rows - 1) - max(0, t - width + 1) + 1 for t in range(width + rows - 1)]


class DiagonalBiLSTM(nn.Module):
    """Sec. 3.2: two LSTMs along the diagonals, from the top-left and from the top-right.

    Each direction skews its input so that a diagonal is a column, runs column by column with a 2 x 1
    state-to-state convolution (the state above and the state to the left, in image coordinates), and unskews.
    The right-to-left direction is the same computation on the mirrored image; its output is shifted down one
    row before it is added, since at row i it has already read the pixels to the right of x_i. Together the
    two directions see the whole context x_<i at every layer. Both directions run in the same loop, each with
    its own kernel (a batched matmul), which halves the sequential steps.

    The scan visits only the H W positions of the skewed map that hold a pixel (`diagonal_order`), channels
    first with the batch innermost, so column t is a contiguous (2, 4h, n_t B) block; positions outside the
    image would hold zero states (the zero boundary in "Deviations"), so skipping them is exact.
    """

    recurrent = True  # states carried pixel by pixel when sampling (`pixel`), kept in a cache of these names
    cache_names = ("h_lr", "c_lr", "h_rl", "c_rl")

    def __init__(self, hidden: int, colors: int):
        super().__init__()
        self.hidden = hidden
        # input-to-state: 1x1 mask B, both directions in one convolution (8h = 2 directions x 4 gates x h)
        self.input_to_state = MaskedConv2d(2 * hidden, 8 * hidden, (1, 1), "B", colors,
                                           gate_groups(hidden, colors).repeat(2))
        # state-to-state: the 2 x 1 kernel as a (2h -> 4h) matrix per direction, on [state above, state left]
        bound = 1 / math.sqrt(2 * hidden)  # nn.Linear's initialization
        self.state_to_state = nn.Parameter(torch.empty(2, 2 * hidden, 4 * hidden).uniform_(-bound, bound))
        self.state_bias = nn.Parameter(torch.empty(2, 1, 4 * hidden).uniform_(-bound, bound))
        self.output = MaskedConv2d(hidden, 2 * hidden, (1, 1), "B", colors)  # residual: h -> 2h (Fig. 5)

    def scan(self, x_is: torch.Tensor, rows: int, width: int) -> torch.Tensor:
        """Column LSTM on the skewed map, both directions: x_is (2, 4h, H W B) -> states (2, h, H W B), both
        in `diagonal_order`, the batch innermost."""
        b = x_is.shape[2] // (rows * width)
        K_ss = self.state_to_state.transpose(1, 2)  # (2, 4h, 2h): [state above, state left] -> gates
        states = []
        for t, x_col in enumerate(x_is.split([n * b for n in diagonal_lengths(rows, width)], dim=2)):
            if t == 0:  # pixel (0, 0): nothing above or to the left
                h, c = lstm_update(x_col, x_col.new_zeros(2, self.hidden, b), dim=1)
            else:
                # column t - 1 with zero states where it has no neighbour of column t's n pixels: one row
                # above its first while t < W (row 0 has nothing above), one below its last while t < H (the
                # new row has nothing to its left). That makes n + 1 rows: the first n are above column t's
                # pixels (row r - 1), the last n to their left (row r).
                top, bottom = b * (t < width), b * (t < rows)
                above, left = F.pad(h, (top, bottom - b)), F.pad(h, (top - b, bottom))  # (2, h, n B)
                # Eq. 3, K^ss a 2 x 1 kernel: gates = K^is * x + K^ss [h_above; h_left] (biases are in x_is)
                gates = torch.baddbmm(x_col, K_ss, torch.cat([above, left], dim=1))  # (2, 4h, n B)
                h, c = lstm_update(gates, F.pad(c, (top - b, bottom)), dim=1)  # c of the state to the left
            states.append(h)  # (2, h, n B)
        return torch.cat(states, dim=2)

    def pixel(self, u: torch.Tensor, i: int, j: int, cache: dict) -> torch.Tensor:
        """The layer at one pixel, for sampling: input u (B, 2h) at (i, j) -> output (B, 2h). Uses the states
        at (i - 1, j) and (i, j - 1) held in `cache` and stores the new ones; the same numbers as
        `forward`."""
        cache["u"][:, i, j] = u
        gates = pointwise(self.input_to_state, u)[:, : 4 * self.hidden]  # left-to-right part
        zero = u.new_zeros(u.shape[0], self.hidden)
        above = cache["h_lr"][:, i - 1, j] if i > 0 else zero
        left, c_left = (cache["h_lr"][:, i, j - 1], cache["c_lr"][:, i, j - 1]) if j > 0 else (zero, zero)
        gates = gates + torch.cat([above, left], dim=1) @ self.state_to_state[0] + self.state_bias[0]
        h, cache["c_lr"][:, i, j] = lstm_update(gates, c_left)
        cache["h_lr"][:, i, j] = h
        h_rl = cache["h_rl"][:, i - 1, j] if i > 0 else zero  # shifted down: the finished row above
        return u + pointwise(self.output, h + h_rl)

    def finish_row(self, i: int, cache: dict) -> None:
        """Once row i is sampled: its right-to-left states, from (i - 1, j) and (i, j + 1), right to left."""
        gates_row = pointwise(self.input_to_state, cache["u"][:, i])[..., 4 * self.hidden :]  # (B, W, 4h)
        width = gates_row.shape[1]
        zero = gates_row.new_zeros(gates_row.shape[0], self.hidden)
        for j in reversed(range(width)):
            above = cache["h_rl"][:, i - 1, j] if i > 0 else zero
            right, c_right = ((cache["h_rl"][:, i, j + 1], cache["c_rl"][:, i, j + 1]) if j < width - 1
                              else (zero, zero))
            gates = (gates_row[:, j] + torch.cat([above, right], dim=1) @ self.state_to_state[1]
                     + self.state_bias[1])
            cache["h_rl"][:, i, j], cache["c_rl"][:, i, j] = lstm_update(gates, c_right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2h, H, W) -> (B, 2h, H, W), fastest when x is stored batch innermost (see
        `batch_innermost`)."""
        b, _, rows, width = x.shape
        n, hidden = rows * width, self.hidden
        order = diagonal_order(rows, width, x.device)  # (2, H W)
        # the input at every pixel in each direction's scan order: (2, 2h, H W B)
        u = (x.permute(1, 2, 3, 0).flatten(1, 2).index_select(1, order.flatten()).view(-1, 2, n * b)
             .transpose(0, 1))
        # input-to-state: the 1x1 mask-B convolution as a matrix per direction, with the state-to-state bias
        K_is = (self.input_to_state.weight * self.input_to_state.mask).view(2, 4 * hidden, 2 * hidden)
        bias = self.input_to_state.bias.view(2, 4 * hidden, 1) + self.state_bias.transpose(1, 2)  # (2, 4h, 1)
        states = self.scan(torch.baddbmm(bias, K_is, u), rows, width).view(2, hidden, n, b)
        inverse = order.argsort(dim=1)  # scan position of each pixel
        # (h, H W, B) raster order
        h_lr, h_rl = (s.index_select(1, index) for s, index in zip(states, inverse))
        h_rl = F.pad(h_rl[:, : n - width], (0, 0, width, 0))  # right-to-left shifted down: row i gets i - 1
        out = torch.addmm(self.output.bias[:, None], (self.output.weight * self.output.mask)[:, :, 0, 0],
                          (h_lr + h_rl).flatten(1))  # (2h, H W B)
        return x + out.view(-1, rows, width, b).permute(3, 0, 1, 2)  # (2h, H, W, B) -> (B, 2h, H, W)


def batch_innermost(x: torch.Tensor) -> torch.Tensor:
    """The same (B, C, H, W) values stored as (C, H, W, B): the layout in which the LSTM layers lay out their
    rows and columns, (C, pixels x B); a layer given it returns it, since x + output keeps x's layout."""
    return x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


# ----------------------------------------------------------------------------------------------------------
# The model: p(x) = prod_i p(x_i,R | x_<i) p(x_i,G | x_<i, x_i,R) p(x_i,B | x_<i, x_i,R, x_i,G)   (Eq. 1-2)
# ----------------------------------------------------------------------------------------------------------
class PixelModel(nn.Module):
    """7x7 mask A, `layers` residual layers of one kind (`block`: ResidualBlock for PixelCNN, RowLSTM or
    DiagonalBiLSTM for the PixelRNNs), ReLU + 1x1 mask B twice, a softmax per sub-pixel.

    `forward` maps images (B, C, H, W) with values k / (levels - 1) to logits (B, C, levels, H, W); the logits
    at (c, i) depend only on the sub-pixels before (c, i) (tests check the Jacobian is exactly
    zero elsewhere).
    """

    def __init__(self, block: type[nn.Module], colors: int, levels: int, layers: int = 7, hidden: int = 16,
                 out_hidden: int = 32):
        super().__init__()
        self.colors, self.levels, self.recurrent = colors, levels, block.recurrent
        self.first = MaskedConv2d(colors, 2 * hidden, (7, 7), "A", colors)
        self.layers = nn.Sequential(*[block(hidden, colors) for _ in range(layers)])
        logit_groups = torch.arange(colors).repeat_interleave(levels)  # the logits of colour c are in group c
        self.out1 = MaskedConv2d(2 * hidden, out_hidden, (1, 1), "B", colors)
        self.out2 = MaskedConv2d(out_hidden, colors * levels, (1, 1), "B", colors, logit_groups)
        # rows above a pixel that can reach its logits: the 7x7 reaches 3, each 3x3 one more; LSTMs reach all
        self.context_rows = None if self.recurrent else 3 + layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)  # (B, 2h, H, W)
        if self.recurrent:
            h = batch_innermost(h)  # the LSTM layers' layout, which they keep: no transposes between them
        h = self.layers(h)  # (B, 2h, H, W)
        logits = self.out2(F.relu(self.out1(F.relu(h))))  # (B, C * K, H, W)
        return logits.unflatten(1, (self.colors, self.levels))  # (B, C, K, H, W)


# ----------------------------------------------------------------------------------------------------------
# The one-dimensional view: x_<k as a sequence, a causal dilated convolution over the raster order
# ----------------------------------------------------------------------------------------------------------
class CausalConv1dNet(nn.Module):
    """p(x) = prod_k p(x_k | x_<k) over the sub-pixels in raster order (row, column, then R -> G -> B), read
    as one sequence of length H W C, as WaveNet reads audio (van den Oord et al. 2016, arXiv:1609.03499):
    a causal kernel-2 convolution of the input shifted by one, then `layers` gated residual layers with
    dilations 1, 2, 4, ... (cycling after 512), skip connections, ReLU + 1x1 twice, a softmax per sub-pixel.

    Output k sees the inputs k - 2 - sum(dilations) .. k - 1 (`receptive_field` of them), none at or after k.
    The colour of the sub-pixel being predicted enters as a one-hot input (it is a position, not data).
    Same interface as PixelModel: (B, C, H, W) -> logits (B, C, levels, H, W).
    """

    recurrent = False

    def __init__(self, colors: int, levels: int, layers: int = 10, hidden: int = 16, out_hidden: int = 32):
        super().__init__()
        self.colors, self.levels = colors, levels
        self.dilations = [2 ** (i % 10) for i in range(layers)]
        self.receptive_field = 2 + sum(self.dilations)
        self.context_rows = None  # sampling reruns the whole sequence
        c = 2 * hidden
        self.first = nn.Conv1d(1 + colors, c, 2)  # the value at k - 1 (and k - 2), the colour of k
        self.filters = nn.ModuleList(nn.Conv1d(c, c, 2, dilation=d) for d in self.dilations)
        self.gates = nn.ModuleList(nn.Conv1d(c, c, 2, dilation=d) for d in self.dilations)
        self.residuals = nn.ModuleList(nn.Conv1d(c, c, 1) for _ in self.dilations)
        self.skips = nn.ModuleList(nn.Conv1d(c, out_hidden, 1) for _ in self.dilations)
        self.out1 = nn.Conv1d(out_hidden, out_hidden, 1)
        self.out2 = nn.Conv1d(out_hidden, levels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, colors, rows, width = x.shape
        seq = x.permute(0, 2, 3, 1).reshape(b, 1, -1)  # (B, 1, H W C): raster order, colours innermost
        n = seq.shape[-1]
        colour = F.one_hot(torch.arange(n, device=x.device) % colors, colors).T.to(x.dtype)  # (C, n)
        shifted = F.pad(seq, (1, 0))[..., :n]  # position k holds x_(k-1): nothing of x_k or later
        inp = torch.cat([shifted, colour.expand(b, -1, -1)], 1)  # (B, 1 + C, n)
        h = self.first(F.pad(inp, (1, 0)))  # causal kernel 2: taps k - 1 and k of inp
        skip = 0
        for f, g, res, sk, d in zip(self.filters, self.gates, self.residuals, self.skips, self.dilations):
            u = F.pad(h, (d, 0))  # causal: output k reads k - d and k
            # van den Oord et al. 2016 (WaveNet), Eq. 2: z = tanh(W_f * x) . sigmoid(W_g * x)
            z = torch.tanh(f(u)) * torch.sigmoid(g(u))
            h, skip = h + res(z), skip + sk(z)
        logits = self.out2(F.relu(self.out1(F.relu(skip))))  # (B, K, n)
        return logits.view(b, self.levels, rows, width, colors).permute(0, 4, 1, 2, 3)  # (B, C, K, H, W)


def to_levels(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Pixel values k / (levels - 1) in [0, 1] -> integer classes k."""
    return (x * (levels - 1)).round().long()


def nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x) in nats per image, (B,): Eq. 1 summed over every sub-pixel, each a softmax over
    the levels."""
    target = to_levels(x, logits.shape[2])  # (B, C, H, W)
    return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum((1, 2, 3))


def loss(logits: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean exact negative log-likelihood over the batch, nats per image."""
    nll_nats = nll(logits, x).mean()
    return nll_nats, {"loss": nll_nats, "nll": nll_nats}


# ----------------------------------------------------------------------------------------------------------
# Likelihood evaluation: exact, one forward pass per batch
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: PixelModel, x: torch.Tensor, batch_size: int = 500) -> float:
    """Mean -log p(x) over the images x, nats per image."""
    batches = common.progress(x.split(batch_size), f"exact test NLL, {len(x):,} images", len(x))
    total = sum(nll(model(xb), xb).sum().item() for xb in batches)
    return total / len(x)


def report(nll_nats: float, data: common.Data) -> dict[str, float]:
    """nats per image for binary data; bits/dim for 8-bit data (a discrete model: no bin width to add)."""
    if data.kind == "8bit":
        return {"nll_bpd": common.bits_per_dim(nll_nats, data.num_dims)}
    return {"nll_nats": nll_nats}


# ----------------------------------------------------------------------------------------------------------
# Sampling: one sub-pixel at a time, raster order, R -> G -> B
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model: PixelModel, n: int, shape: tuple[int, int, int], progress: Callable = iter) -> torch.Tensor:
    """Draw n images (n, C, H, W) with values k / (levels - 1), vectorized over the n images, in the model's
    dtype and on its device; `progress` wraps the loop over rows (a progress bar, say).

    PixelCNN: row i's logits depend on no later row, so each step runs the network only on the rows
    [i - context_rows, i]: H W C passes over small crops.
    Row LSTM and Diagonal BiLSTM: their states are carried pixel by pixel (`pixel_logits`), so a step costs
    one pixel of each layer (plus, for the Diagonal BiLSTM, one right-to-left sweep per finished row).
    """
    colors, rows, width = shape
    levels = model.levels
    p = next(model.parameters())
    x = torch.zeros(n, colors, rows, width, device=p.device, dtype=p.dtype)
    caches = layer_caches(model, x) if model.recurrent else None
    for i in progress(range(rows)):
        top = 0 if model.context_rows is None else max(0, i - model.context_rows)
        for j in range(width):
            for c in range(colors):
                if caches is None:
                    # (n, K): p(x_i,c | everything before)
                    logits = model(x[:, :, top : i + 1])[:, c, :, -1, j]
                else:
                    logits = pixel_logits(model, x, i, j, caches)[:, c]
                k = torch.multinomial(F.softmax(logits.float(), dim=-1), 1)[:, 0]
                x[:, c, i, j] = k.to(x.dtype) / (levels - 1)
        if caches is not None:
            for layer, cache in zip(model.layers, caches):
                layer.finish_row(i, cache)
    return x


def layer_caches(model: PixelModel, x: torch.Tensor) -> list[dict]:
    """Per LSTM layer: its inputs and states at every pixel, (B, H, W, features), filled in as
    sampling goes."""
    b, _, rows, width = x.shape
    hidden = model.layers[0].hidden
    return [{"u": x.new_zeros(b, rows, width, 2 * hidden),
             **{k: x.new_zeros(b, rows, width, hidden) for k in layer.cache_names}} for layer in model.layers]


def pixel_logits(model: PixelModel, x: torch.Tensor, i: int, j: int, caches: list[dict]) -> torch.Tensor:
    """Logits (B, C, K) at pixel (i, j) of a Row LSTM or Diagonal BiLSTM from the cached states; every earlier
    pixel must have been visited and every earlier row finished (`finish_row`)."""
    u = model.first(x[:, :, max(0, i - 3) : i + 1])[:, :, -1, j]  # the 7x7 reads 3 rows up: (B, 2h)
    for layer, cache in zip(model.layers, caches):
        u = layer.pixel(u, i, j, cache)
    logits = pointwise(model.out2, F.relu(pointwise(model.out1, F.relu(u))))  # (B, C K)
    return logits.unflatten(1, (model.colors, model.levels))


def evaluate_and_draw(run: common.Run, model: PixelModel, data: common.Data, args: Args, step: int) -> dict:
    """Exact test NLL (rank 0), one log line with the sampling time, samples.png."""
    x = data.test_x[: args.eval_n] if args.eval_n else data.test_x
    with common.eval_mode(model, seed=args.seed):
        metrics = report(evaluate(model, x), data)
        if args.samples:
            t0 = time.time()
            bar = common.steps_bar(f"sampling {args.samples} images, row by row")
            images = sample(model, args.samples, data.shape, bar)
            metrics["sample_s"] = round(time.time() - t0, 2)
            common.save_grid(run.path("samples.png"), images, nrow=math.ceil(math.sqrt(args.samples)))
    run.log("test", step, metrics, note=f"exact, {len(x)} images")
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
ARCHS = {"pixelcnn": ResidualBlock, "rowlstm": RowLSTM, "diagbilstm": DiagonalBiLSTM}  # --arch -> block


def build_network(arch: str, colors: int, levels: int, layers: int, hidden: int, out_hidden: int):
    if arch == "wavenet":
        return CausalConv1dNet(colors, levels, layers, hidden, out_hidden)
    return PixelModel(ARCHS[arch], colors, levels, layers, hidden, out_hidden)


def train(args: Args) -> dict:
    if args.dataset in common.TOY_DATASETS:
        raise common.DataError(f"pixelcnn.py models images; '{args.dataset}' is a 2D toy set")
    dist, device = common.setup(args)
    data = common.load_dataset(args.dataset, args.data_dir, device, dist)
    sizes = {k: getattr(args, k) or v for k, v in paper_config(args.arch, args.dataset).items()}
    levels = 2 if data.kind == "binary" else 256
    model = build_network(args.arch, data.shape[0], levels, **sizes).to(device)
    optimizer = common.adam(model.parameters(), lr=args.lr)
    if not args.out:  # the three architectures share this file, not a run folder
        args = dataclasses.replace(args, out=f"runs/pixelcnn-{args.arch}-{args.dataset}")
    run = common.Run(args, "pixelcnn", dist, model, optimizer)
    start = run.restore()
    ddp = common.wrap_ddp(model, dist)
    batches = common.Batches(data.train_x, data.train_y, args.batch_size, args.seed, dist,
                             binarize=data.dynamic_binarization)
    total = args.steps or args.epochs * batches.steps_per_epoch
    eval_every = args.eval_every or batches.steps_per_epoch
    run.print(f"pixelcnn ({args.arch}, {sizes['layers']} layers, h={sizes['hidden']}): "
              f"{sum(p.numel() for p in model.parameters()):,} parameters, {data.name} {data.shape}, "
              f"{total} steps of {args.batch_size} x {dist.world_size}, device {device}")

    for step in run.steps(start, total, args.batch_size * dist.world_size):
        x, _ = batches(step)
        with common.autocast(device, args.amp):
            logits = ddp(x)
        loss_value, metrics = loss(logits.float(), x)
        optimizer.zero_grad(set_to_none=True)
        loss_value.backward()
        optimizer.step()
        run.log_train(step, metrics)
        if (step + 1) % eval_every == 0 and step + 1 < total and dist.is_main:
            evaluate_and_draw(run, model, data, args, step + 1)

    if dist.enabled:
        run.print(
            f"ddp: largest parameter difference between ranks {common.replicas_max_diff(model, dist):.3g}")
    if not dist.is_main:
        return {}
    return evaluate_and_draw(run, model, data, args, total)


if __name__ == "__main__":
    common.cli(train, Args, presets={"quick": QUICK})
