"""
fisher_ood.py: out-of-distribution detection from layer-wise gradient norms of generative models.

Dauncey, Holmes, Williams & Falck, "Approximations to the Fisher Information Metric of Deep
Generative Models for Out-Of-Distribution Detection" (arXiv 2403.01485, TMLR 2024). A model can
give a simpler, unseen image set *higher* likelihood than its training set (Nalisnick et al. 2019);
the claim: a score from layer-wise gradient norms beats the typicality test on most pairings.

The method in one screen:
  L(x; theta)  the per-example loss: a negative log-likelihood (`VAE`, `Flow`) or a surrogate of
               one (`Denoiser`: the noise-prediction error at one timestep)
  f_l(x) = ||grad_{theta_l} L(x)||^2 for every parameter tensor l: the diagonal blocks of the
               Fisher metric s^T F^-1 s, each up to an unknown scale (`fast_sq_norms`: one
               batched backward, ||grad W||^2 = ||a_i||^2 ||delta_i||^2 for a Linear layer)
  mu_l, sigma_l  mean and std of log f_l on in-distribution fit images (`fit_gaussians`)
  S(x) = sum_l log N(log f_l(x); mu_l, sigma_l^2), higher = more in-distribution, two-sided
               (`gaussian_score`); a group of B examples uses its summed loss's gradient
  baselines (`detect`): likelihood -L(x), typicality -|L(x) - mean fit L|; judged by AUROC,
               the headline: gradient - typicality

Run: `python fisher_ood.py` (procedural images, four models, ~2 CPU-minutes); `--seeds=5`;
`--data=fashionmnist|mnist` (the paper's pair, downloaded); `--gpu`; `--bench`.
"""
import dataclasses, functools, gzip, math, time, zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from train import (DataError, TrainConfig, cli, count_params, download, fill_auto, mean_interval,
                   parse_config, save_figure, save_results, setup, to_host, train)


@dataclass
class Config(TrainConfig):
    model: str = "all"  # vae | vae_bernoulli | diffusion | flow, a comma list, or all
    data: str = "shapes"  # shapes (procedural) | fashionmnist (OOD: mnist) | mnist (the reverse)
    batch_sizes: str = "1,5"  # group sizes B: a feature per B examples' summed loss
    n_train: int = 0  # training images (0: 12000; 60000 with --gpu)
    n_test: int = 0  # ID test images: half fit, half evaluate (0: 2000; 10000 with --gpu)
    n_ood: int = 0  # images per OOD set (0: 1000; 5000 with --gpu)
    hidden: int = 0  # width of every MLP (0: 256; 1024 with --gpu)
    latent: int = 16  # VAE latent dimension
    couplings: int = 6  # affine coupling layers in the flow
    diff_T: int = 1000  # diffusion timesteps, linear betas 1e-4 .. 0.02
    diff_t: str = "auto"  # scored diffusion timestep (paper: 0) or auto (see README)
    draws: int = 4  # noise draws averaged into a scored loss
    seeds: int = 1  # seeds run (--seed, --seed+1, ...); one: DeLong intervals
    lr: float = 1e-3
    max_steps: int = 0  # training steps per model (0: 1200; 20000 with --gpu)
    batch_size: int = 128  # training images per step
    warmup: int = 50
    weight_decay: float = 0.0
    log_every: int = 50
    bench: bool = False  # only time per-example norms of --batch_size images
    unused = ("eval_every", "ckpt_every", "resume")  # no checkpoints

    def __post_init__(self):
        super().__post_init__()
        fill_auto(self, n_train=(12000, 60000), n_test=(2000, 10000), n_ood=(1000, 5000),
                  hidden=(256, 1024), max_steps=(1200, 20000))  # (CPU, --gpu)
        names = [m.strip() for m in self.model.split(",") if m.strip()]
        self.model_list = models = list(MODELS) if names == ["all"] else names
        texts = [b.strip() for b in self.batch_sizes.split(",") if b.strip()]
        self.batch_size_list = sizes = sorted({int(b) if b.isdigit() else 0 for b in texts}) or [0]
        t = self.diff_t
        counts = (self.latent, self.couplings, self.diff_T, self.draws, self.seeds, self.batch_size)
        for failed, message in [
                (not models or set(models) - set(MODELS) or len(set(models)) < len(models),
                 f"--model: {', '.join(MODELS)}, each at most once, or all"),
                (self.data not in ("shapes", "fashionmnist", "mnist"),
                 "--data: shapes, fashionmnist or mnist"),
                (min(sizes) < 1, "--batch_sizes: positive integers"),
                (not (t == "auto" or t.isdigit() and int(t) < self.diff_T),
                 "--diff_t: auto or an integer below --diff_T"),
                (self.n_test < 4 * max(sizes) or self.n_ood < 2 * max(sizes),
                 "--n_test must be >= 4 B and --n_ood >= 2 B"),
                (min(counts) < 1, "counts must be >= 1"),
                (self.seed + self.seeds > 2**32, "--seed + --seeds must be <= 2^32")]:
            if failed:
                raise ValueError(message)

# ---- the models: (x (B, 784) in [0, 1], noise) -> a loss per example (B,), Linear layers only

SIDE = 28
D = SIDE * SIDE


