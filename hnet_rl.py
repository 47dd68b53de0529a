"""
hnet_rl.py: learning where to cut bytes into chunks by reinforcement learning (Dauncey &
Wattenhofer, "You Can Learn Tokenization End-to-End with Reinforcement Learning", arXiv
2602.13940), against H-Net's differentiable chunking (Hwang, Wang & Gu, arXiv 2507.07955) and
fixed rules. Claim: each byte's "does a chunk start here?" as a Bernoulli action trained by
REINFORCE learns word-like boundaries (0.99 of whitespace bytes get one) and a lower bits-per-byte
than random or fixed-stride chunks at the same compression.

The method in one screen. A byte U-Net (ChunkedByteLM.forward): encoder byte blocks ->
boundaries b_t (b_0 = 1) -> the encoder vectors at boundaries -> main blocks over the chunks ->
byte t gets the output of the latest chunk starting at or before t -> decoder byte blocks -> LM
head; an early-exit head reads the encoder. Only the boundary module differs between methods:
  rl    BoundaryPolicy: pi(b_t = 1) = sigmoid(logit_t), logit_t = softcap(s W x_t + logit(rho))
        reward r_t = CE_early,t - CE_final,t; A = r - its batch mean at each position
        discounted_returns: G_t = sum_k gamma^k A_{t+k}; policy_loss: -lambda_g mean(G log pi)
        + lambda_c mean(logit) stopgrad(mean p - rho), holding the rate at rho = 0.2
  hnet  hnet_boundaries: p_t = (1 - cos(W_q x_{t-1}, W_k x_t)) / 2, b_t = [p_t > 0.5];
        smooth_chunks (an EMA over chunks), ratio_loss
  uniform, fixed, space (`the|_cat`), after (`the_|cat`), bpe: rule_boundaries, given b
LM loss 0.9 CE_final + 0.1 CE_early. Reported: held-out bits per byte; ws_at, the share of
whitespace bytes where a chunk starts (the paper's figure), against chance at the same rate.
  python hnet_rl.py [--methods=all] [--ablations] [--gpu]   # the README: results
"""
import collections, dataclasses, heapq, math, re, time, zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from train import (TrainConfig, parse_config, setup, die, fill_auto, Block, rope_angles,
                   count_params, train, save_results, save_figure, embedded_text, download,
                   cli, init_weights, Attention, mean_interval)

METHODS = ("rl", "hnet", "uniform", "fixed", "space", "after", "bpe")
ABLATIONS = {  # name -> overrides of the rl config (the authors' ablation table)
    "rl:gamma=1": dict(gamma=1.0),
    "rl:no-batch-adv": dict(batch_adv=False),
    "rl:no-early-reward": dict(early_reward=False),
    "rl:no-rate-control": dict(lambda_c=0.0, rate_offset="off"),
    "rl:paper-gate": dict(gate_scale=1 / 16),
    "rl:no-rate-offset": dict(rate_offset="off"),  # the paper's rate control
}
WHITESPACE = (9, 10, 13, 32)  # \t \n \r space
RATE_OFFSET_LR = 0.5  # rl --rate_offset=on: the offset's step per unit of rate error
CHUNK_BUCKET = 64  # compiled code: chunk counts are multiples of this
EARLY_WEIGHT = 0.1  # the early-exit head's share of the LM loss
LAMBDA_G = 0.01  # rl: weight of the policy-gradient loss
RATIO_WEIGHT = 0.03  # hnet: weight of the ratio loss
BPE_VOCAB = 4096  # bpe: tokens of the BPE whose token starts are the boundaries


