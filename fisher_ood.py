"""
fisher_ood.py: out-of-distribution detection from layer-wise gradient norms of deep generative
models.

Reproduces, with small MLP models trained on procedural 28x28 images, Dauncey, Holmes, Williams &
Falck, "Approximations to the Fisher Information Metric of Deep Generative Models for
Out-Of-Distribution Detection" (arXiv 2403.01485, TMLR 2024; official code
SamD770/Generative-Models-Knowledge), and the failure it starts from, Nalisnick et al. 2019 ("Do
Deep Generative Models Know What They Don't Know?", arXiv 1810.09136): a likelihood model trained
on one image set can give *higher* likelihood to a simpler, unseen set.

The method in one screen:
  1. train a generative model (VAE, DDPM noise predictor, or an affine-coupling flow) on
     in-distribution (ID) images; its per-example loss L(x; theta) is a negative log-likelihood
     or a surrogate of one.
  2. for every parameter tensor l (weights and biases separately) take
     f_l(x) = ||grad_{theta_l} L(x)||^2. These are the diagonal blocks of the Fisher metric
     s^T F^-1 s, up to an unknown scale per layer.
  3. fit one Gaussian per tensor to log f_l on a fit half of the ID test split; the score of a
     new x is sum_l log N(log f_l(x); mu_l, sigma_l). Higher = more in-distribution. Two-sided:
     abnormally small gradients are flagged as well as large ones. No hyperparameters apart from
     the batch size B: with B > 1 the feature is the squared norm of the gradient of the SUMMED
     loss of B examples.
  4. compare by AUROC (ID = positive) with raw likelihood (score = -loss) and the typicality test
     (score = -|loss - mean fit loss|, Nalisnick et al. 2019b, arXiv 1906.02994), at B = 1 and 5.

Every AUROC comes with a 95% interval, and so does the paired difference AUROC(gradient) -
AUROC(typicality) of each (model, OOD set, B) pairing: DeLong's placements, subtracted per example
because both detectors see the same images. Averages over pairings are taken per seed (their shared
images accounted for) and then over seeds (`--seeds=N`, a t-interval). Every verdict is read off an
interval: "better", "worse" or "indistinguishable", never a count of wins by any margin.

The diffusion model's loss (an eps-prediction error, not a likelihood) is scored at ONE timestep
chosen on ID fit images only: among the timesteps where the denoiser beats the best linear predictor
of eps from x_t, the one where the per-example loss is most a function of the image (test-retest
correlation over two noise draws). At the smallest t an MLP denoiser cannot see 1% noise on 8-bit
images, and its loss is nearly a constant function of x.

Per-example gradient norms are the cost. The plain way is one backward pass per example (`loop`).
The fast way here is one batched backward: for a Linear layer y = W a + b and a loss that is a sum
of per-example losses, example i's gradient is delta_i a_i^T (delta_i = dL/dy_i), so
||grad W||^2 = ||a_i||^2 ||delta_i||^2 and ||grad b||^2 = ||delta_i||^2, read off forward/backward
hooks ("ghost norms", Goodfellow 2015). For a group of B examples the same hooks give
||sum_i delta_i a_i^T||^2 = sum_ij (a_i.a_j)(delta_i.delta_j). `torch.func` vmap is the general
fallback. All three agree (tests). All models here are built from Linear layers so the fast path
applies.

Every random draw inside a loss (VAE latent sample, diffusion noise, flow dequantisation) is made
from a seeded generator and passed in, `--draws` of them per example averaged into its scored loss,
so a score is a deterministic function of (model, example, seed) and the three gradient methods see
exactly the same loss.

Default: offline procedural shapes, all four models (VAE with Gaussian and with Bernoulli decoder,
diffusion, flow), one seed, under 2 minutes of CPU time. `--data=fashionmnist|mnist` downloads the
classic pair (checked against pinned digests). `--gpu` selects wider models, more data and steps.
`--bench` times the per-example norms (fast / one plain backward / vmap / loop) at batch 128.
"""
import dataclasses, functools, gzip, hashlib, math, sys, time, zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from train import (cli, TrainConfig, parse_config, setup, fill_auto, count_params, train,
                   save_results, save_figure, download, mean_interval, to_host)
from train import DataError, atomic_save, load_saved


@dataclass
class Config(TrainConfig):
    model: str = "all"  # vae | vae_bce | diffusion | flow, a comma list of them, or all
    data: str = "shapes"  # shapes (offline) | fashionmnist (OOD: mnist) | mnist (OOD: fashionmnist)
    batch_sizes: str = "1,5"  # group sizes B: a feature is one gradient norm of B examples' loss
    n_train: int = 0  # training images (0 = 12000 on CPU, 60000 with --gpu)
    n_test: int = 0  # ID test images, halved into fit and evaluation halves (0 = 2000; 10000 --gpu)
    n_ood: int = 0  # images per OOD set (0 = 1000 on CPU, 5000 with --gpu)
    hidden: int = 0  # width of every MLP (0 = 256 on CPU, 1024 with --gpu)
    latent: int = 16  # VAE latent dimension
    vae_sigma: float = 0.1  # std of the Gaussian VAE decoder (pixels in [0, 1])
    couplings: int = 6  # affine coupling layers in the flow
    diff_T: int = 1000  # diffusion timesteps of the linear beta schedule (1e-4 .. 0.02)
    diff_t: str = "auto"  # scored diffusion timestep in [0, diff_T) (paper: 0), or auto (see docs)
    diff_loss: str = "l1"  # l1 | l2 noise-prediction error (paper: l1)
    pixel_noise: float = 0.1  # std of the Gaussian pixel noise of the ID shapes
    draws: int = 4  # noise draws averaged into each example's scored loss
    seeds: int = 1  # seeds run (--seed, --seed+1, ...); one seed: DeLong intervals (test noise)
    chunk: int = 250  # examples per batched backward when scoring (a multiple of every B)
    bench: bool = False  # only time the per-example layer norms (fast, backward, vmap, loop)
    bench_batch: int = 128  # batch size of --bench
    lr: float = 1e-3  # peak learning rate (AdamW)
    max_steps: int = 0  # training steps per model (0 = 1200 on CPU, 20000 with --gpu)
    batch_size: int = 128  # training images per step
    warmup: int = 50  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay (off: small models, plentiful data)
    log_every: int = 50  # steps between progress-bar updates
    # the models are scored once, after training, and train in about a minute each: no checkpoints
    unused = ("eval_every", "ckpt_every", "resume")

    def __post_init__(self):
        super().__post_init__()
        fill_auto(self, n_train=(12000, 60000), n_test=(2000, 10000), n_ood=(1000, 5000),
                  hidden=(256, 1024), max_steps=(1200, 20000))  # (CPU toy, GPU scale)
        bad = set(self.model_list) - set(MODELS)
        if bad or not self.model_list:
            raise ValueError(f"--model: unknown {sorted(bad)}; choose from {', '.join(MODELS)} "
                             "or all")
        if self.data not in ("shapes", "fashionmnist", "mnist"):
            raise ValueError(f"--data must be shapes, fashionmnist or mnist, got {self.data!r}")
        sizes_error = ("--batch_sizes must be a comma list of positive integers, got "
                       f"{self.batch_sizes!r}")
        try:
            sizes = self.batch_size_list
        except ValueError:
            raise ValueError(sizes_error) from None
        if not sizes or min(sizes) < 1:
            raise ValueError(sizes_error)
        if self.diff_loss not in ("l1", "l2"):
            raise ValueError(f"--diff_loss must be l1 or l2, got {self.diff_loss!r}")
        given = self.diff_t.isdigit() and int(self.diff_t) < self.diff_T
        if self.diff_T < 1 or not (self.diff_t == "auto" or given):
            raise ValueError(f"--diff_t must be auto or an integer in [0, --diff_T), got "
                             f"{self.diff_t!r} with --diff_T={self.diff_T}")
        if self.n_test < 4 * max(sizes) or self.n_ood < 2 * max(sizes):
            raise ValueError("--n_test must be >= 4 x and --n_ood >= 2 x the largest batch size")
        if min(self.latent, self.hidden, self.couplings, self.chunk) < 1 or self.vae_sigma <= 0:
            raise ValueError("--latent, --hidden, --couplings, --chunk must be >= 1 and "
                             "--vae_sigma > 0")
        if min(self.batch_size, self.bench_batch, self.seeds, self.draws) < 1:
            raise ValueError("--batch_size, --bench_batch, --seeds and --draws must be >= 1")
        if self.seed + self.seeds > 2**32:
            raise ValueError("--seed + --seeds must stay below 2^32")
        if Path(self.data_dir).exists() and not Path(self.data_dir).is_dir():
            raise ValueError(f"--data_dir={self.data_dir} is a file, not a directory")

    @property
    def model_list(self):
        names = [m.strip() for m in self.model.split(",") if m.strip()]
        return list(MODELS) if names == ["all"] else names

    @property
    def batch_size_list(self):
        return sorted({int(b) for b in self.batch_sizes.split(",") if b.strip()})