class VAE(nn.Module):
    """MLP VAE, loss = negative ELBO in nats, one latent sample; per pixel N(x; x_hat, 0.1^2)
    ('gauss') or a Bernoulli of the image binarised at 128."""

    def __init__(self, hidden, latent, decoder="gauss", sigma=0.1):
        super().__init__()
        self.decoder, self.sigma, self.noise_dim = decoder, sigma, latent
        self.enc1, self.enc2 = nn.Linear(D, hidden), nn.Linear(hidden, hidden)
        self.enc_out = nn.Linear(hidden, 2 * latent)
        self.dec1, self.dec2 = nn.Linear(latent, hidden), nn.Linear(hidden, hidden)
        self.dec_out = nn.Linear(hidden, D)

    def draw_noise(self, n, generator=None):
        return torch.randn(n, self.noise_dim, generator=generator)

    def forward(self, x, eps):  # eps (B, latent)
        inputs = x
        if self.decoder == "bernoulli":  # centred: black images get gradients
            x = (x >= 0.5).float()
            inputs = 2 * x - 1
        mu, logvar = self.enc_out(F.relu(self.enc2(F.relu(self.enc1(inputs))))).chunk(2, -1)
        z = mu + (0.5 * logvar).exp() * eps  # (B, latent)
        out = self.dec_out(F.relu(self.dec2(F.relu(self.dec1(z)))))  # (B, D)
        if self.decoder == "gauss":
            normaliser = D * math.log(self.sigma * math.sqrt(2 * math.pi))
            nll = 0.5 * ((x - out) / self.sigma).pow(2).sum(1) + normaliser
        else:
            nll = F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
        return nll + 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)  # + KL(q(z|x) || p(z))


class Denoiser(nn.Module):
    """DDPM noise predictor, an MLP on [x_t, t]; loss = mean |eps_theta - eps| (the paper's L1),
    at uniform t in training, at t_score when scoring."""

    def __init__(self, hidden, T=1000, t_score=0, emb=32):
        super().__init__()
        self.t_score, self.emb, self.noise_dim = t_score, emb, D
        self.register_buffer("alpha_bar", torch.cumprod(1 - torch.linspace(1e-4, 0.02, T), 0))
        self.fc1, self.fc2 = nn.Linear(D + emb, hidden), nn.Linear(hidden, hidden)
        self.fc3, self.out = nn.Linear(hidden, hidden), nn.Linear(hidden, D)
        self.gate = nn.Linear(emb, 1)  # + gate(t) x_t: a narrow MLP cannot pass x_t

    def draw_noise(self, n, generator=None):
        return torch.randn(n, D, generator=generator)

    def noised(self, x, eps, t):  # x_t of the image scaled to [-1, 1]
        alpha_bar = self.alpha_bar[t][:, None]  # (B, 1)
        return alpha_bar.sqrt() * (2 * x - 1) + (1 - alpha_bar).sqrt() * eps

    def forward(self, x, eps, t=None):  # t (B,) timesteps
        if t is None:
            t = torch.full((len(x),), self.t_score, device=x.device, dtype=torch.long)
        half = self.emb // 2  # t as sines and cosines, (B, emb)
        frequencies = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        angle = t.float()[:, None] * frequencies
        xt, embedding = self.noised(x, eps, t), torch.cat([angle.sin(), angle.cos()], -1)
        hidden = F.silu(self.fc1(torch.cat([xt, embedding], -1)))
        hidden = F.silu(self.fc3(F.silu(self.fc2(hidden))))
        return (self.out(hidden) + self.gate(embedding) * xt - eps).abs().mean(1)