@dataclass
class Config(TrainConfig):
    methods: str = "rl space after"  # methods trained with the same seeds and budget (all = every)
    seeds: int = 0  # seeds per method from --seed (0 = 3 on CPU, 1 with --gpu)
    ablations: bool = False  # also train the rl ablations of the authors' table
    data: str = "auto"  # auto (prose; enwik8 with --gpu) | prose | enwik8 | tinyshakespeare | file
    rate: float = 0.2  # target boundaries per byte (1/rate bytes per chunk)
    n_embd: int = 0  # model width (0: 128 on CPU, 768 with --gpu)
    n_head: int = 0  # attention heads (0: 4 on CPU, 12 with --gpu)
    n_enc: int = 0  # encoder byte blocks (0: 1 on CPU, 4 with --gpu)
    n_main: int = 0  # main blocks over chunks (0: 2 on CPU, 12 with --gpu)
    n_dec: int = 0  # decoder byte blocks (0: 1 on CPU, 4 with --gpu)
    window: int = 64  # byte blocks' attention window (0 = full causal attention)
    byte_mlp: int = 0  # byte blocks' MLP width / n_embd (0: 4 on CPU, the authors' 1 with --gpu)
    seq_len: int = 0  # bytes per training sequence (0: 256 on CPU, 4096 with --gpu)
    batch_size: int = 0  # sequences per optimizer step (0: 16 on CPU, 128 with --gpu)
    grad_accum: int = 0  # micro-steps per optimizer step (0: 1 on CPU, 4 with --gpu)
    max_steps: int = 0  # optimizer steps per method (0: 400 on CPU, 12000 with --gpu)
    lr: float = 0.0  # peak learning rate (0: 2e-3 on CPU, 1.5e-3 with --gpu)
    warmup: int = 0  # warm-up steps (0: 30 on CPU, 300 with --gpu)
    gamma: float = 0.99  # rl: discount of the reward-to-go (1 = undiscounted)
    lambda_c: float = 0.01  # rl: weight of the rate-control (consistency) loss
    rate_offset: str = "auto"  # rl: on = a logit offset steered by the rate (auto: on on CPU)
    gate_scale: float = 0.0  # rl: scale s of the gate logits (0: 4 on CPU, 1/16 with --gpu)
    batch_adv: bool = True  # rl: subtract the per-position batch mean from the reward
    early_reward: bool = True  # rl: reward = CE_early - CE_final (false: -CE_final)
    eval_every: int = 0  # steps between held-out evaluations (0: max_steps / 6)
    eval_windows: int = 128  # held-out sequences of seq_len bytes per evaluation

    def __post_init__(self):
        fill_auto(self, data=("prose", "enwik8"), n_embd=(128, 768), n_head=(4, 12),  # CPU | paper
                  n_enc=(1, 4), n_main=(2, 12), n_dec=(1, 4), seq_len=(256, 4096),
                  batch_size=(16, 128), max_steps=(400, 12000), lr=(2e-3, 1.5e-3), warmup=(30, 300),
                  gate_scale=(4.0, 1 / 16), grad_accum=(1, 4), byte_mlp=(4, 1),
                  rate_offset=("on", "off"))
        self.seeds = self.seeds or (1 if self.gpu else 3)
        super().__post_init__()
        self.eval_every = self.eval_every or max(1, self.max_steps // 6)
        names = METHODS if self.methods == "all" else self.methods.replace(",", " ").split()
        self.methods = " ".join(dict.fromkeys(names))  # in order, each once
        for message, ok in {
                f"--methods: some of {' '.join(METHODS)}, or all": set(names) <= set(METHODS),
                "--rate must be in (0, 1)": 0 < self.rate < 1,
                "--gamma must be in (0, 1]": 0 < self.gamma <= 1,
                "--rate_offset must be on, off or auto": self.rate_offset in ("on", "off"),
                "--n_embd / --n_head must be even": self.n_embd % (2 * self.n_head) == 0,
                "need --methods, --eval_windows >= 1 and --seq_len >= 8":
                    min(len(names), self.eval_windows, self.seq_len - 7) >= 1,
                "--seed + --seeds must be <= 2^32": self.seed + self.seeds <= 2**32}.items():
            if not ok:
                raise ValueError(message)


# ---- the boundary policy: sampled actions, discounted returns, REINFORCE


class BoundaryPolicy(nn.Module):
    """pi(a_t = 1 | x_<=t) = sigmoid(logit_t), logit_t = softcap(s W x_t + logit(rho) + offset):
    the authors' gater with window 1 (their `sequential_filter1`): given the bytes, the actions
    are independent."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.n_embd, 1)  # with a bias, as the authors' gater
        nn.init.normal_(self.gate.weight, 0.0, 0.02)
        nn.init.zeros_(self.gate.bias)  # zero bias: the policy starts exactly at the target rate
        # a non-learned logit offset steered by the realised rate (--rate_offset)
        self.register_buffer("offset", torch.zeros(()))

    def forward(self, h, noise):
        """a_t ~ Bernoulli(pi_t) = [noise_t < pi_t], sampled without gradient; log pi(a_t) with
        gradient. h (B, L, C), noise (B, L) uniform -> b, gate_logits, p, logp (B, L)."""
        rho = self.cfg.rate
        logits = self.cfg.gate_scale * self.gate(h).float()[..., 0] + math.log(rho / (1 - rho))
        logits = 6 * torch.tanh((logits + self.offset) / 6)  # softcap: (B, L) in (-6, 6)
        p = torch.sigmoid(logits)
        with torch.no_grad():
            a = p > noise
            a[:, 0] = True  # forced: the first byte starts a chunk (no gradient: masked below)
        logp = torch.where(a, F.logsigmoid(logits), F.logsigmoid(-logits))  # log pi(a_t)
        if self.training and self.cfg.rate_offset == "on":  # integral control of the rate
            with torch.no_grad():  # moves the next step's logits, not these
                self.offset -= RATE_OFFSET_LR * (global_mean(a[:, 1:].float()) - self.cfg.rate)
        # gate_logits, not logits (the LM head's key): the rate control must reach the gate
        return dict(b=a, gate_logits=logits, p=p, logp=logp)


def discounted_returns(adv, gamma):
    """G_t = sum_{k>=0} gamma^k A_{t+k} along dim 1, as one matmul with an upper-triangular
    matrix of discounts Gamma[k, t] = gamma^(k - t) for k >= t. adv (B, L) -> (B, L)."""
    L = adv.shape[1]
    t = torch.arange(L, device=adv.device, dtype=torch.float64)
    lag = t[:, None] - t[None, :]  # [k, t] = k - t
    zero = torch.zeros((), dtype=torch.float64, device=adv.device)
    discounts = torch.where(lag >= 0, gamma ** lag.clamp(min=0), zero)
    return (adv.double() @ discounts).to(adv.dtype)


def policy_loss(out, ce_final, ce_early, cfg):
    """REINFORCE on detached rewards (the policy learns only through log pi). The early-exit CE
    does not depend on the actions: a baseline removing 'this byte is hard anyway'."""
    r = (ce_early - ce_final) if cfg.early_reward else -ce_final
    adv = r.detach()
    if cfg.batch_adv:  # relative to the other sequences at that position (all ranks')
        adv = adv - global_mean(adv, 0, keepdim=True)
    G = discounted_returns(adv, cfg.gamma)  # the action at t affects every later prediction
    logp = out["logp"][:, 1:]  # b_0 is forced: no gradient for it
    pg = -(G[:, 1:] * logp).mean()
    # rate control: all logits down when the policy fires too often, up when too rarely
    rate_gap = (global_mean(out["p"][:, 1:]) - cfg.rate).detach()
    consistency = out["gate_logits"][:, 1:].mean() * rate_gap
    return LAMBDA_G * pg + cfg.lambda_c * consistency, dict(pg=pg.detach(), ret_std=G.std())


# ---- the byte U-Net: chunk, run the main blocks over chunks, give bytes their chunk's output


def chunk_capacity(L, rate):
    """Chunks a row of L bytes holds at `rate` + 4 standard deviations, rounded up to
    CHUNK_BUCKET, at most L: a held rate exceeds it ~1 step in 1000 at 32 rows."""
    rate = min(rate, 1.0)
    mean, sd = L * rate, math.sqrt(L * rate * (1 - rate))
    return min(L, -(-int(mean + 4 * sd) // CHUNK_BUCKET) * CHUNK_BUCKET)


# data-dependent: the one graph break of the forward; what follows sees only M
@torch.compiler.disable
def chunk_index(b, rate=None):
    """b (B, L) bool, b[:, 0] = 1 -> idx (B, M): the boundaries' byte positions in order, M =
    the most in any row. Compiled code (a new M is a recompile) passes the target rate: M is the
    first of chunk_capacity at rate, 2 rate, 4 rate, ... that holds every row (4096 bytes at 0.2:
    960, then 1792). Padding comes *after* a row's real chunks: causal attention keeps it unseen."""
    M = int(b.sum(1).max())  # the forward's one host sync: the shapes depend on the data
    if rate is not None:
        while chunk_capacity(b.shape[1], rate) < M:
            rate *= 2
        M = chunk_capacity(b.shape[1], rate)
    order = torch.sort((~b).to(torch.uint8), dim=1, stable=True).indices  # boundaries first
    return order[:, :M]  # (B, M)


def owner_chunk(b):
    """Chunk index of every byte: the latest boundary at or before t. (B, L)"""
    return b.long().cumsum(1) - 1


def downsample(x, idx):  # x (B, L, C), idx (B, M) -> (B, M, C)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def upsample(z, b):  # z (B, M, C) chunk outputs -> (B, L, C): byte t gets its owner chunk's vector
    return z.gather(1, owner_chunk(b)[..., None].expand(-1, -1, z.shape[-1]))


class ChunkedByteLM(nn.Module):
    def __init__(self, cfg, method):
        super().__init__()
        C, H = cfg.n_embd, cfg.n_head
        self.cfg, self.method, self.head_dim = cfg, method, C // H
        self.wte = nn.Embedding(256, C)
        self.encoder = nn.ModuleList(byte_block(C, H, cfg.window, cfg.byte_mlp)
                                     for _ in range(cfg.n_enc))
        self.main = nn.ModuleList(Block(C, H) for _ in range(cfg.n_main))  # over chunks, causal
        self.decoder = nn.ModuleList(byte_block(C, H, cfg.window, cfg.byte_mlp)
                                     for _ in range(cfg.n_dec))
        self.norm_enc, self.norm = nn.LayerNorm(C, bias=False), nn.LayerNorm(C, bias=False)
        self.early_head = nn.Linear(C, 256, bias=False)  # early exit: sees only the encoder
        self.lm_head = nn.Linear(C, 256, bias=False)
        init_weights(self, cfg.n_enc + cfg.n_main + cfg.n_dec)
        if method == "hnet":  # identity init: p_t starts as a pure cosine novelty detector
            self.q_proj, self.k_proj = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
            for proj in (self.q_proj, self.k_proj):
                proj.weight.data.copy_(torch.eye(C))
        if method == "rl":
            self.policy = BoundaryPolicy(cfg)

    def hnet_boundaries(self, h):
        """H-Net's routing: p_t = (1 - cos(W_q h_{t-1}, W_k h_t)) / 2, b_t = [p_t > 0.5]."""
        q, k = self.q_proj(h[:, :-1]), self.k_proj(h[:, 1:])  # compare byte t-1 with byte t
        p = 0.5 * (1 - F.cosine_similarity(q.float(), k.float(), dim=-1))  # (B, L-1)
        p = torch.cat([torch.ones_like(p[:, :1]), p.clamp(0, 1)], 1)  # p_0 = 1
        return dict(b=p > 0.5, p=p)

    def boundaries(self, x, h, given_b, noise):
        """b (B, L) bool with b[:, 0] = 1, and what the method's loss needs."""
        if self.method == "rl":
            return self.policy(h, noise)
        if self.method == "hnet":
            return self.hnet_boundaries(h)
        if self.method == "bpe":
            return dict(b=torch.cat([torch.ones_like(given_b[:, :1]), given_b[:, 1:]], 1))
        return dict(b=rule_boundaries(self.method, x, noise, self.cfg.rate))

    def forward(self, x, given_b=None, noise=None):
        """x (B, L) bytes -> dict(logits, early_logits (B, L, 256), b (B, L), the boundary
        module's p / gate_logits / logp). noise (B, L) uniform: the only randomness."""
        B, L = x.shape
        cos, sin = rope_angles(torch.arange(L, device=x.device), self.head_dim)
        h = self.wte(x)  # (B, L, C)
        for block in self.encoder:
            h = block(h, cos, sin)
        hn = self.norm_enc(h)  # what the early head and the boundary modules read
        out = dict(early_logits=self.early_head(hn))
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        out.update(self.boundaries(x, hn, given_b, noise))
        b = out["b"]
        idx = chunk_index(b, self.cfg.rate if torch.compiler.is_compiling() else None)  # (B, M)
        z = downsample(h, idx)  # (B, M, C) the encoder vectors where chunks start
        ccos, csin = rope_angles(idx, self.head_dim)  # RoPE at byte positions: distance in bytes
        for block in self.main:
            z = block(z, ccos, csin)
        if self.method == "hnet":  # smooth over chunks with the boundary probability (dechunk)
            # padding chunks come after every real one: their P changes no output read
            z = smooth_chunks(z, out["p"].gather(1, idx).clamp(1e-4, 1 - 1e-4))
        up = upsample(z, b)  # (B, L, C)
        if self.method == "hnet":  # confidence through a straight-through estimator: value 1
            c = torch.where(b, out["p"], 1 - out["p"])
            up = up * straight_through_one(c)[..., None].to(up.dtype)
        y = h + up  # encoder residual + the main network's word on the current chunk
        for block in self.decoder:
            y = block(y, cos, sin)
        out["logits"] = self.lm_head(self.norm(y))
        return out


def smooth_chunks(z, P):
    """H-Net's dechunk EMA zbar_j = P_j z_j + (1 - P_j) zbar_{j-1} in closed form, zbar_j =
    sum_{i<=j} P_i exp(S_j - S_i) z_i with S_j = sum_{k<=j} log(1 - P_k), in float64 (fp32 would
    lose the difference of two long sums). z (B, M, C), P (B, M) -> (B, M, C)."""
    S = torch.log1p(-P.double()).cumsum(1)  # (B, M)
    causal = torch.ones(P.shape[1], P.shape[1], dtype=torch.bool, device=P.device).tril()  # i <= j
    weights = (S[:, :, None] - S[:, None, :]).masked_fill(~causal, -math.inf).exp() * P[:, None, :]
    with torch.autocast(z.device.type, enabled=False):  # autocast would run this matmul in bf16
        return (weights.float() @ z.float()).to(z.dtype)  # (B, M_j, M_i) @ (B, M_i, C)


def straight_through_one(c):
    """Value exactly 1, gradient d/dc = 1: the confidence c steers the routing without changing
    the forward (c - c.detach() is exactly 0)."""
    return 1.0 + (c - c.detach())


def ratio_loss(b, p, N):
    """H-Net's rate regulariser: N/(N-1) ((N-1) F G + (1-F)(1-G)), F = fraction of boundaries (no
    gradient; over the global batch), G = mean routing probability. Minimal (= 1) when F = G = 1/N.
    The loss is linear in G, so each process's own G averages to the global one under DDP."""
    Fr, G = global_mean(b.float()), p.float().mean()
    return N / (N - 1) * ((N - 1) * Fr * G + (1 - Fr) * (1 - G))


def token_ce(logits, y):  # (B, L, V), (B, L) -> per-byte cross-entropy in nats (B, L)
    return F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")


def loss_fn_for(cfg, method):
    def loss_fn(model, batch):
        x = batch["x"]
        out = model(x[:, :-1], batch.get("b"), batch.get("noise"))  # noise: drawn unless given
        y = x[:, 1:]
        ce_final, ce_early = token_ce(out["logits"], y), token_ce(out["early_logits"], y)
        loss = (1 - EARLY_WEIGHT) * ce_final.mean() + EARLY_WEIGHT * ce_early.mean()
        metrics = dict(bpb=ce_final.mean().detach() / math.log(2), rate=out["b"].float().mean(),
                       items=x.shape[0] * (x.shape[1] - 1))
        if method == "rl":
            extra, more = policy_loss(out, ce_final, ce_early, cfg)
            loss = loss + extra
            metrics.update(more)
        elif method == "hnet":
            loss = loss + RATIO_WEIGHT * ratio_loss(out["b"], out["p"], 1 / cfg.rate)
        return loss, metrics
    return loss_fn


def is_whitespace(x):  # comparisons, not a table lookup: no host-to-device copy per step
    return torch.stack([x == code for code in WHITESPACE]).any(0)


def rule_boundaries(method, x, noise, rate):
    """Boundaries by a rule: uniform, fixed, space or after. x, noise (B, L) -> b (B, L) bool"""
    ws = is_whitespace(x)
    ws_before = F.pad(ws, (1, 0))[:, :-1]  # is byte t-1 whitespace
    if method == "fixed":
        b = torch.arange(x.shape[1], device=x.device).expand_as(x) % round(1 / rate) == 0
    elif method == "uniform":  # exactly k boundaries: 0 and the k-1 largest noises
        k = max(1, round(x.shape[1] * rate))
        b = torch.zeros_like(ws)
        b.scatter_(1, noise[:, 1:].topk(k - 1, dim=1).indices + 1, True)
    elif method == "space":  # a chunk starts at the first byte of each whitespace run: the|_cat
        b = ws & ~ws_before
    else:  # after: a chunk starts at the first byte after each whitespace run: the_|cat
        b = ~ws & ws_before
    b[:, 0] = True
    return b


class LocalAttention(Attention):
    """Causal attention to keys t-window+1 .. t at a cost of L x window, not L^2: blocks of
    `window` queries attend to their own and the previous block's keys, under a band mask."""

    def __init__(self, n_embd, n_head, window):
        super().__init__(n_embd, n_head)
        self.window = window

    def forward(self, x, cos, sin, cache=None):
        W, (B, T, C) = self.window, x.shape
        if not W or W >= T:  # the window covers the whole sequence: plain causal attention
            return super().forward(x, cos, sin)
        q, k, v = self.project(x, cos, sin)  # (B, nh, T, hs)
        nb = -(-T // W)  # blocks of W queries; the tail is padded and cut off again
        q = F.pad(q, (0, 0, 0, nb * W - T)).unflatten(2, (nb, W))  # (B, nh, nb, W, hs)
        # keys of block n: positions (n-1) W .. (n+1) W - 1, with W zero keys in front of block 0
        k, v = (F.pad(t, (0, 0, W, nb * W - T)).unfold(2, 2 * W, W).transpose(-1, -2)
                for t in (k, v))  # (B, nh, nb, 2W, hs)
        r = torch.arange(W, device=x.device)[:, None]  # query offset in its block
        c = torch.arange(2 * W, device=x.device)[None, :]  # key offset (the query's own: r + W)
        band = (c > r) & (c <= r + W)  # key t' with t - W < t' <= t
        first = torch.arange(nb, device=x.device)[:, None, None] > 0  # block 0: W padding keys
        # 4-D, blocks in the head slot, so the fused (flash / memory-efficient) kernels take it
        mask = (band & (first | (c >= W)))[None]  # (1, nb, W, 2W)
        y = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                           attn_mask=mask)
        y = y.unflatten(0, (B, self.n_head)).flatten(2, 3)[:, :, :T]  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def byte_block(C, H, window, mlp_ratio):
    """A Block whose attention is the local attention above."""
    blk = Block(C, H, mlp_ratio=mlp_ratio)
    blk.attn = LocalAttention(C, H, window)
    return blk


def global_mean(x, dim=None, keepdim=False):
    """Mean over every process's rows under torchrun (no gradient through the others' part)."""
    mean = x.mean() if dim is None else x.mean(dim, keepdim=keepdim)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mean
    n = x.numel() / mean.numel()
    total, count = (mean * n).detach(), torch.tensor(n, device=x.device)  # local sum, rows
    dist.all_reduce(total)
    dist.all_reduce(count)
    return total / count


# ---- data: raw bytes, random windows, and (for bpe) token starts precomputed once


def load_bytes(cfg):
    """(train, held-out) bytes: a file's first 90 percent trains, the next 5 are held out
    (enwik8's convention); a corpus too short is refused in one line."""
    if cfg.data == "prose":
        train_bytes, val = embedded_text("train"), embedded_text("val")
    else:
        try:
            if cfg.data == "enwik8":
                with zipfile.ZipFile(download("enwik8", cfg.data_dir)) as archive:
                    raw = archive.read("enwik8")
            elif cfg.data == "tinyshakespeare":
                raw = download(cfg.data, cfg.data_dir).read_bytes()
            else:
                raw = open(cfg.data, "rb").read()
        except (OSError, RuntimeError, zipfile.BadZipFile, KeyError) as e:
            die(f"cannot load --data={cfg.data}: {e}")
        cut = int(0.9 * len(raw))
        train_bytes, val = raw[:cut], raw[cut: cut + max(len(raw) // 20, 20 * cfg.seq_len)]
    if len(val) < 8 * cfg.seq_len + 1 or len(train_bytes) < 2 * cfg.seq_len:
        die(f"--data={cfg.data} is too short for --seq_len={cfg.seq_len}: {len(train_bytes):,} "
            f"training and {len(val):,} held-out bytes (need {8 * cfg.seq_len + 1:,} held out)", 2)
    return train_bytes, val


# GPT-2's pre-tokenizer split in ASCII classes, so that Python's `re` (training) and tiktoken's
# Rust regex (encoding) agree

SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""


def train_bpe(text, vocab_size):
    """Byte-level BPE: from the 256 bytes, merge the most frequent adjacent pair, again and again;
    only the words (pre-tokens) a merge touches update their pair counts: seconds."""
    words = collections.Counter(re.findall(SPLIT_PATTERN, text.decode("utf-8", errors="replace")))
    seqs = [[bytes([b]) for b in w.encode("utf-8")] for w in words]
    freq = list(words.values())
    pairs, where = collections.Counter(), collections.defaultdict(set)
    for wi, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pairs[pair] += freq[wi]
            where[pair].add(wi)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size and heap:
        n, pair = heapq.heappop(heap)
        if -n != pairs.get(pair, 0) or n == 0:  # stale: the pair's count changed since
            continue
        merged = pair[0] + pair[1]
        ranks.setdefault(merged, len(ranks))
        for wi in list(where[pair]):
            old, new, i = seqs[wi], [], 0
            while i < len(old):
                hit = i + 1 < len(old) and (old[i], old[i + 1]) == pair
                new.append(merged if hit else old[i])
                i += 2 if hit else 1
            for p in zip(old, old[1:]):
                pairs[p] -= freq[wi]
                where[p].discard(wi)
            for p in zip(new, new[1:]):
                pairs[p] += freq[wi]
                where[p].add(wi)
            for p in set(zip(old, old[1:])) | set(zip(new, new[1:])):
                if pairs[p] > 0:
                    heapq.heappush(heap, (-pairs[p], p))
            seqs[wi] = new
    return ranks


def bpe_encoding(train_bytes):
    """A BPE_VOCAB-token BPE of the first 2 MB of training bytes, trained at each run."""
    import tiktoken
    ranks = train_bpe(train_bytes[:2_000_000], BPE_VOCAB)
    return tiktoken.Encoding("bpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={})


def bpe_boundaries(encoding, data):
    """b[i] = 1 where a BPE token starts in `data`."""
    ids = encoding.encode_ordinary(data.decode("utf-8", errors="replace"))
    lengths = np.array([len(encoding.decode_single_token_bytes(t)) for t in ids])
    # replacement characters may change the byte count: realign by fraction
    starts = (np.cumsum(lengths) - lengths) * len(data) // max(lengths.sum(), 1)
    b = np.zeros(len(data), dtype=bool)
    b[starts] = True
    return torch.from_numpy(b)


def as_tensor(raw):
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def make_get_batch(cfg, data, bounds):
    L, B = cfg.seq_len, cfg.batch_size

    def get_batch(i):  # deterministic in i: exact resume
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        start = torch.randint(0, len(data) - L - 1, (B,), generator=g)
        rows = start[:, None] + torch.arange(L + 1)
        batch = dict(x=data[rows])  # (B, L+1)
        if bounds is not None:
            batch["b"] = bounds[rows[:, :-1]]  # (B, L)
        return batch
    return get_batch


# ---- the experiment: held-out bits per byte and whitespace alignment, one training run


def alignment_counts(b, x):
    """Counts for the whitespace figures of boundaries b (B, L) over bytes x (B, L), position 0
    (forced) left out: chunks starting *at* whitespace (`the|_cat`) and right *after* it."""
    b, ws = b[:, 1:], is_whitespace(x)
    ws_here, ws_before = ws[:, 1:], ws[:, :-1]  # is byte t / byte t-1 whitespace, for t >= 1
    counts = [torch.full((), b.numel(), device=b.device), b.sum(), ws_here.sum(),
              (b & ws_here).sum(), ws_before.sum(), (b & ws_before).sum()]
    return torch.stack([c.double() for c in counts])  # on b's device: synced once


def alignment_figures(counts):
    """The whitespace figures from summed alignment_counts; chance is what a policy blind to the
    bytes scores at the same rate r.
      ws_at     P(chunk starts at t | byte t is whitespace); chance r. The RL paper's "fraction of
                whitespace with token boundaries": its gate = 1 marks a chunk's *last* byte,
                whose vector serves the bytes after it: in our data flow, a chunk starting at it
      ws_after  P(chunk starts at t | byte t-1 is whitespace); chance r
      on_ws / after_ws  share of boundaries at / right after whitespace; chance = its share"""
    n, n_bound, n_ws, at, n_ws_before, after = counts
    return dict(free_rate=n_bound / n, ws_base=n_ws / n, ws_at=at / max(n_ws, 1),
                ws_after=after / max(n_ws_before, 1), on_ws=at / max(n_bound, 1),
                after_ws=after / max(n_bound, 1))


@torch.no_grad()
def evaluation_sums(model, cfg, val, val_bounds, device, chunk=32):
    """Summed NLL (nats), bytes, boundaries, alignment_counts over the held-out windows, left on
    the device: evaluate() syncs once. rl's gates are sampled (fixed noise), as the authors'."""
    L = cfg.seq_len
    n = min(cfg.eval_windows, (len(val) - 1) // L)
    g = torch.Generator().manual_seed(12345)  # the same noise for every evaluation and method
    sums = torch.zeros(9, dtype=torch.float64, device=device)
    for s in range(0, n, chunk):
        rows = (torch.arange(s, min(n, s + chunk)) * L)[:, None] + torch.arange(L + 1)
        x = val[rows].to(device)
        given = val_bounds[rows[:, :-1]].to(device) if val_bounds is not None else None
        noise = torch.rand(x.shape[0], L, generator=g).to(device)
        out = model(x[:, :-1], given, noise)
        b = out["b"]
        nll = token_ce(out["logits"], x[:, 1:]).sum().double()
        sums += torch.cat([torch.stack([nll, torch.full_like(nll, b.numel()), b.sum().double()]),
                           alignment_counts(b, x[:, :-1])])
    return sums


def evaluate(model, cfg, val, val_bounds, device):
    nll, n_bytes, n_bound, *counts = evaluation_sums(model, cfg, val, val_bounds, device).tolist()
    return dict(bpb=nll / n_bytes / math.log(2), rate=n_bound / n_bytes,
                bytes_per_chunk=n_bytes / max(n_bound, 1), **alignment_figures(counts))


@torch.no_grad()
def show_boundaries(model, val, val_bounds, device, n=120):
    """One held-out passage with `|` before every chunk start and `_` for spaces."""
    model.eval()  # a forward in training mode would also move rl's rate offset
    x = val[:n][None].to(device)
    given = val_bounds[:n][None].to(device) if val_bounds is not None else None
    noise = torch.rand(1, n, generator=torch.Generator().manual_seed(7)).to(device)
    b = model(x, given, noise)["b"][0].cpu()
    shown = {32: "_", 10: "\\n"}
    return "".join(("|" if bi and i else "") + shown.get(c, chr(c) if 32 < c < 127 else "?")
                   for i, (c, bi) in enumerate(zip(val[:n].tolist(), b.tolist())))


FIGURES = ("bpb", "rate", "free_rate", "ws_base", "ws_at", "ws_after", "on_ws", "after_ws",
           "bytes_per_chunk")


def run_one(name, method, cfg, ctx, data, val, bounds, val_bounds):
    torch.manual_seed(cfg.seed)  # identical init and data order for every method
    model = ChunkedByteLM(cfg, method).to(ctx.device)
    get_batch, compiled = make_get_batch(cfg, data, bounds), torch._dynamo.utils.counters["stats"]
    graphs = [compiled["unique_graphs"]]  # graphs compiled so far, before each step

    def batch(i):
        graphs.append(compiled["unique_graphs"])
        return get_batch(i)

    def eval_fn(m, step):
        return dict(train_bytes=step * cfg.batch_size * cfg.seq_len,
                    **evaluate(m, cfg, val, val_bounds, ctx.device))
    summary = train(model, batch, loss_fn_for(cfg, method), cfg, ctx, eval_fn=eval_fn,
                    ckpt_path=f"{cfg.out}/ckpt_{name.replace(':', '_')}_seed{cfg.seed}.pt",
                    desc=f"{name} seed {cfg.seed}")
    graphs.append(compiled["unique_graphs"])  # [start, before step 0, before step 1, ..., end]
    return dict(method=name, seed=cfg.seed, params=count_params(model),
                bytes_per_s=summary["items_per_s"], seconds=summary["seconds"],
                graphs=graphs[-1] - graphs[0],
                recompiles=graphs[-1] - graphs[min(2, len(graphs) - 1)],
                curve=summary["evals"], sample=show_boundaries(model, val, val_bounds, ctx.device),
                **{k: summary["evals"][-1][k] for k in FIGURES})


# ---- below: statistics, report, figure: not needed to learn the paper


def by_method(rows):
    """method -> {figure: [value per seed]}, seeds in one order (paired)."""
    out = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in sorted(rows, key=lambda r: r["seed"]):
        for k in FIGURES + ("bytes_per_s",):
            out[r["method"]][k].append(r[k])
    return out


def interval_text(xs, digits=2):
    m, h = mean_interval(xs)
    return f"{m:.{digits}f}" + ("" if math.isnan(h) else f"+-{h:.{digits}f}")


def paired_difference(a, b):
    """Paired difference a - b over seeds, as text: mean +- 95% interval and what it resolves."""
    m, h = mean_interval(np.asarray(a) - np.asarray(b))
    if math.isnan(h):
        return f"{m:+.4f} (one seed: no interval)", "unresolved"
    word = "lower" if m + h < 0 else "higher" if m - h > 0 else "no difference resolved"
    return f"{m:+.4f} +- {h:.4f}", word


def unigram_bits(val):
    """Entropy of the held-out bytes' frequencies: a model at or above it learned nothing."""
    p = torch.bincount(val, minlength=256).double() / len(val)
    return float(-(p[p > 0] * p[p > 0].log2()).sum())


def placement_verdicts(by, learned):
    """Which placement the LM loss, rl's reward, prefers (space vs after, at their shared rate),
    where rl cuts, and so whether the paper's figure is reachable at this size."""
    lines, preferred = [], None
    if learned("space") and learned("after"):
        diff, word = paired_difference(by["space"]["bpb"], by["after"]["bpb"])
        preferred = {"lower": "AT", "higher": "AFTER"}.get(word)
        lines.append(f"the LM loss (rl's reward): space bpb minus after bpb {diff} at rate "
                     f"{interval_text(by['space']['rate'], 3)} -> " + (
                         f"prefers chunks {preferred} whitespace" if preferred else word))
    if learned("rl"):
        rl, n = by["rl"], len(by["rl"]["bpb"])
        at, after = (sum(w > 2 * c for w, c in zip(rl[k], rl["free_rate"]))
                     for k in ("ws_at", "ws_after"))
        lines.append(f"rl cuts at whitespace >= 2x chance in {at}/{n} seeds (ws_at "
                     f"{interval_text(rl['ws_at'])}, chance {interval_text(rl['free_rate'])}), "
                     f"right after it in {after}/{n} (ws_after {interval_text(rl['ws_after'])})")
        reach = {"AT": "reachable", "AFTER": "NOT reachable"}.get(preferred, "of unknown reach")
        call = "one seed: no verdict" if n < 2 else "reproduced" if at == n else "NOT reproduced"
        lines.append(f"the paper's figure is {reach} at this size; rl at whitespace in {at}/{n} "
                     f"seeds -> {call}")
    return lines


def verdicts(rows, cfg, floor):
    """The paper's claims checked on the table (paired by seed); a method whose bpb is not below
    the bytes' frequency entropy learned nothing and gets no verdict."""
    by, lines = by_method(rows), []
    learned = lambda name: name in by and max(by[name]["bpb"]) < floor
    lines += [f"{name} learned nothing (bpb >= {floor:.3f}, the bytes' entropy): no verdict"
              for name in by if not learned(name)]
    if learned("rl"):
        rl = by["rl"]
        inside = sum(abs(r - cfg.rate) <= 0.02 for r in rl["rate"])
        lines.append(f"rl realised rate {interval_text(rl['rate'], 3)}: within +-0.02 of "
                     f"{cfg.rate} in {inside}/{len(rl['rate'])} seeds")
        for base in [b for b in ("uniform", "fixed", "hnet", "bpe") if learned(b)]:
            diff, word = paired_difference(rl["bpb"], by[base]["bpb"])
            lines.append(f"rl bpb minus {base} bpb: {diff} -> {word} (rate "
                         f"{interval_text(by[base]['rate'], 3)})")
    lines += placement_verdicts(by, learned)
    if learned("rl") and learned("rl:gamma=1"):
        diff, word = paired_difference(by["rl:gamma=1"]["ws_at"], by["rl"]["ws_at"])
        lines.append(f"ws_at with gamma=1 minus gamma={cfg.gamma}: {diff} -> {word}")
    if "rl:no-rate-control" in by:
        lines.append(f"without rate control the rate goes to "
                     f"{interval_text(by['rl:no-rate-control']['rate'], 3)}")
    return lines


def report(rows, cfg, ws_share, floor):
    """The results table (mean +- 95% interval over seeds), boundary samples and the verdicts."""
    by = by_method(rows)
    n = len(next(iter(by.values()))["bpb"])
    print(f"\nheld-out {cfg.data}, {cfg.max_steps} steps x {cfg.batch_size} x {cfg.seq_len} bytes "
          f"= {cfg.max_steps * cfg.batch_size * cfg.seq_len / 1e6:.1f} MB per method, {n} "
          f"seed(s) from {cfg.seed}" + (" (mean +- 95% t-interval)" if n > 1 else ""))
    columns = dict(bpb=("val bpb", 4), rate=("rate", 3), ws_at=("ws_at", 2),
                   free_rate=("(chance)", 2), ws_after=("ws_after", 2), on_ws=("on_ws", 2),
                   after_ws=("after_ws", 2), bytes_per_chunk=("bytes/chunk", 2))
    print(f"{'method':19s}" + "".join(f"{title:>13s}" for title, _ in columns.values())
          + f"{'train B/s':>11s}")
    for name, f in by.items():
        cells = "".join(f"{interval_text(f[k], digits):>13s}" for k, (_, digits) in columns.items())
        speeds = [v for v in f["bytes_per_s"] if v] or [0]  # a finished run resumed: none
        print(f"{name:19s}{cells}{np.mean(speeds):11,.0f}")
    print(f"ws_at: share of whitespace bytes where a chunk starts (the paper's figure), ws_after: "
          f"... on the next byte (chance: the rate); on_ws / after_ws: share of boundaries at / "
          f"right after whitespace (chance: whitespace's share of the bytes, {ws_share:.1%})")
    print("\nboundaries in held-out text ('|' = chunk start, '_' = space), first seed:")
    for r in rows:
        if r["seed"] == cfg.seed:
            print(f"  {r['method']:19s} {r['sample']}")
    lines = verdicts(rows, cfg, floor)
    print("\nclaims:\n" + "".join(f"  {line}\n" for line in lines)
          + f"  (--methods=all runs {' '.join(METHODS)}; --ablations adds the rl ablations)")
    return lines


def plot(cfg, rows):
    """Held-out bits per byte against training bytes, each method's first seed."""
    def draw(plt):
        for r in (r for r in rows if r["seed"] == cfg.seed):
            plt.plot([e["train_bytes"] / 1e6 for e in r["curve"]], [e["bpb"] for e in r["curve"]],
                     marker="o", label=f"{r['method']} (rate {r['rate']:.2f})")
        plt.xlabel("training bytes (millions)")
        plt.ylabel("held-out bits per byte")
        plt.legend()
    return save_figure(Path(cfg.out) / "bpb.png", draw)


def main(argv=None):
    cfg = parse_config(Config, "hnet_rl", argv)
    ctx = setup(cfg)
    t_start = time.time()
    train_raw, val_raw = load_bytes(cfg)
    data, val = as_tensor(train_raw), as_tensor(val_raw)
    bounds = val_bounds = None
    if "bpe" in cfg.methods.split():  # token starts, computed once for the whole corpus
        encoding = bpe_encoding(train_raw)
        bounds, val_bounds = bpe_boundaries(encoding, train_raw), bpe_boundaries(encoding, val_raw)
    print(f"data {cfg.data}: {len(data):,} train / {len(val):,} val bytes; target rate {cfg.rate}")
    runs = [(name, name, cfg) for name in cfg.methods.split()]
    if cfg.ablations:
        runs += [(name, "rl", dataclasses.replace(cfg, **over)) for name, over in ABLATIONS.items()]
    rows = [run_one(name, method, dataclasses.replace(c, seed=seed), ctx, data, val,
                    *((bounds, val_bounds) if method == "bpe" else (None, None)))
            for seed in range(cfg.seed, cfg.seed + cfg.seeds) for name, method, c in runs]
    if not ctx.master:
        return None
    ws_share = is_whitespace(val).float().mean().item()
    lines = report(rows, cfg, ws_share, unigram_bits(val))
    seconds = time.time() - t_start
    path = save_results(cfg, ctx, dict(rows=rows, verdicts=lines, seconds=seconds))
    print(f"\ntotal time {seconds:.0f}s; wrote {path}, {plot(cfg, rows) or 'no figure'}")
    return rows


if __name__ == "__main__":
    cli(main)