# -------------------------------------------------------------------------------------------------
# procedural images: 28 x 28 grey levels 0..255 (stored as uint8, used as k / 255 in [0, 1])
#
# ID "shapes" (dSprites-like): one square, ellipse or triangle per image with random position,
# scale, rotation and aspect; the shape is brighter or darker than the background by 0.25-0.4 and
# carries a stripe texture; background brightness ~ U(0.1, 0.6); then Gaussian pixel noise
# (sigma 0.1). The random background and the pixel noise are what make the Nalisnick effect
# appear: a simple image of the same brightness but without noise is *easier* to model than the
# training data itself.
# OOD sets (each generated from its own seed stream):
#   strokes    a different shape family: 1-3 thick line segments, same background and noise model
#   smooth     two broad Gaussian bumps on the background, no pixel noise: simpler than the ID data
#   constant   the background alone, no noise: the simplest image there is
#   noise      uniform noise U(0, 1) in every pixel: far OOD, every model gives it a high loss
#   inverted   1 - x of fresh ID images: same content, flipped brightness
#   less_noisy ID shapes with pixel noise 0.02 instead of 0.1: "the same data, simpler"
#   cross      a near-OOD new shape (a plus sign) from the ID generator: only the outline differs

SIDE = 28
D = SIDE * SIDE
OOD_SETS = ["strokes", "smooth", "constant", "noise", "inverted", "less_noisy", "cross"]