class Coupling(nn.Module):
    """RealNVP coupling: of a fixed random split, half a gives s and t for half b,
    y_b = x_b exp(s) + t, log|det| = sum s."""

    def __init__(self, hidden, seed):
        super().__init__()
        perm = torch.randperm(D, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("idx_a", perm[:D // 2])
        self.register_buffer("idx_b", perm[D // 2:])
        self.fc1, self.fc2 = nn.Linear(D // 2, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, D)
        nn.init.normal_(self.out.weight, 0, 1e-3)  # near the identity (at it: no gradient below)
        nn.init.zeros_(self.out.bias)

    def forward(self, y):  # -> [y_a, y_b], log|det|
        ya, yb = y[:, self.idx_a], y[:, self.idx_b]
        s, t = self.out(F.relu(self.fc2(F.relu(self.fc1(ya))))).chunk(2, -1)  # (B, D/2) each
        s = torch.tanh(s)  # bounded: stable first steps
        return torch.cat([ya, yb * s.exp() + t], -1), s.sum(1)


class Flow(nn.Module):
    """Exact NLL in bits/dim of the 256-level image: x~ = (k + u) / 256, u ~ U(0, 1)^D,
    bpd = -log2 p(x~) / D + 8 (undoing the bin width)."""

    def __init__(self, hidden, n_couplings, seed=0):
        super().__init__()
        self.noise_dim = D
        self.layers = nn.ModuleList(Coupling(hidden, seed * 1000 + i) for i in range(n_couplings))

    def draw_noise(self, n, generator=None):
        return torch.rand(n, D, generator=generator)

    def forward(self, x, u):  # u (B, D) uniform
        y = (((x * 255).round() + u) / 256 - 0.5) * 4  # unit scale: log|det| = D log 4
        logdet = torch.full((len(x),), D * math.log(4.0), device=x.device)
        for layer in self.layers:
            y, layer_logdet = layer(y)
            logdet = logdet + layer_logdet
        log_p = -0.5 * (y.pow(2) + math.log(2 * math.pi)).sum(1) + logdet  # of x~ on [0, 1]^D
        return -log_p / (D * math.log(2)) + 8


MODELS = ["vae", "vae_bernoulli", "diffusion", "flow"]


def build(kind, cfg):
    if kind.startswith("vae"):
        return VAE(cfg.hidden, cfg.latent, "gauss" if kind == "vae" else "bernoulli")
    if kind == "diffusion":
        return Denoiser(cfg.hidden, cfg.diff_T, 0 if cfg.diff_t == "auto" else int(cfg.diff_t))
    return Flow(cfg.hidden, cfg.couplings, cfg.seed)

# ---- per-example squared gradient norms {B: (N // B, P)}: row g for the summed loss of group g


def fast_sq_norms(model, x, noise, groups=(1,)):
    """(norms, losses (N,)) from one batched backward. A Linear's gradient for example i is
    delta_i a_i^T (a_i its input, delta_i the gradient at its output): for a group
    ||sum_i delta_i a_i^T||^2 = sum_ij (a_i.a_j)(delta_i.delta_j), for one ||a_i||^2 ||delta_i||^2.
    Other layers need a backward per example."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if {id(p) for p in model.parameters()} - {id(p) for _, m in linears for p in m.parameters()}:
        raise NotImplementedError("Linear layers only")
    inputs, outputs = {}, {}

    def keep(name):
        def hook(module, args, out):
            assert name not in inputs, f"{name} ran twice"
            inputs[name], outputs[name] = args[0].detach(), out
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in linears]
    try:
        losses = model(x, noise)  # (N,)
    finally:
        for handle in handles:
            handle.remove()
    # the gradient at the OUTPUTS of a summed loss: row i of delta is example i's alone
    deltas = torch.autograd.grad(losses.sum(), [outputs[name] for name, _ in linears])
    norms = {B: {} for B in groups}
    for (name, _), delta in zip(linears, deltas):
        a = inputs[name]  # (N, in); delta (N, out)
        assert a.dim() == 2, "no sequence axis"
        for B in groups:
            if B == 1:
                bias = delta.pow(2).sum(1)  # (N,)
                weight = a.pow(2).sum(1) * bias
            else:
                a_groups, delta_groups = a.unflatten(0, (-1, B)), delta.unflatten(0, (-1, B))
                weight = ((a_groups @ a_groups.mT) * (delta_groups @ delta_groups.mT)).sum((1, 2))
                bias = delta_groups.sum(1).pow(2).sum(1)  # (G,)
            norms[B].update({f"{name}.weight": weight, f"{name}.bias": bias})
    order = [name for name, _ in model.named_parameters()]
    return {B: torch.stack([norms[B][n] for n in order], 1) for B in groups}, losses.detach()


# ---- the detector: a Gaussian per tensor on log f, fitted on ID data, its log density the score


def log_features(sq_norms):
    """log f; a zero (an unused weight) has no spread and is dropped."""
    return np.log(np.maximum(np.asarray(sq_norms, dtype=np.float64), 1e-300))


def fit_gaussians(features):
    """Mean and unbiased std of each feature; those without spread dropped."""
    mu, sd = features.mean(0), features.std(0, ddof=1)
    keep = np.isfinite(mu) & np.isfinite(sd) & (sd > 0)
    return mu[keep], sd[keep], keep


def gaussian_score(features, fit):
    """sum_l log N(features_l; mu_l, sd_l^2), higher = more in-distribution; NaN -> -inf."""
    mu, sd, keep = fit
    z = (features[:, keep] - mu) / sd
    score = (-0.5 * z ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)).sum(1)
    return np.where(np.isnan(score), -np.inf, score)


def group_losses(losses, B):  # (N,) -> (N // B,): each group's summed loss
    losses = np.asarray(losses, dtype=np.float64)
    return losses[:len(losses) // B * B].reshape(-1, B).sum(1)


METHODS = ["likelihood", "typicality", "gradient"]


def detect(losses, features, groups, names):
    """{B: {set: {method: (N // B,) scores}}}, higher = more ID, fitted on the fit half."""
    scores = {B: {} for B in groups}
    for B in groups:
        H = group_losses(losses["fit"], B).mean()  # typicality's entropy estimate
        # a squared norm is about a scaled chi-square: its log is near Gaussian
        fit = fit_gaussians(log_features(features["fit"][B]))
        for name in ["eval"] + names:
            L = group_losses(losses[name], B)
            gradient = gaussian_score(log_features(features[name][B]), fit)
            scores[B][name] = dict(likelihood=-L, typicality=-np.abs(L - H), gradient=gradient)
    return scores

# ---- procedural 28 x 28 images. ID: a striped square, ellipse or triangle on a background
# ~ U(0.1, 0.6), pixel noise sigma 0.1: images as bright but noiseless are easier to model

OOD_SETS = ["strokes", "smooth", "constant", "noise", "inverted", "less_noisy", "cross"]


def stream(seed, name):  # a named generator, stable across runs
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))


def grid():  # pixel centres in [-1, 1]: x and y, (28, 28) each
    axis = torch.linspace(-1, 1, SIDE)
    return torch.meshgrid(axis, axis, indexing="xy")


def uniform(generator, n, low, high):  # (n, 1, 1): a draw per image
    return low + (high - low) * torch.rand(n, 1, 1, generator=generator)


def quantise(image):  # (n, 28, 28) float -> (n, 784) uint8
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).reshape(len(image), D)


def contrast(generator, n):  # brighter or darker than the background by 0.25-0.4
    sign = torch.where(torch.rand(n, 1, 1, generator=generator) < 0.5, -1.0, 1.0)
    return sign * uniform(generator, n, 0.25, 0.4)


def shapes(n, generator, kinds=("square", "ellipse", "triangle"), noise=0.1):
    draw = functools.partial(uniform, generator, n)
    xx, yy = grid()
    background = draw(0.1, 0.6)
    cx, cy, scale = draw(-0.45, 0.45), draw(-0.45, 0.45), draw(0.3, 0.6)
    angle, aspect = draw(0, 2 * math.pi), draw(0.6, 1.0)
    # in the shape's own frame every outline is one fixed test
    u = ((xx - cx) * angle.cos() + (yy - cy) * angle.sin()) / scale
    v = (-(xx - cx) * angle.sin() + (yy - cy) * angle.cos()) / scale
    root3 = math.sqrt(3)
    outline = dict(square=(u.abs() <= 1) & ((v / aspect).abs() <= 1),
                   ellipse=u ** 2 + (v / aspect) ** 2 <= 1,
                   triangle=(v >= -0.5) & (root3 * u + v <= 1) & (-root3 * u + v <= 1),
                   cross=((u.abs() <= 1) & (v.abs() <= 0.3)) | ((u.abs() <= 0.3) & (v.abs() <= 1)))
    pick = torch.randint(len(kinds), (n, 1, 1), generator=generator)
    mask = sum((pick == k) & outline[name] for k, name in enumerate(kinds))
    shade = contrast(generator, n) + 0.08 * torch.sin(draw(3, 8) * u + draw(0, 2 * math.pi))
    pixel_noise = noise * torch.randn(n, SIDE, SIDE, generator=generator)
    return quantise(background + mask * shade + pixel_noise)


def strokes(n, generator):
    draw = functools.partial(uniform, generator, n)
    xx, yy = grid()
    background = draw(0.1, 0.6)
    ink = torch.zeros(n, SIDE, SIDE, dtype=torch.bool)
    n_strokes = torch.randint(1, 4, (n, 1, 1), generator=generator)
    for k in range(3):
        x0, y0, x1, y1, width = *(draw(-0.8, 0.8) for _ in range(4)), draw(0.07, 0.14)
        dx, dy = x1 - x0, y1 - y0
        # distance to the segment: project onto it, clamp to its ends
        t = (((xx - x0) * dx + (yy - y0) * dy) / (dx ** 2 + dy ** 2 + 1e-6)).clamp(0, 1)
        distance = ((xx - x0 - t * dx) ** 2 + (yy - y0 - t * dy) ** 2).sqrt()
        ink |= (distance <= width) & (k < n_strokes)
    shade = contrast(generator, n)
    pixel_noise = 0.1 * torch.randn(n, SIDE, SIDE, generator=generator)
    return quantise(background + ink * shade + pixel_noise)


def smooth(n, generator):
    draw = functools.partial(uniform, generator, n)
    xx, yy = grid()
    image = draw(0.1, 0.6).expand(n, SIDE, SIDE).clone()
    for _ in range(2):
        cx, cy, width = draw(-0.8, 0.8), draw(-0.8, 0.8), draw(0.3, 0.8)
        bump = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width ** 2))
        image += draw(-0.25, 0.25) * bump
    return quantise(image)


def make_set(name, n, seed):
    """(n, 784) uint8, a function of (name, n, seed)."""
    make = dict(train=shapes, test=shapes, strokes=strokes, smooth=smooth,
                constant=lambda n, g: quantise(uniform(g, n, 0.1, 0.6).expand(n, SIDE, SIDE)),
                noise=lambda n, g: quantise(torch.rand(n, SIDE, SIDE, generator=g)),
                inverted=lambda n, g: 255 - shapes(n, g),
                less_noisy=lambda n, g: shapes(n, g, noise=0.02),
                cross=lambda n, g: shapes(n, g, kinds=("cross",)))
    return make[name](n, stream(seed, name))

# ---- the paper's pair: FashionMNIST and MNIST, IDX files pinned in train.DATASETS


@functools.lru_cache(maxsize=None)  # every seed re-uses the files
def load_idx(name, data_dir):
    return parse_idx(gzip.decompress(download(name, data_dir).read_bytes()))


def parse_idx(raw):
    """IDX -> (n, 784) uint8: big-endian int32s 0x803, n, rows, columns, pixels."""
    magic, n, rows, columns = (int.from_bytes(raw[i:i + 4], "big") for i in range(0, 16, 4))
    if magic != 0x803 or rows * columns != D or len(raw) != 16 + n * D:
        raise DataError(f"not 28x28 IDX images: {magic:#x}, {n} x {rows} x {columns}")
    return torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).reshape(n, D)


def load_data(cfg):
    """{set: (n, 784) uint8}: train; fit and eval, halves of the ID test split; the OOD sets (real
    data: the other dataset, constant, noise, inverted training images)."""
    n, seed = cfg.n_ood, cfg.seed
    if cfg.data == "shapes":
        train_x, test_x = make_set("train", cfg.n_train, seed), make_set("test", cfg.n_test, seed)
        ood = {name: make_set(name, n, seed) for name in OOD_SETS}
    else:
        other = "mnist" if cfg.data == "fashionmnist" else "fashionmnist"
        train_x = load_idx(f"{cfg.data}-train", cfg.data_dir)
        test_x = load_idx(f"{cfg.data}-test", cfg.data_dir)
        if cfg.n_train > len(train_x) or max(cfg.n_test, n) > len(test_x):
            raise DataError(f"--n_train <= {len(train_x)}, --n_test, --n_ood <= {len(test_x)}")
        ood = {other: load_idx(f"{other}-test", cfg.data_dir)[:n],
               "constant": make_set("constant", n, seed), "noise": make_set("noise", n, seed),
               "inverted": 255 - train_x[-n:]}
        # shuffled: exchangeable halves
        test_x = test_x[torch.randperm(len(test_x), generator=stream(seed, "real"))][:cfg.n_test]
        train_x = train_x[:cfg.n_train]
    half = cfg.n_test // 2
    return dict(train=train_x, fit=test_x[:half], eval=test_x[half:], **ood)

# ---- the experiment: train each model, fix the diffusion timestep, score every set


def training_loss(kind, cfg, noise_dim):
    """loss_fn(model, rows): rows are images or dict(x, noise[, t])."""
    def loss_fn(model, rows):  # noise from the RNG that train() seeds
        given = rows if isinstance(rows, dict) else dict(x=rows)
        x, noise, t = given["x"], given.get("noise"), given.get("t")
        if noise is None:
            draw = torch.rand if kind == "flow" else torch.randn
            noise = draw(len(x), noise_dim, device=x.device)
        if kind != "diffusion":
            return model(x, noise).mean(), {}
        if t is None:  # the DDPM objective: every timestep
            t = torch.randint(cfg.diff_T, (len(x),), device=x.device)
        return model(x, noise, t).mean(), {}
    return loss_fn


def fit_model(kind, cfg, ctx, train_x):
    """Maximum likelihood (or the DDPM loss) on ID images."""
    torch.manual_seed(cfg.seed)  # the initial weights
    model, images = build(kind, cfg), train_x.float() / 255

    def get_batch(step):
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        return images[torch.randint(len(images), (cfg.batch_size,), generator=generator)]

    loss_fn = training_loss(kind, cfg, model.noise_dim)
    summary = train(model, get_batch, loss_fn, cfg, ctx, ckpt_path=False, desc=kind, quiet=True)
    return model.eval(), summary


def device_scores(model, images, seed, name, groups, chunk=250, draws=1):
    """Losses (N,), features {B: (N // B, P)}, float64 on the model's device; a loss is a mean
    over `draws` draws fixed by (seed, set name)."""
    lcm = math.lcm(*groups)
    chunk, n = max(lcm, chunk // lcm * lcm), len(images) // lcm * lcm
    x = images[:n].float() / 255
    noise = model.draw_noise(n * draws, stream(seed, f"noise/{name}"))
    device = next(model.parameters()).device
    # an example is `draws` rows: its mean loss's gradient is theirs / draws
    rows = [B * draws for B in groups]
    features, losses = {B: [] for B in groups}, []
    for i in range(0, n, chunk):  # bounds the activations' memory
        x_rows = x[i:i + chunk].repeat_interleave(draws, 0).to(device)
        noise_rows = noise[i * draws:(i + chunk) * draws].to(device)
        chunk_features, chunk_losses = fast_sq_norms(model, x_rows, noise_rows, rows)
        for B, r in zip(groups, rows):
            features[B].append(chunk_features[r].double() / draws ** 2)
        losses.append(chunk_losses.double().unflatten(0, (-1, draws)).mean(1))
    return torch.cat(losses), {B: torch.cat(features[B]) for B in groups}


def score_set(*args, **kwargs):  # device_scores on the host, in one device sync
    losses, features = device_scores(*args, **kwargs)
    parts = [losses, *features.values()]
    host = torch.cat([p.flatten() for p in parts]).cpu().split([p.numel() for p in parts])
    return host[0], {B: h.view_as(f) for (B, f), h in zip(features.items(), host[1:])}


TIMESTEPS = [0, 2, 5, 10, 20, 50, 100, 200, 300, 500, 700, 999]


@torch.no_grad()
def device_timestep_table(model, images, seed):
    """{(t, column): 0-dim tensor on the model's device}."""
    device = next(model.parameters()).device
    x, table = (images.float() / 255).to(device), {}
    for t in [t for t in TIMESTEPS if t < len(model.alpha_bar)]:
        generator = stream(seed, f"timestep/{t}")
        noise1, noise2 = (model.draw_noise(len(x), generator).to(device) for _ in range(2))
        steps = torch.full((len(x),), t, dtype=torch.long, device=device)
        loss1, loss2 = (model(x, e, steps).double() for e in (noise1, noise2))
        x1, x2 = (model.noised(x, e, steps).double() for e in (noise1, noise2))
        slope = ((x1 - x1.mean()) * (noise1 - noise1.mean())).mean() / x1.var()
        linear = slope * (x2 - x1.mean()) + noise1.mean() - noise2
        a, b = loss1 - loss1.mean(), loss2 - loss2.mean()  # Pearson's r (corrcoef syncs)
        table.update({(t, "denoiser"): loss2.mean(), (t, "linear"): linear.abs().mean(),
                      (t, "retest"): (a * b).sum() / (a.pow(2).sum() * b.pow(2).sum()).sqrt()})
    return table


def timestep_table(model, images, seed):
    """Per t on ID images: eps-error of the denoiser and of the best linear predictor a x_t + b
    (fitted on one noise draw, judged on another); the loss's test-retest r."""
    rows = {}
    for (t, column), value in to_host(device_timestep_table(model, images, seed)).items():
        rows.setdefault(t, dict(t=t))[column] = value
    return list(rows.values())


def pick_timestep(rows):
    """The most reliable t where the denoiser beats the linear predictor, else the closest."""
    good = [r for r in rows if r["denoiser"] < r["linear"]]
    if good:
        return max(good, key=lambda r: r["retest"])["t"]
    return min(rows, key=lambda r: r["denoiser"] / r["linear"])["t"]


def run_model(kind, cfg, ctx, sets, names):
    model, summary = fit_model(kind, cfg, ctx, sets["train"])
    record = dict(model=kind, params=count_params(model), train_seconds=summary["seconds"],
                  final_train_loss=summary["history"][-1]["loss"])
    if kind == "diffusion":
        record["timesteps"] = timestep_table(model, sets["fit"], cfg.seed)
        chosen = pick_timestep(record["timesteps"])
        model.t_score = record["t"] = chosen if cfg.diff_t == "auto" else int(cfg.diff_t)
    losses, features = {}, {}
    for name in tqdm(["fit", "eval"] + names, desc=f"{kind} scores", leave=False):
        losses[name], features[name] = score_set(
            model, sets[name], cfg.seed, name, cfg.batch_size_list, draws=cfg.draws)
    record["mean_loss"] = {k: float(v.mean()) for k, v in losses.items()}
    return record, detect(losses, features, cfg.batch_size_list, names)


def run_one(cfg, ctx):
    sets = load_data(cfg)
    names = [k for k in sets if k not in ("train", "fit", "eval")]
    print(f"seed {cfg.seed}, images: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    records, rows, scores = [], [], {}
    for kind in cfg.model_list:
        record, scores[kind] = run_model(kind, cfg, ctx, sets, names)
        rows += [dict(model=kind, **row)
                 for row in evaluate(scores[kind], cfg.batch_size_list, names)]
        records.append(record)
        print(describe(record))
    return dict(seed=cfg.seed, records=records, rows=rows, scores=scores, names=names, sets=sets)


def describe(record):
    unit = dict(flow="bits/dim", diffusion="L1 eps-error").get(record["model"], "nats/image")
    means = ", ".join(f"{k} {v:.3f}" for k, v in record["mean_loss"].items() if k != "fit")
    line = (f"  {record['model']} ({record['params']:,} parameters, final train loss "
            f"{record['final_train_loss']:.3f}) mean loss ({unit}): {means}")
    if "t" in record:
        r = next(r for r in record["timesteps"] if r["t"] == record["t"])
        line += (f"\n    scored at t={r['t']}: eps-error {r['denoiser']:.3f}, best linear "
                 f"predictor's {r['linear']:.3f}; test-retest r {r['retest']:.2f}")
    return line

# ---- below: statistics, report, figure, bench: not needed to learn the paper


def midranks(values):  # 1-based ranks, ties sharing their mean rank
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse]


def placements(id_scores, ood_scores):
    """DeLong's v10_i = P(OOD < ID score i), v01_j = P(ID > OOD score j), ties 1/2: both mean the
    AUROC P(ID score > OOD score), their variances give its SE. NaN ranks lowest."""
    a, b = (np.where(np.isnan(s), -np.inf, s).astype(np.float64) for s in (id_scores, ood_scores))
    ranks = midranks(np.concatenate([a, b]))
    v10 = (ranks[:len(a)] - midranks(a)) / len(b)  # rank in all - in ID = OOD below
    return v10, 1 - (ranks[len(a):] - midranks(b)) / len(a)


def delong_se(v10, v01):  # the SE of a mean of placements (DeLong 1988)
    return math.sqrt(np.var(v10, ddof=1) / len(v10) + np.var(v01, ddof=1) / len(v01))


def evaluate(scores, groups, names):
    """A row per (OOD set, B): AUROCs, DeLong SEs; gradient - typicality, its SE from the paired
    placements `phi` (per cluster of lcm(B) images)."""
    unit, rows = math.lcm(*groups), []
    for B, name in [(B, name) for B in groups for name in names]:
        row, parts = dict(ood=name, B=B, auroc={}, se={}), {}
        for method in METHODS:
            v10, v01 = placements(scores[B]["eval"][method], scores[B][name][method])
            parts[method] = [v.reshape(-1, unit // B).mean(1) for v in (v10, v01)]
            row["auroc"][method], row["se"][method] = v10.mean(), delong_se(*parts[method])
        row["phi"] = tuple(g - t for g, t in zip(parts["gradient"], parts["typicality"]))
        row["diff"] = row["auroc"]["gradient"] - row["auroc"]["typicality"]
        rows.append(dict(row, diff_se=delong_se(*row["phi"])))
    return rows


def pooled_difference(rows):
    """Mean gradient - typicality over rows of ONE seed and its DeLong SE; rows share images."""
    phi_id = sum(r["phi"][0] for r in rows) / len(rows)
    var = np.var(phi_id, ddof=1) / len(phi_id)
    for name in dict.fromkeys(r["ood"] for r in rows):
        phi = sum(r["phi"][1] for r in rows if r["ood"] == name) / len(rows)
        var += np.var(phi, ddof=1) / len(phi)
    return float(np.mean([r["diff"] for r in rows])), math.sqrt(var)


def verdict(mean, half):
    return "better" if mean - half > 0 else "worse" if mean + half < 0 else "indistinguishable"


def summarise(runs):
    """95% intervals (over seeds, or one seed's DeLong) and verdicts per pairing and for the mean
    difference per model and overall."""
    def interval(values, ses):  # one seed: SE 0 (perfect separation) is known
        return mean_interval(values, shared_se=ses[0] if len(runs) == 1 else None)

    pairings = []
    for same in zip(*[run["rows"] for run in runs]):
        first = same[0]
        auc = {m: interval([r["auroc"][m] for r in same], [r["se"][m] for r in same])
               for m in METHODS}
        diff = interval([r["diff"] for r in same], [r["diff_se"] for r in same])
        pairings.append(dict(model=first["model"], ood=first["ood"], B=first["B"], auroc=auc,
                             diff=diff, verdict=verdict(*diff)))
    pooled = {}
    for kind in ["all"] + list(dict.fromkeys(p["model"] for p in pairings)):
        per_seed = [pooled_difference([r for r in run["rows"] if kind in ("all", r["model"])])
                    for run in runs]
        mean, half = interval(*zip(*per_seed))
        pooled[kind] = dict(
            mean=mean, half=half, verdict=verdict(mean, half), per_seed=[d for d, _ in per_seed])
    return dict(seeds=[run["seed"] for run in runs], pairings=pairings, pooled=pooled)


def table(summary):
    how = "a t-interval over seeds" if len(summary["seeds"]) > 1 else "DeLong, test noise only"
    lines = [f"AUROC (ID = positive), mean over seeds {summary['seeds']} +- 95% half-width "
             f"({how})",
             "model         OOD set     B   likelihood  typicality    gradient      grad - typ"
             "  verdict"]
    for p in summary["pairings"]:
        cells = " ".join(f"{p['auroc'][m][0]:5.3f}+-{p['auroc'][m][1]:.3f}" for m in METHODS)
        lines.append(f"{p['model']:13s} {p['ood']:10s} {p['B']:2d}  {cells}  "
                     f"{p['diff'][0]:+6.3f}+-{p['diff'][1]:.3f}  {p['verdict']}")
    return "\n".join(lines)


def verdicts(summary, groups):
    """(lines, dict), read off the intervals."""
    B0, pairings, pooled = min(groups), summary["pairings"], summary["pooled"]
    # likelihood's interval below chance: OOD scored MORE likely
    below = [p for p in pairings if p["B"] == B0 and sum(p["auroc"]["likelihood"]) < 0.5]
    counts = {v: [p["verdict"] for p in pairings].count(v)
              for v in ("better", "worse", "indistinguishable")}
    most = counts["better"] > len(pairings) / 2
    every = pooled["all"]
    lines = [
        f"Nalisnick effect (raw likelihood AUROC interval entirely below 0.5 at B={B0}: OOD "
        f"scored MORE likely): {'YES' if below else 'NO'}"
        + "".join(f", {p['model']}/{p['ood']} {p['auroc']['likelihood'][0]:.2f}" for p in below),
        f"Gradient score vs typicality, mean AUROC difference over all {len(pairings)} "
        f"pairings: {every['mean']:+.3f} +- {every['half']:.3f}: {every['verdict'].upper()} "
        f"(per seed: {' '.join(f'{d:+.3f}' for d in every['per_seed'])})",
        "Gradient better than typicality on most pairings (paper's claim), by per-pairing 95% "
        f"intervals: {'YES' if most else 'NO'} (better {counts['better']}, "
        f"worse {counts['worse']}, indistinguishable {counts['indistinguishable']})"]
    for kind, v in list(pooled.items())[1:]:
        mine = [p["verdict"] for p in pairings if p["model"] == kind]
        lines.append(f"  {kind:13s} mean difference {v['mean']:+.3f} +- {v['half']:.3f}: "
                     f"{v['verdict']:17s} (pairings: {mine.count('better')} better, "
                     f"{mine.count('worse')} worse of {len(mine)})")
    return lines, dict(nalisnick=bool(below), pairing_verdicts=counts, most_pairings=most,
                       likelihood_below_chance=[f"{p['model']}/{p['ood']}" for p in below])


def report(cfg, ctx, runs, t_start):
    summary = summarise(runs)
    lines, out = verdicts(summary, cfg.batch_size_list)
    print(f"\n{table(summary)}\n\nverdict:\n  " + "\n  ".join(lines))
    per_seed = [dict(seed=r["seed"], records=r["records"],
                     rows=[{k: v for k, v in row.items() if k != "phi"} for row in r["rows"]])
                for r in runs]
    results = dict(runs=per_seed, summary=summary, verdict=out, seconds=time.time() - t_start)
    path = save_results(cfg, ctx, results)
    figures = [plot(cfg, runs[0]["scores"], runs[0]["names"]), plot_samples(cfg, runs[0]["sets"])]
    print(f"\nwrote {', '.join(str(f) for f in [path, *figures] if f)} in "
          f"{time.time() - t_start:.0f}s")
    return out


def panel_values(scores, method, names):
    """{set: values}: -loss near the ID range; log10 of the gradient score's distance below the
    best ID score."""
    low, high = np.percentile(scores["eval"]["likelihood"], [1, 99])
    shown = {}
    for name in names:
        values = scores[name][method]
        if method == "gradient":
            values = np.log10(1 + np.clip(scores["eval"]["gradient"].max() - values, 0, 1e300))
        else:
            values = values[(values >= 2 * low - high) & (values <= 2 * high - low)]
        shown[name] = values[np.isfinite(values)]
    return shown


def plot(cfg, scores_by_model, ood_names):
    """B = 1 score histograms: a row per model, a colour per set, a legend per panel."""
    B, names = min(cfg.batch_size_list), ["eval"] + ood_names
    xlabels = dict(likelihood="-loss", gradient="log10(1 + best ID score - gradient score)")

    def draw(plt):
        fig, axes = plt.subplots(
            len(scores_by_model), 2, squeeze=False, figsize=(12, 3.2 * len(scores_by_model)))
        for row, (kind, scores) in zip(axes, scores_by_model.items()):
            for ax, method in zip(row, ("likelihood", "gradient")):
                shown = panel_values(scores[B], method, names)
                every = np.concatenate(list(shown.values()))
                bins = np.linspace(every.min(), every.max() + 1e-9, 60)  # shared by the sets
                for colour, name in enumerate(names):
                    label = "ID (eval)" if name == "eval" else name
                    if len(shown[name]) == 0:  # listed all the same
                        ax.plot([], [], f"C{colour}", label=f"{label} (off the axis)")
                        continue
                    heights = ax.hist(shown[name], bins, density=True, color=f"C{colour}",
                                      histtype="step" if colour else "stepfilled",
                                      alpha=1 if colour else 0.4, label=label)[0]
                    if not colour:  # narrow OOD spikes cut at 3x the ID peak
                        ax.set_ylim(0, 3 * heights.max())
                ax.set(title=f"{kind}: {method}", xlabel=xlabels[method], ylabel="density")
                ax.legend(fontsize=6)
        fig.suptitle(f"scores at B={B}: ID evaluation half vs each OOD set")
        fig.tight_layout()
        return fig

    return save_figure(Path(cfg.out) / "score_histograms.png", draw)


def plot_samples(cfg, sets):
    columns = min(8, *map(len, sets.values()))

    def draw(plt):
        fig, axes = plt.subplots(
            len(sets), columns, squeeze=False, figsize=(0.9 * columns + 0.6, 0.95 * len(sets)))
        for row, (name, images) in zip(axes, sets.items()):
            for ax, image in zip(row, images):
                ax.imshow(image.reshape(SIDE, SIDE).numpy(), cmap="gray", vmin=0, vmax=255)
                ax.set(xticks=[], yticks=[])
            row[0].set_ylabel(name, fontsize=8)
        fig.tight_layout(pad=0.2)
        return fig

    return save_figure(Path(cfg.out) / "samples.png", draw)


def bench(cfg, ctx):
    """B = 1 norms of fresh models (speed does not depend on weights): the fast path, a loop, one
    batched backward (the floor of any per-example method)."""
    x = (make_set("test", cfg.batch_size, cfg.seed).float() / 255).to(ctx.device)
    print(f"{len(x)} images, {torch.get_num_threads()} thread(s)")
    for kind in cfg.model_list:
        torch.manual_seed(cfg.seed)
        model = build(kind, cfg).to(ctx.device).eval()
        noise = model.draw_noise(len(x), stream(cfg.seed, "bench")).to(ctx.device)

        def sq_norms(rows):  # (P,) by a plain backward
            grads = torch.autograd.grad(model(x[rows], noise[rows]).sum(), [*model.parameters()])
            return torch.stack([grad.pow(2).sum() for grad in grads])

        calls = dict(fast=lambda: fast_sq_norms(model, x, noise)[0][1],
                     loop=lambda: torch.stack([sq_norms([i]) for i in range(len(x))]),
                     backward=lambda: sq_norms(slice(None)))
        ms, out = {}, {}
        for name, call in calls.items():
            times = []
            for _ in range(4):  # a warm-up call, then the best of 3
                start = time.perf_counter()
                out[name] = call()
                if ctx.gpu:
                    torch.cuda.synchronize()
                times.append(1e3 * (time.perf_counter() - start))
            ms[name] = min(times[1:])
        difference = ((out["fast"] - out["loop"]).abs() / out["loop"].clamp_min(1e-30)).max()
        print(f"  {kind:13s} " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
              + f": loop/fast {ms['loop'] / ms['fast']:.1f}x, fast/backward "
              f"{ms['fast'] / ms['backward']:.2f}x, max relative difference {difference:.0e}")


def main(argv=None):
    cfg = parse_config(Config, "fisher_ood", argv)
    ctx = setup(cfg)
    if cfg.bench:
        return bench(cfg, ctx)
    t_start = time.time()
    # each seed: new data, initial weights, batches and noise
    runs = [run_one(dataclasses.replace(cfg, seed=cfg.seed + i), ctx) for i in range(cfg.seeds)]
    report(cfg, ctx, runs, t_start)


if __name__ == "__main__":
    cli(main)