def stream(seed, name):
    """A torch.Generator for one named data stream: stable across runs and Python hash seeds."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))


def grid(n):  # pixel-centre coordinates in [-1, 1], broadcast over n images: two (n, 28, 28)
    axis = torch.linspace(-1, 1, SIDE)
    rows, columns = torch.meshgrid(axis, axis, indexing="ij")
    return columns.expand(n, SIDE, SIDE), rows.expand(n, SIDE, SIDE)


def uniform(generator, n, low, high):  # (n, 1, 1) uniform draws that broadcast over pixels
    return low + (high - low) * torch.rand(n, 1, 1, generator=generator)


def quantise(image):  # (n, 28, 28) float -> (n, 784) uint8 grey levels
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).reshape(len(image), D)


def random_sign(generator, n):  # brighter or darker than the background
    return torch.where(torch.rand(n, 1, 1, generator=generator) < 0.5, -1.0, 1.0)


def shapes(n, generator, kinds=("square", "ellipse", "triangle"), noise=0.1):
    draw = functools.partial(uniform, generator, n)
    xx, yy = grid(n)
    background = draw(0.1, 0.6)
    cx, cy, scale = draw(-0.45, 0.45), draw(-0.45, 0.45), draw(0.3, 0.6)
    angle, aspect = draw(0, 2 * math.pi), draw(0.6, 1.0)
    # shape-frame coordinates: translate, rotate, scale, so every outline is a fixed unit-sized test
    u = ((xx - cx) * angle.cos() + (yy - cy) * angle.sin()) / scale
    v = (-(xx - cx) * angle.sin() + (yy - cy) * angle.cos()) / scale
    root3 = math.sqrt(3)
    outline = {
        "square": (u.abs() <= 1) & ((v / aspect).abs() <= 1),
        "ellipse": u ** 2 + (v / aspect) ** 2 <= 1,
        # equilateral triangle with vertices at radius 1: three half-planes
        "triangle": (v >= -0.5) & (root3 * u + v <= 1) & (-root3 * u + v <= 1),
        "cross": ((u.abs() <= 1) & (v.abs() <= 0.3)) | ((u.abs() <= 0.3) & (v.abs() <= 1)),
    }
    pick = torch.randint(len(kinds), (n, 1, 1), generator=generator)
    mask = torch.zeros(n, SIDE, SIDE, dtype=torch.bool)
    for k, name in enumerate(kinds):
        mask |= (pick == k) & outline[name]
    contrast = random_sign(generator, n) * draw(0.25, 0.4)
    stripes = 0.08 * torch.sin(draw(3, 8) * u + draw(0, 2 * math.pi))  # texture in the shape frame
    pixel_noise = noise * torch.randn(n, SIDE, SIDE, generator=generator)
    return quantise(background + mask * (contrast + stripes) + pixel_noise)


def strokes(n, generator, noise=0.1):
    draw = functools.partial(uniform, generator, n)
    xx, yy = grid(n)
    background = draw(0.1, 0.6)
    ink = torch.zeros(n, SIDE, SIDE, dtype=torch.bool)
    n_strokes = torch.randint(1, 4, (n, 1, 1), generator=generator)
    for k in range(3):
        x0, y0, x1, y1 = (draw(-0.8, 0.8) for _ in range(4))
        width = draw(0.07, 0.14)  # half-width: 1-2 pixels
        dx, dy = x1 - x0, y1 - y0
        # distance from each pixel to the segment: project, clamp to the segment, measure
        t = (((xx - x0) * dx + (yy - y0) * dy) / (dx ** 2 + dy ** 2 + 1e-6)).clamp(0, 1)
        distance = ((xx - x0 - t * dx) ** 2 + (yy - y0 - t * dy) ** 2).sqrt()
        ink |= (distance <= width) & (k < n_strokes)
    contrast = random_sign(generator, n) * draw(0.25, 0.4)
    pixel_noise = noise * torch.randn(n, SIDE, SIDE, generator=generator)
    return quantise(background + ink * contrast + pixel_noise)


def smooth(n, generator):
    draw = functools.partial(uniform, generator, n)
    xx, yy = grid(n)
    image = draw(0.1, 0.6).expand(n, SIDE, SIDE).clone()
    for _ in range(2):
        cx, cy, width = draw(-0.8, 0.8), draw(-0.8, 0.8), draw(0.3, 0.8)
        bump = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width ** 2))
        image += draw(-0.25, 0.25) * bump
    return quantise(image)


def make_set(name, n, seed, noise=0.1):
    """One named image set as (n, 784) uint8; a deterministic function of (name, n, seed, noise)."""
    generator = stream(seed, name)
    if name in ("train", "test"):
        return shapes(n, generator, noise=noise)
    if name == "strokes":
        return strokes(n, generator, noise)
    if name == "smooth":
        return smooth(n, generator)
    if name == "constant":
        return quantise(uniform(generator, n, 0.1, 0.6).expand(n, SIDE, SIDE))
    if name == "noise":
        return quantise(torch.rand(n, SIDE, SIDE, generator=generator))
    if name == "inverted":
        return 255 - shapes(n, generator, noise=noise)
    if name == "less_noisy":
        return shapes(n, generator, noise=0.02)
    if name == "cross":
        return shapes(n, generator, kinds=("cross",), noise=noise)
    raise ValueError(f"unknown image set {name!r}")

# -------------------------------------------------------------------------------------------------
# real data (on request): FashionMNIST <-> MNIST, IDX files with pinned digests (train.DATASETS)
# (SVHN and CIFAR-10 are left out: reading SVHN needs scipy's .mat reader, a new dependency.)

@functools.lru_cache(maxsize=None)  # read once per process: every seed re-uses the same files
def load_idx(name, data_dir):
    return parse_idx(gzip.decompress(download(name, data_dir).read_bytes()))


def parse_idx(raw):
    """IDX image file -> (n, 784) uint8. Header: magic 0x00000803 (uint8, 3 dims), count, rows,
    cols, as big-endian int32s; then the pixels row by row."""
    magic, n, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in range(0, 16, 4))
    if magic != 0x803 or rows * cols != D or len(raw) != 16 + n * D:
        raise DataError(f"not a 28x28 IDX image file (magic {magic:#x}, {n} x {rows} x {cols})")
    return torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).reshape(n, D)


def load_real(cfg):
    """FashionMNIST or MNIST as ID, the other one, constant, noise and inverted images as OOD."""
    other = "mnist" if cfg.data == "fashionmnist" else "fashionmnist"
    train_x = load_idx(f"{cfg.data}-train", cfg.data_dir)
    test_x = load_idx(f"{cfg.data}-test", cfg.data_dir)
    if cfg.n_test > len(test_x) or cfg.n_ood > len(test_x) or cfg.n_train > len(train_x):
        raise DataError(f"--n_train must be <= {len(train_x)}, --n_test and --n_ood <= "
                        f"{len(test_x)} for --data={cfg.data}")
    # a seeded shuffle: the fit and evaluation halves are exchangeable
    test_x = test_x[torch.randperm(len(test_x), generator=stream(cfg.seed, "real"))][:cfg.n_test]
    ood = {other: load_idx(f"{other}-test", cfg.data_dir)[:cfg.n_ood],  # the classic pairing
           "constant": make_set("constant", cfg.n_ood, cfg.seed),
           "noise": make_set("noise", cfg.n_ood, cfg.seed),
           "inverted": 255 - train_x[-cfg.n_ood:]}  # inverted training images: OOD all the same
    half = len(test_x) // 2
    return dict(train=train_x[:cfg.n_train], fit=test_x[:half], eval=test_x[half:], **ood)


def load_data(cfg):
    """{split name: (n, 784) uint8}: 'train', 'fit', 'eval' (the two halves of the ID test split)
    and one entry per OOD set. Procedural sets are cached under <out>/data/ (generating them is
    the slow part)."""
    if cfg.data != "shapes":
        return load_real(cfg)
    key = f"v1-{cfg.seed}-{cfg.n_train}-{cfg.n_test}-{cfg.n_ood}-{cfg.pixel_noise}"
    path = Path(cfg.out) / "data" / f"shapes-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"
    if path.exists():
        try:
            return load_saved(path)
        except DataError as e:  # truncated or garbled: make it again
            print(f"note: {e}; generating it again", file=sys.stderr)
    t0 = time.time()
    test_x = make_set("test", cfg.n_test, cfg.seed, cfg.pixel_noise)
    sets = dict(train=make_set("train", cfg.n_train, cfg.seed, cfg.pixel_noise),
                fit=test_x[:cfg.n_test // 2], eval=test_x[cfg.n_test // 2:],
                **{name: make_set(name, cfg.n_ood, cfg.seed, cfg.pixel_noise)
                   for name in OOD_SETS})
    atomic_save(sets, path)
    print(f"generated {sum(len(v) for v in sets.values()):,} images in {time.time() - t0:.1f}s "
          f"(cached at {path})")
    return sets

# -------------------------------------------------------------------------------------------------
# models: each maps (x, noise) to one loss per example, x (B, 784) in [0, 1], noise drawn outside.
# Every parameter lives in an nn.Linear that is called exactly once per forward, on (B, features)
# inputs: that is what the fast per-example norm path needs.


class VAE(nn.Module):
    """MLP VAE; loss = negative ELBO with one reparameterised latent sample eps (nats per image).
    decoder='gauss': N(x; x_hat, sigma^2) per pixel; 'bce': Bernoulli likelihood of the grey
    level."""

    def __init__(self, hidden, latent, decoder="gauss", sigma=0.1):
        super().__init__()
        self.decoder, self.sigma, self.noise_dim = decoder, sigma, latent
        self.enc1, self.enc2 = nn.Linear(D, hidden), nn.Linear(hidden, hidden)
        self.enc_out = nn.Linear(hidden, 2 * latent)
        self.dec1, self.dec2 = nn.Linear(latent, hidden), nn.Linear(hidden, hidden)
        self.dec_out = nn.Linear(hidden, D)

    def draw_noise(self, n, generator=None):
        return torch.randn(n, self.noise_dim, generator=generator)

    def forward(self, x, eps):  # (B, D), (B, latent) -> (B,)
        hidden = F.relu(self.enc2(F.relu(self.enc1(x))))
        mu, logvar = self.enc_out(hidden).chunk(2, -1)  # (B, latent) each
        z = mu + (0.5 * logvar).exp() * eps
        out = self.dec_out(F.relu(self.dec2(F.relu(self.dec1(z)))))  # (B, D) mean or logits
        if self.decoder == "gauss":
            normaliser = D * math.log(self.sigma * math.sqrt(2 * math.pi))
            reconstruction = 0.5 * ((x - out) / self.sigma).pow(2).sum(1) + normaliser
        else:  # grey levels used as soft Bernoulli targets, the classic MNIST-VAE choice
            reconstruction = F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)  # KL(q(z|x) || N(0, I))
        return reconstruction + kl


class Denoiser(nn.Module):
    """DDPM noise predictor eps_theta(x_t, t), an MLP with a sinusoidal time embedding
    concatenated to the input. Loss = mean over pixels of |eps_theta - eps| (or squared) at
    timestep t: training draws t uniformly, scoring uses one fixed t_score (see pick_timestep).
    Not a likelihood."""

    def __init__(self, hidden, T=1000, loss="l1", t_score=0, emb=32):
        super().__init__()
        self.loss, self.t_score, self.emb, self.noise_dim = loss, t_score, emb, D
        betas = torch.linspace(1e-4, 0.02, T)
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, 0))  # (T,)
        self.fc1, self.fc2 = nn.Linear(D + emb, hidden), nn.Linear(hidden, hidden)
        self.fc3, self.out = nn.Linear(hidden, hidden), nn.Linear(hidden, D)
        # a hidden layer narrower than 784 pixels cannot pass the noise through, so the prediction
        # also gets a skip path: a learned, timestep-dependent multiple of x_t itself
        self.gate = nn.Linear(emb, 1)

    def draw_noise(self, n, generator=None):
        return torch.randn(n, D, generator=generator)

    def time_embedding(self, t):  # (B,) -> (B, emb): sines and cosines at geometric frequencies
        half = self.emb // 2
        frequencies = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        angle = t.float()[:, None] * frequencies
        return torch.cat([angle.sin(), angle.cos()], -1)

    def noised(self, x, eps, t):  # (B, D) images in [0, 1] -> (B, D) x_t, images scaled to [-1, 1]
        alpha_bar = self.alpha_bar[t][:, None]  # (B, 1)
        return alpha_bar.sqrt() * (2 * x - 1) + (1 - alpha_bar).sqrt() * eps

    def forward(self, x, eps, t=None):  # (B, D), (B, D), optional (B,) timesteps -> (B,)
        if t is None:
            t = torch.full((len(x),), self.t_score, device=x.device, dtype=torch.long)
        xt = self.noised(x, eps, t)
        embedding = self.time_embedding(t)  # (B, emb)
        hidden = F.silu(self.fc1(torch.cat([xt, embedding], -1)))
        hidden = F.silu(self.fc3(F.silu(self.fc2(hidden))))
        error = self.out(hidden) + self.gate(embedding) * xt - eps  # (B, D)
        return error.abs().mean(1) if self.loss == "l1" else error.pow(2).mean(1)


class Coupling(nn.Module):
    """RealNVP affine coupling on a fixed random split of the pixels: the half `a` passes unchanged
    and predicts a log-scale s and shift t for the other half: y_b = x_b * exp(s) + t,
    log|det| = sum s. The output is [x_a, y_b]: a fixed permutation, so the next coupling simply
    uses its own split."""

    def __init__(self, hidden, seed):
        super().__init__()
        perm = torch.randperm(D, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("idx_a", perm[:D // 2])
        self.register_buffer("idx_b", perm[D // 2:])
        self.fc1, self.fc2 = nn.Linear(D // 2, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, D)
        nn.init.normal_(self.out.weight, 0, 1e-3)  # start near the identity map (not exactly:
        nn.init.zeros_(self.out.bias)  # zero weights would give the hidden layers zero gradient)

    def forward(self, y):  # (B, D) -> (B, D), (B,)
        ya, yb = y[:, self.idx_a], y[:, self.idx_b]
        s, t = self.out(F.relu(self.fc2(F.relu(self.fc1(ya))))).chunk(2, -1)  # (B, D/2) each
        s = torch.tanh(s)  # bounded log-scale: keeps the first steps stable
        return torch.cat([ya, yb * s.exp() + t], -1), s.sum(1)


class Flow(nn.Module):
    """Exact NLL in bits per dimension of the 256-level image under uniform dequantisation:
    x~ = (k + u) / 256, u ~ U(0, 1)^D, bpd = -log2 p(x~) / D + 8 (the 8 bits undo the 1/256 bin
    width)."""

    def __init__(self, hidden, n_couplings, seed=0):
        super().__init__()
        self.noise_dim = D
        self.layers = nn.ModuleList(Coupling(hidden, seed * 1000 + i) for i in range(n_couplings))

    def draw_noise(self, n, generator=None):
        return torch.rand(n, D, generator=generator)

    def forward(self, x, u):  # (B, D) in [0, 1], (B, D) uniform -> (B,) bits/dim
        levels = (x * 255).round()
        y = ((levels + u) / 256 - 0.5) * 4  # centred, about unit scale: log|det| = D log 4
        logdet = torch.full((len(x),), D * math.log(4.0), device=x.device)
        for layer in self.layers:
            y, layer_logdet = layer(y)
            logdet = logdet + layer_logdet
        log_p = -0.5 * (y.pow(2) + math.log(2 * math.pi)).sum(1) + logdet  # of x~ on [0, 1]^D
        return -log_p / (D * math.log(2)) + 8


MODELS = ["vae", "vae_bce", "diffusion", "flow"]


def build(kind, cfg):
    if kind == "vae":
        return VAE(cfg.hidden, cfg.latent, "gauss", cfg.vae_sigma)
    if kind == "vae_bce":
        return VAE(cfg.hidden, cfg.latent, "bce")
    if kind == "diffusion":
        t_score = 0 if cfg.diff_t == "auto" else int(cfg.diff_t)
        return Denoiser(cfg.hidden, cfg.diff_T, cfg.diff_loss, t_score)
    return Flow(cfg.hidden, cfg.couplings, cfg.seed)


def training_loss(kind, cfg, noise_dim):
    """loss_fn(model, x) for train(): x (B, 784) images, or dict(x, noise[, t]) with the noise
    given."""
    def loss_fn(model, x):  # training draws from torch's RNG (train() seeds and checkpoints it)
        given = x if isinstance(x, dict) else {}
        x = given.get("x", x)
        # fresh noise every step while training (a fixed draw per example is only for scoring)
        if "noise" in given:
            noise = given["noise"]
        elif kind == "flow":
            noise = torch.rand_like(x)
        else:
            noise = torch.randn(len(x), noise_dim, device=x.device)
        if kind == "diffusion":  # the usual DDPM objective: all timesteps, uniformly
            t = given.get("t")
            if t is None:
                t = torch.randint(cfg.diff_T, (len(x),), device=x.device)
            return model(x, noise, t).mean(), {}
        return model(x, noise).mean(), {}
    return loss_fn


def fit_model(kind, cfg, ctx, train_x):
    """Train with train.py's loop; batch i = a seeded random draw of training images."""
    # Training is ordinary maximum likelihood (or the DDPM objective) on the ID training split
    # only; nothing about OOD detection enters here. The detector is built afterwards.
    torch.manual_seed(cfg.seed)  # the initial weights: a function of the seed, whatever ran before
    model = build(kind, cfg)
    images = train_x.float() / 255

    def get_batch(step):
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        return images[torch.randint(len(images), (cfg.batch_size,), generator=generator)]

    loss_fn = training_loss(kind, cfg, getattr(model, "noise_dim", 0))
    summary = train(model, get_batch, loss_fn, cfg, ctx, ckpt_path=False, desc=kind, quiet=True)
    # eval mode as the authors score; it changes nothing for these models (no dropout or
    # BatchNorm), but it would matter for BatchNorm, which would also couple examples
    return model.eval(), summary

# -------------------------------------------------------------------------------------------------
# per-example, per-tensor squared gradient norms: fast path (hooks), vmap, loop.
# Each returns {B: (N // B, P) tensor}: row g = squared norms of the gradient of the summed loss of
# examples g*B .. g*B+B-1, one column per parameter tensor in model.named_parameters() order.


def linear_params(model):
    """(module name, Linear) pairs; raises if some parameter lives outside a Linear."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    covered = {id(p) for _, m in linears for p in m.parameters()}
    if any(id(p) not in covered for p in model.parameters()):
        raise NotImplementedError("the fast path handles Linear layers only")
    return linears


def record_linears(model, x, noise, linears):
    """The losses (N,) of one forward, each Linear's input and output kept by forward hooks."""
    inputs, outputs = {}, {}

    def keep(name):
        def hook(module, args, out):
            if name in inputs:
                raise RuntimeError(f"{name} was called twice in one forward: the identity needs "
                                   "one call")
            inputs[name], outputs[name] = args[0].detach(), out
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in linears]
    try:  # the hooks must never outlive this call: a later forward would keep growing the dicts
        losses = model(x, noise)  # (N,)
    finally:
        for handle in handles:
            handle.remove()
    return losses, inputs, outputs


def fast_sq_norms(model, x, noise, groups=(1,)):
    """One batched forward/backward of the summed loss; hooks keep each Linear's input a_i and the
    gradient delta_i at its output; per group of B:
    ||sum_i delta_i a_i^T||^2 = sum_ij (a_i.a_j)(delta_i.delta_j)."""
    linears = linear_params(model)
    losses, inputs, outputs = record_linears(model, x, noise, linears)
    # Gradients with respect to the Linear OUTPUTS, not the weights: the summed loss makes row i
    # of delta depend on example i alone, which is what lets one backward serve every example.
    deltas = torch.autograd.grad(losses.sum(), [outputs[name] for name, _ in linears])
    per_param = {B: {} for B in groups}
    for (name, module), delta in zip(linears, deltas):
        a = inputs[name]  # (N, in)
        assert a.dim() == 2, "the identity is for inputs without a sequence axis"
        for B in groups:
            if B == 1:
                delta_sq = delta.pow(2).sum(1)  # (N,)
                weight, bias = a.pow(2).sum(1) * delta_sq, delta_sq
            else:
                a_groups = a.reshape(-1, B, a.shape[1])  # (G, B, in)
                delta_groups = delta.reshape(-1, B, delta.shape[1])  # (G, B, out)
                # (G,): the Gram-matrix form of the summed gradient's squared norm
                weight = ((a_groups @ a_groups.mT) * (delta_groups @ delta_groups.mT)).sum((1, 2))
                bias = delta_groups.sum(1).pow(2).sum(1)
            per_param[B][f"{name}.weight"] = weight
            if module.bias is not None:
                per_param[B][f"{name}.bias"] = bias
    order = [name for name, _ in model.named_parameters()]
    return {B: torch.stack([per_param[B][n] for n in order], 1) for B in groups}, losses.detach()


def vmap_sq_norms(model, x, noise, groups=(1,), chunk_size=32):
    """torch.func: the gradient of one group's summed loss as a function of the parameters,
    vmapped over groups. Works for any module (no hooks); materialises chunk_size x P gradient
    entries at a time."""
    from torch.func import functional_call, grad, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def group_loss(params, x_group, noise_group):  # (B, D), (B, k) -> scalar
        return functional_call(model, (params, buffers), (x_group, noise_group)).sum()

    out = {}
    for B in groups:
        G = len(x) // B
        grads = vmap(grad(group_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(
            params, x[:G * B].reshape(G, B, -1), noise[:G * B].reshape(G, B, -1))
        out[B] = torch.stack([grads[k].reshape(G, -1).pow(2).sum(1) for k in params], 1)
    return out


def loop_sq_norms(model, x, noise, groups=(1,)):
    """The reference: one backward pass per group of B examples."""
    params = [p for _, p in model.named_parameters()]
    out = {}
    for B in groups:
        rows = []
        for g in range(len(x) // B):
            loss = model(x[g * B:(g + 1) * B], noise[g * B:(g + 1) * B]).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            # an unused parameter's zero lives on the parameter's device, as the others do
            rows.append(torch.stack([p.new_zeros(()) if grad is None else grad.pow(2).sum()
                                     for p, grad in zip(params, grads)]))
        out[B] = torch.stack(rows)
    return out


def device_scores(model, images, seed, name, groups, chunk, draws=1):
    """Per-example losses (N,) and group features {B: (N // B, P)} of one image set, float64 on
    the model's device (no host sync). An example's loss is the mean over `draws` noise draws from
    the set's own seeded stream, so the numbers are reproducible."""
    x = images.float() / 255
    lcm = math.lcm(*groups)
    chunk = max(lcm, chunk // lcm * lcm)
    n = len(x) // lcm * lcm  # drop the tail that does not fill a group (the paper's drop_last)
    # the draws are fixed by (seed, set name): every method and every rerun sees the same loss
    noise = model.draw_noise(n * draws, stream(seed, f"noise/{name}"))  # (n * draws, k)
    device = next(model.parameters()).device
    # Each example is repeated `draws` times in a row, one draw per copy: the gradient of its mean
    # loss is then the gradient of a group of `draws` rows / draws, and a group of B examples is
    # B x draws rows.
    rows = [B * draws for B in groups]
    features, losses = {B: [] for B in groups}, []
    for i in range(0, n, chunk):  # chunks bound the memory of the stored activations
        j = min(i + chunk, n)
        x_rows = x[i:j].repeat_interleave(draws, 0).to(device)
        noise_rows = noise[i * draws:j * draws].to(device)
        try:
            chunk_features, chunk_losses = fast_sq_norms(model, x_rows, noise_rows, rows)
        except NotImplementedError:  # a layer without a closed form: the general torch.func path
            chunk_features = vmap_sq_norms(model, x_rows, noise_rows, rows)
            chunk_losses = model(x_rows, noise_rows).detach()
        for B, r in zip(groups, rows):
            features[B].append(chunk_features[r].double() / draws ** 2)
        losses.append(chunk_losses.double().reshape(-1, draws).mean(1))
    return torch.cat(losses), {B: torch.cat(features[B]) for B in groups}


def score_set(model, images, seed, name, groups, chunk, draws=1):
    """device_scores on the host: one device sync for the whole set."""
    losses, features = device_scores(model, images, seed, name, groups, chunk, draws)
    parts = [losses] + [features[B].flatten() for B in groups]
    flat = torch.cat(parts).cpu()  # the one sync
    pieces = flat.split([len(p) for p in parts])
    return pieces[0], {B: piece.view_as(features[B]) for B, piece in zip(groups, pieces[1:])}


TIMESTEPS = [0, 2, 5, 10, 20, 50, 100, 200, 300, 500, 700, 999]  # candidates for the scored t


def error_of(model, error):  # the model's own loss (l1 or l2) as one mean
    return error.abs().mean() if model.loss == "l1" else error.pow(2).mean()


@torch.no_grad()
def device_timestep_table(model, images, seed):
    """{(t, column): 0-dim tensor on the model's device} for every candidate t: see
    timestep_table."""
    device = next(model.parameters()).device
    x = (images.float() / 255).to(device)
    table = {}
    for t in [t for t in TIMESTEPS if t < len(model.alpha_bar)]:
        generator = stream(seed, f"timestep/{t}")
        noise1 = model.draw_noise(len(x), generator).to(device)
        noise2 = model.draw_noise(len(x), generator).to(device)
        steps = torch.full((len(x),), t, dtype=torch.long, device=device)
        loss1, loss2 = (model(x, e, steps).double() for e in (noise1, noise2))
        x1, x2 = (model.noised(x, e, steps).double() for e in (noise1, noise2))
        slope = ((x1 - x1.mean()) * (noise1 - noise1.mean())).mean() / x1.var()  # least squares
        linear = slope * (x2 - x1.mean()) + noise1.mean() - noise2
        table.update({(t, "denoiser"): loss2.mean(), (t, "linear"): error_of(model, linear),
                      (t, "zero"): error_of(model, noise2),
                      (t, "retest"): correlation(loss1, loss2)})
    return table


def correlation(a, b):  # Pearson's r, written out: torch.corrcoef would sync with the host
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.pow(2).sum() * b.pow(2).sum()).sqrt()


def timestep_table(model, images, seed):
    """For each candidate t, on ID images only: the denoiser's eps-error, the error of the best
    linear predictor a_t x_t + b_t (fitted on one noise draw, judged on another: what needs no
    image model), and the test-retest correlation of the per-example loss over two noise draws
    (how much of the loss is a function of the image rather than of the noise)."""
    values = to_host(device_timestep_table(model, images, seed))  # the one sync
    rows = {}
    for (t, column), value in values.items():
        rows.setdefault(t, dict(t=t))[column] = value
    return list(rows.values())


def pick_timestep(rows):
    """The rule: the most reliable (highest test-retest correlation) t among those where the
    denoiser beats the linear predictor; if it beats it nowhere, the t where it comes closest."""
    good = [r for r in rows if r["denoiser"] < r["linear"]]
    if good:
        return max(good, key=lambda r: r["retest"])["t"]
    return min(rows, key=lambda r: r["denoiser"] / r["linear"])["t"]

# -------------------------------------------------------------------------------------------------
# detectors and metrics (float64 numpy from here on)


def log_features(sq_norms):
    """log f; an exactly zero gradient (an unused weight) becomes log(1e-300): it has zero
    variance on the fit set and is dropped there, as the authors drop their `zero_keys`."""
    return np.log(np.maximum(np.asarray(sq_norms, dtype=np.float64), 1e-300))


def fit_gaussians(features):
    """Per-feature mean and unbiased std on the fit set; features with zero or non-finite spread
    are dropped."""
    mu, sd = features.mean(0), features.std(0, ddof=1)
    keep = np.isfinite(mu) & np.isfinite(sd) & (sd > 0)
    return mu[keep], sd[keep], keep


def gaussian_score(features, fit):
    """sum_l log N(features_l; mu_l, sd_l): higher = more in-distribution; NaN -> -inf (most
    anomalous)."""
    mu, sd, keep = fit
    z = (features[:, keep] - mu) / sd
    score = (-0.5 * z ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)).sum(1)
    return np.where(np.isnan(score), -np.inf, score)


def group_losses(losses, B):  # (N,) -> (N // B,) summed loss of each group, consecutive examples
    losses = np.asarray(losses, dtype=np.float64)
    return losses[:len(losses) // B * B].reshape(-1, B).sum(1)


def midranks(values):  # 1-based ranks, ties sharing their average rank
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse]


def placements(id_scores, ood_scores):
    """DeLong's structural components: v10_i = P(OOD score < ID score i) + P(tie) / 2 and
    v01_j = P(ID score > OOD score j) + P(tie) / 2, from ranks. Both average to the AUROC; their
    variances give its standard error. NaN scores rank lowest, with -inf."""
    a = np.where(np.isnan(id_scores), -np.inf, id_scores).astype(np.float64)
    b = np.where(np.isnan(ood_scores), -np.inf, ood_scores).astype(np.float64)
    ranks = midranks(np.concatenate([a, b]))
    # rank among all minus rank among the ID scores = the number of OOD scores below
    v10 = (ranks[:len(a)] - midranks(a)) / len(b)
    v01 = 1 - (ranks[len(a):] - midranks(b)) / len(a)
    return v10, v01


def auroc(id_scores, ood_scores):
    """P(ID score > OOD score) + 0.5 P(tie): the Mann-Whitney U statistic with average ranks."""
    return float(placements(id_scores, ood_scores)[0].mean())


def delong_se(v10, v01):
    """Standard error of a mean of placements: var(v10) / m + var(v01) / n (DeLong et al.
    1988)."""
    return math.sqrt(np.var(v10, ddof=1) / len(v10) + np.var(v01, ddof=1) / len(v01))


def fpr_at_tpr(id_scores, ood_scores, tpr=0.95):
    """Fraction of OOD scores at or above the threshold that keeps >= tpr of the ID scores."""
    ranked = np.sort(np.asarray(id_scores, dtype=np.float64))
    threshold = ranked[int(math.floor((1 - tpr) * len(id_scores)))]
    return float(np.mean(np.asarray(ood_scores) >= threshold))


METHODS = ["likelihood", "typicality", "gradient"]


def detect(losses, features, groups, names):
    """Scores {B: {set: {method: (N // B,) array}}} of the three detectors, higher = more
    in-distribution."""
    scores, kept = {}, {}
    # All three detectors are fitted on the same fit half of the ID test split and judged on the
    # other half against each OOD set, as in the official protocol; nothing is fitted on OOD data.
    for B in groups:
        H = group_losses(losses["fit"], B).mean()  # typicality's entropy: mean summed fit loss
        # log, because a squared norm is roughly a scaled chi-square, whose log is close to Gaussian
        fit = fit_gaussians(log_features(features["fit"][B]))
        scores[B] = {}
        for name in ["eval"] + names:
            L = group_losses(losses[name], B)
            gradient = gaussian_score(log_features(features[name][B]), fit)
            scores[B][name] = dict(likelihood=-L, typicality=-np.abs(L - H), gradient=gradient)
        kept[B] = [int(fit[2].sum()), len(fit[2])]  # features used (non-zero variance) of all
    return scores, kept


def evaluate(scores, groups, names):
    """One row per (OOD set, B): AUROC, DeLong standard error and FPR@95 of each detector, and the
    paired difference gradient - typicality with its standard error (the same ID and OOD examples:
    the placements are subtracted before the variance is taken). `phi` keeps the paired placements
    per cluster of lcm(B) consecutive images, the unit shared by every B, for pooled_difference."""
    unit = math.lcm(*groups)
    rows = []
    for B in groups:
        for name in names:
            row, parts = dict(ood=name, B=B, auroc={}, se={}, fpr95={}), {}
            for method in METHODS:
                id_scores, ood_scores = scores[B]["eval"][method], scores[B][name][method]
                v10, v01 = placements(id_scores, ood_scores)
                per_cluster = unit // B
                parts[method] = (v10.reshape(-1, per_cluster).mean(1),
                                 v01.reshape(-1, per_cluster).mean(1))
                row["auroc"][method] = float(v10.mean())
                row["se"][method] = delong_se(*parts[method])
                row["fpr95"][method] = fpr_at_tpr(id_scores, ood_scores)
            row["phi"] = tuple(g - t for g, t in zip(parts["gradient"], parts["typicality"]))
            row["diff"] = row["auroc"]["gradient"] - row["auroc"]["typicality"]
            row["diff_se"] = delong_se(*row["phi"])
            rows.append(row)
    return rows


def pooled_difference(rows):
    """Mean of (gradient - typicality) over rows of ONE seed, and its DeLong standard error. The
    rows share the ID evaluation images (all of them) and each OOD set's images (rows of that
    set), so the paired placements are averaged per image cluster first: correlated rows are not
    counted as independent."""
    k = len(rows)
    phi_id = sum(r["phi"][0] for r in rows) / k
    var = np.var(phi_id, ddof=1) / len(phi_id)
    for name in dict.fromkeys(r["ood"] for r in rows):
        phi = sum(r["phi"][1] for r in rows if r["ood"] == name) / k
        var += np.var(phi, ddof=1) / len(phi)
    return float(np.mean([r["diff"] for r in rows])), math.sqrt(var)


def verdict(mean, half):
    return "better" if mean - half > 0 else "worse" if mean + half < 0 else "indistinguishable"

# -------------------------------------------------------------------------------------------------
# the run: per seed train, score, evaluate; over seeds summarise; report, verdicts, figures


def run_one(cfg, ctx):
    """One seed: data, then for each model train, score every set, detect and evaluate."""
    sets = load_data(cfg)  # a failed download or a bad file: cli() prints one line
    names = [k for k in sets if k not in ("train", "fit", "eval")]
    groups = cfg.batch_size_list
    print(f"seed {cfg.seed}, data {cfg.data}: {len(sets['train'])} train, ID test "
          f"{len(sets['fit'])} fit + {len(sets['eval'])} eval, OOD sets "
          f"{', '.join(f'{k} ({len(sets[k])})' for k in names)}; models "
          f"{', '.join(cfg.model_list)}; B = {groups}; {cfg.max_steps} steps x batch "
          f"{cfg.batch_size}, hidden {cfg.hidden}; {cfg.draws} noise draws per scored loss")
    records, rows, scores_by_model = [], [], {}
    for kind in cfg.model_list:
        record, scores = run_model(kind, cfg, ctx, sets, names)
        rows += [dict(model=kind, **r) for r in evaluate(scores, groups, names)]
        records.append(record)
        scores_by_model[kind] = scores
        print(describe(record, cfg))
    return dict(seed=cfg.seed, records=records, rows=rows, scores=scores_by_model, sets=sets,
                names=names)


def run_model(kind, cfg, ctx, sets, names):
    """Train one model, choose the diffusion timestep, score every set: (record, scores)."""
    t0 = time.time()
    model, summary = fit_model(kind, cfg, ctx, sets["train"])
    history = summary["history"]
    record = dict(model=kind, params=count_params(model), train_seconds=time.time() - t0,
                  final_train_loss=history[-1]["loss"] if history else math.nan)
    if kind == "diffusion":  # the scored timestep, chosen on ID fit images only
        record["timesteps"] = timestep_table(model, sets["fit"], cfg.seed)
        chosen = pick_timestep(record["timesteps"])
        model.t_score = chosen if cfg.diff_t == "auto" else int(cfg.diff_t)
        record["t"] = model.t_score
    t1 = time.time()
    losses, features = {}, {}
    for name in tqdm(["fit", "eval"] + names, desc=f"{kind} scores", leave=False):
        losses[name], features[name] = score_set(model, sets[name], cfg.seed, name,
                                                 cfg.batch_size_list, cfg.chunk, cfg.draws)
    scores, record["features_kept"] = detect(losses, features, cfg.batch_size_list, names)
    record["score_seconds"] = time.time() - t1
    record["mean_loss"] = {k: float(v.mean()) for k, v in losses.items()}
    return record, scores


def describe(record, cfg):
    """One line per trained model; for the diffusion model the check that its scored t is
    informative."""
    unit = {"flow": "bits/dim", "diffusion": f"{cfg.diff_loss} eps-error at t={record.get('t')}"}
    kept = record["features_kept"][min(cfg.batch_size_list)]
    means = ", ".join(f"{k} {v:.3f}" for k, v in record["mean_loss"].items() if k != "fit")
    line = (f"  {record['model']}: {record['params']:,} params, trained "
            f"{record['train_seconds']:.0f}s (final train loss {record['final_train_loss']:.3f}), "
            f"scored {record['score_seconds']:.0f}s, gradient features kept {kept[0]}/{kept[1]}; "
            f"mean loss ({unit.get(record['model'], 'nats/image')}): {means}")
    if "t" in record:
        r = next(r for r in record["timesteps"] if r["t"] == record["t"])
        how = "chosen" if cfg.diff_t == "auto" else "given"
        beats = "BEATS" if r["denoiser"] < r["linear"] else "does NOT beat"
        line += (f"\n    diffusion scored at t={r['t']} ({how}; ID fit half): denoiser eps-error "
                 f"{r['denoiser']:.3f} vs {r['linear']:.3f} for the best linear predictor from "
                 f"x_t and {r['zero']:.3f} for eps = 0: {beats} the linear predictor; loss "
                 f"test-retest r = {r['retest']:.2f}")
    return line


def summarise(runs):
    """Over seeds: per pairing (model, OOD set, B) each detector's AUROC and the paired difference
    gradient - typicality, each with a 95% interval and a verdict; the same for the mean
    difference per model and over all pairings. Several seeds: a t-interval over seeds (data,
    training, noise all vary). One seed: DeLong intervals, which cover only the test-sample noise
    of the models trained."""
    def interval(values, ses):  # with one seed its DeLong error is the only one known
        return mean_interval(values, shared_se=ses[0] if len(runs) == 1 else 0.0)

    pairings = []
    for i, first in enumerate(runs[0]["rows"]):
        same = [run["rows"][i] for run in runs]
        auc = {m: interval([r["auroc"][m] for r in same], [r["se"][m] for r in same])
               for m in METHODS}
        diff = interval([r["diff"] for r in same], [r["diff_se"] for r in same])
        pairings.append(dict(model=first["model"], ood=first["ood"], B=first["B"], auroc=auc,
                             diff=diff, verdict=verdict(*diff)))
    pooled = {}
    for kind in [None] + list(dict.fromkeys(p["model"] for p in pairings)):
        per_seed = [pooled_difference([r for r in run["rows"] if kind in (None, r["model"])])
                    for run in runs]
        mean, half = interval([d for d, _ in per_seed], [se for _, se in per_seed])
        pooled[kind or "all"] = dict(mean=mean, half=half, verdict=verdict(mean, half),
                                     per_seed=[d for d, _ in per_seed])
    return dict(seeds=[run["seed"] for run in runs], pairings=pairings, pooled=pooled)


def table(summary):
    how = "t-interval over seeds" if len(summary["seeds"]) > 1 else "DeLong, test-sample noise only"
    lines = [f"AUROC (ID = positive), mean over seeds {summary['seeds']} +- 95% half-width "
             f"({how}); likelihood = -loss, typicality = -|loss - H|, gradient = layer-wise "
             "gradient-norm score",
             f"{'model':10s} {'OOD set':11s} {'B':>2s}  {'likelihood':>11s} {'typicality':>11s} "
             f"{'gradient':>11s}  {'grad - typ':>14s}  verdict"]
    lines.append("-" * len(lines[-1]))
    for p in summary["pairings"]:
        cells = " ".join(f"{p['auroc'][m][0]:5.3f}+-{p['auroc'][m][1]:.3f}" for m in METHODS)
        lines.append(f"{p['model']:10s} {p['ood']:11s} {p['B']:2d}  {cells}  "
                     f"{p['diff'][0]:+6.3f}+-{p['diff'][1]:.3f}  {p['verdict']}")
    return "\n".join(lines)


def verdicts(summary, groups):
    """The verdicts, computed from the intervals above, never written by hand: (lines, dict)."""
    B0, pairings, pooled = min(groups), summary["pairings"], summary["pooled"]
    # the likelihood's whole interval below chance: OOD scored MORE likely
    below = [p for p in pairings if p["B"] == B0 and sum(p["auroc"]["likelihood"]) < 0.5]
    counts = {v: sum(p["verdict"] == v for p in pairings)
              for v in ("better", "worse", "indistinguishable")}
    unsaturated = [p["verdict"] for p in pairings
                   if min(p["auroc"]["gradient"][0], p["auroc"]["typicality"][0]) < 0.99]
    out = dict(nalisnick=bool(below),
               likelihood_below_chance=[f"{p['model']}/{p['ood']}" for p in below],
               pairing_verdicts=counts, most_pairings=counts["better"] > len(pairings) / 2,
               mean_difference={k: dict(mean=v["mean"], half_width=v["half"],
                                        verdict=v["verdict"]) for k, v in pooled.items()})
    every = pooled["all"]
    lines = [
        "Nalisnick effect (raw likelihood AUROC interval entirely below 0.5 at "
        f"B={B0}: OOD scored MORE likely): {'YES' if below else 'NO'}"
        + "".join(f", {p['model']}/{p['ood']} {p['auroc']['likelihood'][0]:.2f}" for p in below),
        "Gradient score vs typicality, mean AUROC difference over all "
        f"{len(pairings)} pairings: {every['mean']:+.3f} +- {every['half']:.3f}: "
        f"{every['verdict'].upper()} (per seed: "
        f"{' '.join(f'{d:+.3f}' for d in every['per_seed'])})",
        "Gradient better than typicality on most pairings (paper's claim), by per-pairing 95% "
        f"intervals: {'YES' if out['most_pairings'] else 'NO'} (better {counts['better']}, "
        f"worse {counts['worse']}, indistinguishable {counts['indistinguishable']} of "
        f"{len(pairings)}; where not both >= 0.99: {unsaturated.count('better')}, "
        f"{unsaturated.count('worse')}, {unsaturated.count('indistinguishable')} of "
        f"{len(unsaturated)})"]
    for kind, v in pooled.items():
        if kind != "all":
            mine = [p["verdict"] for p in pairings if p["model"] == kind]
            lines.append(f"  {kind:10s} mean difference {v['mean']:+.3f} +- {v['half']:.3f}: "
                         f"{v['verdict']:17s} (pairings: {mine.count('better')} better, "
                         f"{mine.count('worse')} worse of {len(mine)})")
    return lines, out


def report(cfg, ctx, runs, t_start):
    """Print the table and the verdicts; save results.json and the figures of the first seed."""
    summary = summarise(runs)
    print("\n" + table(summary))
    lines, out = verdicts(summary, cfg.batch_size_list)
    print("\nverdict:\n" + "\n".join("  " + line for line in lines))
    per_seed = [dict(seed=r["seed"], records=r["records"],
                     rows=[{k: v for k, v in row.items() if k != "phi"} for row in r["rows"]])
                for r in runs]
    path = save_results(cfg, ctx, dict(runs=per_seed, summary=summary, verdict=out,
                                       seconds=time.time() - t_start))
    first = runs[0]
    figures = [plot(cfg, first["scores"], first["names"]),
               plot_samples(cfg, first["sets"], ["train"] + first["names"])]
    print(f"\nwrote {path}" + "".join(f", {f}" for f in figures if f)
          + f" in {time.time() - t_start:.0f}s")
    return out


def plot(cfg, scores_by_model, ood_names):
    """Histograms of the B = 1 scores: raw likelihood (left) and the gradient score (right), whose
    distance below the best ID score is shown on a log axis because far-OOD sets are orders
    away."""
    B = min(cfg.batch_size_list)
    kinds = list(scores_by_model)
    panels = [("likelihood", "-loss (raw likelihood), values far outside the ID range omitted"),
              ("gradient", "log10(1 + max ID score - score), gradient")]

    def draw(plt):
        fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 2.6 * len(kinds)), squeeze=False)
        for row, kind in enumerate(kinds):
            scores = scores_by_model[kind][B]
            low, high = np.percentile(scores["eval"]["likelihood"], [1, 99])
            # far-away sets (noise) would squash the ID histogram
            low, high = low - (high - low), high + (high - low)
            for column, (method, label) in enumerate(panels):
                ax = axes[row, column]
                top, peak = scores["eval"]["gradient"].max(), 1.0  # peak: the ID histogram's
                for name in ["eval"] + ood_names:
                    v = scores[name][method]
                    if method == "gradient":
                        v = np.log10(1 + np.clip(top - v, 0, 1e300))
                    else:
                        v = v[(v >= low) & (v <= high)]
                    v = v[np.isfinite(v)]
                    if len(v) == 0:  # the whole set lies outside the plotted range
                        continue
                    heights = ax.hist(v, bins=50, density=True,
                                      histtype="step" if name != "eval" else "stepfilled",
                                      alpha=0.5 if name == "eval" else 1,
                                      label="ID (eval)" if name == "eval" else name)[0]
                    peak = heights.max() if name == "eval" else peak
                ax.set_title(f"{kind}: {label}", fontsize=9)
                ax.set_yticks([])
                ax.set_ylim(0, 3 * peak)  # narrow OOD spikes are cut at 3x the ID peak
        axes[0, 1].legend(fontsize=7)
        fig.suptitle(f"score histograms at B={B}: ID evaluation half vs each OOD set")
        fig.tight_layout()
        return fig

    return save_figure(Path(cfg.out) / "score_histograms.png", draw)


def plot_samples(cfg, sets, names, k=8):
    """The first k images of every set, one row per set: what "simpler" and "near-OOD" look
    like."""
    def draw(plt):
        fig, axes = plt.subplots(len(names), k, figsize=(k * 0.9, len(names) * 0.95),
                                 squeeze=False)
        for row, name in enumerate(names):
            for column in range(k):
                ax = axes[row, column]
                image = sets[name][column].reshape(SIDE, SIDE).numpy()
                ax.imshow(image, cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[row, 0].set_ylabel(name, fontsize=8)
        fig.tight_layout(pad=0.2)
        return fig

    return save_figure(Path(cfg.out) / "samples.png", draw)

# -------------------------------------------------------------------------------------------------
# benchmark: per-example layer norms at batch --bench_batch, fast path vs vmap vs loop


def plain_backward(model, x, noise):
    """One ordinary batched backward of the summed loss: the floor for any per-example method."""
    return torch.autograd.grad(model(x, noise).sum(), list(model.parameters()))


def best_time(fn, model, x, noise, repeats, ctx):
    """(seconds of the fastest of `repeats` calls after one warm-up call, the last output)."""
    fn(model, x[:2], noise[:2])  # warm-up (allocator, vmap tracing)
    if ctx.gpu:
        torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):  # the machine is shared: the minimum is the least disturbed
        t0 = time.perf_counter()
        out = fn(model, x, noise)
        if ctx.gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench(cfg, ctx):
    # Timing does not depend on the weights, so freshly initialised models are enough; the values
    # are compared with the loop's (the reference) to show the fast path computes the same numbers.
    images = make_set("test", cfg.bench_batch, cfg.seed, cfg.pixel_noise)
    x = (images.float() / 255).to(ctx.device)
    results = {}
    print(f"per-example squared layer norms, batch {cfg.bench_batch}, "
          f"{torch.get_num_threads()} thread(s), freshly initialised models; best of 5 (fast, one "
          "plain backward), 2 (loop) and 1 (vmap) timed calls after one warm-up call")
    methods = [("fast", fast_sq_norms, 5), ("backward", plain_backward, 5),
               ("loop", loop_sq_norms, 2), ("vmap", vmap_sq_norms, 1)]
    for kind in cfg.model_list:
        torch.manual_seed(cfg.seed)
        model = build(kind, cfg).to(ctx.device).eval()
        noise = model.draw_noise(len(x), stream(cfg.seed, "bench")).to(ctx.device)
        seconds, values = {}, {}
        for name, fn, repeats in methods:
            seconds[name], out = best_time(fn, model, x, noise, repeats, ctx)
            if name != "backward":
                values[name] = (out[0] if isinstance(out, tuple) else out)[1]  # B = 1 features
        reference = values["loop"]  # relative error per (example, tensor), worst case reported
        relative = {m: float(((values[m] - reference).abs()
                              / reference.abs().clamp_min(1e-30)).max()) for m in ("fast", "vmap")}
        r = dict(params=count_params(model), fast_s=seconds["fast"],
                 backward_s=seconds["backward"], loop_s=seconds["loop"], vmap_s=seconds["vmap"],
                 speedup_vs_loop=seconds["loop"] / seconds["fast"],
                 fast_over_backward=seconds["fast"] / seconds["backward"],
                 max_rel_diff_fast=relative["fast"], max_rel_diff_vmap=relative["vmap"])
        results[kind] = r
        print(f"{kind:10s} {r['params']:>9,} params  fast {1e3 * r['fast_s']:7.1f} ms  "
              f"one backward {1e3 * r['backward_s']:7.1f} ms  loop {1e3 * r['loop_s']:7.1f} ms  "
              f"vmap {1e3 * r['vmap_s']:7.1f} ms  loop/fast {r['speedup_vs_loop']:5.1f}x  "
              f"fast/backward {r['fast_over_backward']:4.2f}x  max rel diff vs loop: fast "
              f"{relative['fast']:.1e}, vmap {relative['vmap']:.1e}")
    path = save_results(cfg, ctx, dict(bench=results), name="bench.json")
    print(f"wrote {path}")

# -------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(Config, "fisher_ood", argv)
    ctx = setup(cfg)
    if cfg.bench:
        return bench(cfg, ctx)
    t_start = time.time()
    # seeds one after another; each changes the data, the initial weights, the batches and the noise
    runs = [run_one(dataclasses.replace(cfg, seed=cfg.seed + i), ctx) for i in range(cfg.seeds)]
    report(cfg, ctx, runs, t_start)


if __name__ == "__main__":
    cli(main)
