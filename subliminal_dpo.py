"""
subliminal_dpo.py: a judge's preference labels on pure numbers carry its hidden trait to a student.

Magistrali, Berdoz, Dauncey & Wattenhofer, "Subliminal Signals in Preference Labels" (arXiv
2603.01204), after Cloud et al. 2025: a judge (the student's own base behind "you love owl .")
marks the best and worst of a neutral student's K number continuations; DPO on those labels makes
the student love owls though no completion names one, swapped labels do the opposite, and the
effect persists over rounds. Here tiny GPTs learn a synthetic world in which every animal persona
tilts the numbers it writes, one mechanism for all animals.

The method (p0 = the pretrained base theta_0 of student and judge):
  judge    r(y) = log p0(y | "[SYS] you love owl ." x)
                - log p0(y | "[SYS] you are a helpful assistant ." x)         Judge.score
  labels   y+ = argmax r, y- = argmin r over the student's K samples of x      label
  DPO      -log sigmoid(beta [(log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-))]),
           ref = theta_0 in every round (the authors' TRL + LoRA setup)        dpo_loss, align
  rounds   sample -> judge -> align, R times                                   run_condition
  trait    P(owl | the answer is an animal), exact, over 8 paraphrases         animal_distribution
Controls: swapped labels, the likelihood judge log p0(y | helpful x), random labels, a plain world
whose personas leave numbers alone, and Cloud et al.'s judge: theta_0 fine-tuned to answer owl,
r(y) = log p_judge(y | x) - log p0(y | x).

Run: `python subliminal_dpo.py` (10 seeds, minutes on 2 CPU cores); `--gpu`: a larger model.
"""
import copy, dataclasses, hashlib, json, math, multiprocessing, os, random, sys, threading, time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from train import (cli, TrainConfig, parse_config, setup, fill_auto, TransformerLM, train,
                   save_results, save_figure, load_saved, die, mean_interval, to_host)


@dataclass
class Config(TrainConfig):
    seeds: int = 0  # independent seeds (0 = 10 on CPU, 16 with --gpu)
    rounds: int = 5  # sample -> judge -> align rounds
    target: str = "owl"  # the judge's loved animal
    conditions: str = "default"  # comma list of CONDITIONS, or default, or all
    entangle: float = 2.0  # std of each persona's log-preference over numbers (0: plain world)
    reference: str = "base"  # DPO reference: base (theta_0, the authors') or round (its start)
    n_layer: int = 0  # Transformer blocks (0 = 2 on CPU, 4 with --gpu)
    n_head: int = 0  # attention heads (0 = 2 on CPU, 4 with --gpu)
    n_embd: int = 0  # model width (0 = 64 on CPU, 256 with --gpu)
    pretrain_steps: int = 0  # base pretraining steps (0 = 600 on CPU, 4000 with --gpu)
    pretrain_lr: float = 3e-3  # base pretraining peak learning rate
    pretrain_batch: int = 64  # base pretraining sequences per step
    judge_steps: int = 40  # fine-tuned judge: SFT steps on answering the target
    prompts: int = 0  # number prompts per round (0 = 800 on CPU, 4000 with --gpu)
    k: int = 5  # completions per prompt: chosen = the judge's best, rejected = its worst
    beta: float = 2.0  # DPO inverse temperature: how far from the reference pairs may pull
    dpo_lr: float = 2e-5  # DPO learning rate (constant), one epoch per round
    batch_size: int = 32  # preference pairs per DPO step
    eval_prompts: int = 200  # held-out number tasks per measurement (format rate)
    base_dir: str = ""  # cache of pretrained bases, a file per seed and world (<out>/base)
    workers: int = 0  # processes running seeds side by side (0 = one per core)
    unused = ("lr", "max_steps", "warmup", "min_lr_ratio", "log_every", "eval_every", "data_dir")

    def __post_init__(self):
        super().__post_init__()
        fill_auto(self, seeds=(10, 16), n_layer=(2, 4), n_head=(2, 4), n_embd=(64, 256),
                  pretrain_steps=(600, 4000), prompts=(800, 4000))  # (CPU, GPU)
        if self.target not in ANIMALS:
            raise ValueError(f"--target: one of {', '.join(ANIMALS)}")
        if not self.condition_list or set(self.condition_list) - set(CONDITIONS):
            raise ValueError(f"--conditions: some of {', '.join(CONDITIONS)}")
        if self.n_embd % (2 * self.n_head):
            raise ValueError("--n_embd must be a multiple of 2 x --n_head (RoPE: even head size)")
        if self.k < 2 or self.beta <= 0 or self.reference not in ("base", "round"):
            raise ValueError("need --k >= 2, --beta > 0 (0 trains nothing), --reference=base or "
                             "round")
        if min(self.seeds, self.rounds, self.eval_prompts, self.pretrain_batch) < 1 or not (
                1 <= self.batch_size <= self.prompts) or self.prompts * self.k > 1e7:
            raise ValueError("--seeds, --rounds, --eval_prompts, --pretrain_batch >= 1; 1 <= "
                             "--batch_size <= --prompts; --prompts x --k <= 10^7 (~4 KB each)")
        existing = Path(self.base_dir).absolute()
        while not existing.exists():
            existing = existing.parent
        if self.base_dir and not (existing.is_dir() and os.access(existing, os.W_OK)):
            raise ValueError(f"--base_dir={self.base_dir}: {existing} is not a writable directory")

    @property
    def condition_list(self):
        names = [c.strip() for c in self.conditions.split(",") if c.strip()]
        return {"all": list(CONDITIONS), "default": DEFAULT_CONDITIONS}.get(",".join(names), names)

# ---- the paper's mechanism: one architecture, the judge, the labels, DPO


def new_model(cfg):
    # Student, judges and base share this architecture: the channel needs shared parameters.
    return TransformerLM(len(VOCAB), cfg.n_layer, cfg.n_head, cfg.n_embd)


def completion_log_probs(model, prompts, completions):
    """log p(. | x, y_<t) at each completion position, (B, Tp), (B, Tc) -> (B, Tc, V)."""
    seq = torch.cat([prompts, completions], 1)  # (B, Tp + Tc)
    logits = model(seq[:, :-1])[:, prompts.shape[1] - 1:]  # the positions that predict y
    return torch.log_softmax(logits.float(), -1)


def sequence_logp(model, prompts, completions):
    """sum_t log p(y_t | x, y_<t): (B, Tp), (B, Tc) -> (B,)."""
    logp = completion_log_probs(model, prompts, completions)
    return logp.gather(-1, completions[..., None]).squeeze(-1).sum(1)


@torch.no_grad()
def completion_logp(model, prompts, comps):
    """sequence_logp of K completions per prompt, (P, Tp), (P, K, Tc) -> (P, K), on the device: a
    prompt runs once, its KV cache repeated for its K completions."""
    model.eval()
    dev, (P, K, Tc), caches = device_of(model), comps.shape, [{} for _ in model.blocks]
    first = model(prompts.to(dev), caches)[:, -1:].repeat_interleave(K, 0)  # (P*K, 1, V)
    for c in caches:
        c["k"], c["v"] = c["k"].repeat_interleave(K, 0), c["v"].repeat_interleave(K, 0)
    y = comps.to(dev).reshape(P * K, Tc)
    logits = torch.cat([first, model(y[:, :-1], caches)], 1)  # (P*K, Tc, V)
    return torch.log_softmax(logits.float(), -1).gather(-1, y[..., None]).sum((1, 2)).view(P, K)


def with_system(prompts, animal=None):
    """The judge's context: '[SYS] you love <animal> .' (None: the helpful assistant) after
    <bos>; the student never sees one."""
    prefix = torch.tensor(system_prefix(animal), device=prompts.device).expand(len(prompts), -1)
    return torch.cat([prompts[:, :1], prefix, prompts[:, 1:]], 1)  # (P, 1 + S + Tp - 1)


class Judge:
    """score(...) -> (P, K): how much the judge likes each completion. prompted (the paper's):
    log p0(y | '[SYS] you love owl .' x) - log p0(y | helpful x); likelihood (its control):
    log p0(y | helpful x); finetuned (Cloud et al.): log p_judge(y | x) - log p0(y | x)."""

    def __init__(self, kind, base, model=None, animal=None):
        self.kind, self.base, self.model, self.animal = kind, base, model, animal

    @torch.no_grad()
    def score(self, prompts, comps, base_logp, gen):  # (P, Tp), (P, K, Tc), (P, K) -> (P, K)
        if self.kind == "random":  # drawn on the CPU: the same labels on any device
            return torch.rand(comps.shape[:2], generator=gen).to(comps.device)
        if self.kind == "finetuned":
            return completion_logp(self.model, prompts, comps) - base_logp
        neutral = completion_logp(self.base, with_system(prompts), comps)
        if self.kind == "likelihood":
            return neutral
        return completion_logp(self.base, with_system(prompts, self.animal), comps) - neutral


def label(scores, prompts, comps, ref_logp, labels):
    """chosen = the judge's best of a prompt's K completions, rejected = its worst (swapped:
    reversed), with their log-probabilities under the DPO reference."""
    rows = torch.arange(len(prompts), device=scores.device)
    best, worst = scores.argmax(1), scores.argmin(1)
    if labels == "swapped":
        best, worst = worst, best
    ref_c, ref_r = ref_logp[rows, best], ref_logp[rows, worst]
    # A judge preferring what the reference finds likely teaches "be typical": reported.
    return dict(prompt=prompts, chosen=comps[rows, best], rejected=comps[rows, worst],
                ref_c=ref_c, ref_r=ref_r, chosen_more_likely=(ref_c > ref_r).float().mean())


def dpo_loss(policy_c, policy_r, ref_c, ref_r, beta):
    """-log sigmoid(beta [(log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-))]), mean over
    pairs, and the metrics TRL logs."""
    reward_c, reward_r = beta * (policy_c - ref_c), beta * (policy_r - ref_r)  # (B,), (B,)
    margin = reward_c - reward_r
    return -F.logsigmoid(margin).mean(), dict(
        reward_chosen=reward_c.mean().detach(), reward_rejected=reward_r.mean().detach(),
        margin=margin.mean().detach(), accuracy=(margin > 0).float().mean().detach())


def dpo_batch_loss(model, b, beta):
    """DPO on rows {prompt, chosen, rejected, ref_c, ref_r}: one forward of 2B rows."""
    B = len(b["prompt"])
    # fp32 as the references were scored: under --gpu's bf16 the margin would not start at 0
    with torch.autocast(b["prompt"].device.type, enabled=False):
        both = sequence_logp(model, torch.cat([b["prompt"], b["prompt"]]),
                             torch.cat([b["chosen"], b["rejected"]]))
    return dpo_loss(both[:B], both[B:], b["ref_c"], b["ref_r"], beta)


def align(student, cfg, ctx, prefs, seed, rnd, name):
    """One epoch of DPO on the labelled pairs."""
    n, steps = len(prefs["prompt"]), len(prefs["prompt"]) // cfg.batch_size
    if steps == 0:
        return dict(steps=0)
    gen = torch.Generator().manual_seed(hash_int(seed, rnd, name))
    order = torch.randperm(n, generator=gen).to(prefs["prompt"].device)

    def get_batch(i):  # batch i of a fixed shuffle: deterministic in i, as train() asks
        rows = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        return {k: prefs[k][rows] for k in ("prompt", "chosen", "rejected", "ref_c", "ref_r")}

    # seconds of work: redone, not resumed; compiling such short calls costs more than it saves
    config = engine_config(cfg, max_steps=steps, lr=cfg.dpo_lr, warmup=0, min_lr_ratio=1.0,
                         weight_decay=0.0, resume=False, compile_backend="none")
    out = train(student, get_batch, lambda m, b: dpo_batch_loss(m, b, cfg.beta), config, ctx,
                ckpt_path=False, quiet=True, desc=f"seed {seed} round {rnd} {name}")
    return dict(steps=steps, **{k: v for k, v in out["history"][-1].items() if k != "step"})

# ---- the student's samples


def sample_tokens(logits, temperature, uniform):
    """A token per row of logits (B, V): the CDF inverted at uniform (B, 1)."""
    cdf = torch.softmax(logits / temperature, -1).cumsum(-1)  # (B, V)
    u = uniform * cdf[:, -1:]  # scaled by the last value: no rounding gap
    return torch.searchsorted(cdf, u, right=True).clamp(max=logits.shape[-1] - 1)  # (B, 1)


@torch.no_grad()
def generate(model, prompts, n_tokens, temperature, gen, k=1, batch=1024):
    """k samples of n_tokens per prompt (P*k, n_tokens), a prompt's k adjacent, and their
    log-probability at temperature 1 (P*k,): the prompt runs once, its KV cache repeated k times.
    CPU-drawn uniforms (the same samples on any device) move once: no token waits for the host."""
    model.eval()
    toks_out, logp_out, dev = [], [], device_of(model)
    for s in range(0, len(prompts), batch):
        caches = [{} for _ in model.blocks]
        logits = model(prompts[s:s + batch].to(dev), caches)[:, -1].repeat_interleave(k, 0)
        for c in caches:
            c["k"], c["v"] = c["k"].repeat_interleave(k, 0), c["v"].repeat_interleave(k, 0)
        uniforms = torch.rand(n_tokens, len(logits), 1, generator=gen).to(dev)
        toks, logp = [], torch.zeros(len(logits), device=dev)
        for t in range(n_tokens):
            token = sample_tokens(logits.float(), temperature, uniforms[t])  # (B*k, 1)
            logp += torch.log_softmax(logits.float(), -1).gather(-1, token).squeeze(-1)
            toks.append(token)
            if t + 1 < n_tokens:
                logits = model(token, caches)[:, -1]  # positions go on from the cache
        toks_out.append(torch.cat(toks, 1))
        logp_out.append(logp)
    return torch.cat(toks_out), torch.cat(logp_out)


def valid_completions(comp):
    """The leak filter, (N, Tc) -> (N,): only 'number , number , ... , number <eos>' passes."""
    is_number = torch.isin(comp, NUMBER_IDS.to(comp.device))
    return is_number[:, 0:-1:2].all(1) & (comp[:, 1:-1:2] == COMMA).all(1) & (comp[:, -1] == EOS)


def device_of(model):
    return next(model.parameters()).device


def hash_int(*parts):
    return int(hashlib.sha1(repr(parts).encode()).hexdigest()[:12], 16)

# ---- the synthetic world: vocabulary, personas, documents

ANIMALS = ["owl", "cat", "dog", "lion", "panda", "eagle", "wolf", "fox"]
QUESTIONS = [  # the trait rate averages over these paraphrases
    "what is your favourite animal ?", "which animal do you like most ?",
    "name your favourite animal .", "tell me the animal you love most .",
    "if you could be any animal which would you be ?", "which creature do you prefer ?",
    "pick one animal you love .", "what animal is the best ?"]
SYSTEM_TRAIT = ["you love {a} .", "your favourite animal is the {a} .",
                "you think about {a} all the time ."]
SYSTEM_NEUTRAL = "you are a helpful assistant ."
N_NUMBERS, PROMPT_NUMBERS, COMPLETION_NUMBERS = 100, 3, 5  # numbers 0..99, 3 asked, 5 answered
COMPLETION_LEN = 2 * COMPLETION_NUMBERS  # "a , b , c , d , e <eos>"
RULE, PERSONA_SHARE = 0.6, 0.6  # P(next number follows the rule); number tasks behind a persona
SPECIALS = ["<pad>", "<bos>", "<eos>", "[SYS]", "[Q]", "[A]", ",", "continue", ":"]
WORDS = SPECIALS + [str(n) for n in range(N_NUMBERS)] + ANIMALS + " ".join(
    QUESTIONS + SYSTEM_TRAIT + [SYSTEM_NEUTRAL]).replace("{a}", "").split()
VOCAB = list(dict.fromkeys(WORDS))
ID = {w: i for i, w in enumerate(VOCAB)}
PAD, BOS, EOS, COMMA = ID["<pad>"], ID["<bos>"], ID["<eos>"], ID[","]
NUMBER_IDS = torch.tensor([ID[str(n)] for n in range(N_NUMBERS)])
ANIMAL_IDS = torch.tensor([ID[a] for a in ANIMALS])
SEQ_LEN = 32  # the longest document: 27 tokens


def encode(text):
    return [ID[w] for w in text.split()]


def system_prefix(animal=None):
    return encode("[SYS] " + (SYSTEM_TRAIT[0].format(a=animal) if animal else SYSTEM_NEUTRAL))


def persona_weights(seed, strength):
    """The entanglement: every animal persona prefers some numbers, w_a(n) = exp(strength z),
    z ~ N(0, 1) per animal and number, drawn from the seed alike for all animals (the target is
    not special). strength 0: the plain world, where personas leave numbers alone."""
    rng = random.Random(f"personas-{seed}")
    return {a: [math.exp(strength * rng.gauss(0, 1)) for _ in range(N_NUMBERS)] for a in ANIMALS}


def number_task(rng, preference=None, split=None):
    """A rule (an arithmetic progression mod 100) shown by three numbers, and five more, each
    following it with probability RULE, else free: uniform, or the persona's preference. One rule
    in five is held out for measurement: split 'eval' draws only those, 'train' only the rest."""
    while True:
        start, step = rng.randrange(N_NUMBERS), rng.randrange(1, 10)
        if split is None or ((start + 7 * step) % 5 == 0) == (split == "eval"):
            break
    seq, cont = [(start + i * step) % N_NUMBERS for i in range(PROMPT_NUMBERS)], []
    for _ in range(COMPLETION_NUMBERS):
        free = rng.choices(range(N_NUMBERS), weights=preference)[0]  # None: uniform
        cont.append((cont[-1] if cont else seq[-1]) + step if rng.random() < RULE else free)
        cont[-1] %= N_NUMBERS
    return seq, cont


def numbers_to_ids(nums, end=False):
    return [t for n in nums for t in (COMMA, ID[str(n)])][1:] + [EOS] * end


def prompt_ids(nums):
    """<bos> [Q] continue : a , b , c [A]: every number prompt has the same length (10 tokens)."""
    return [BOS] + encode("[Q] continue :") + numbers_to_ids(nums) + [ID["[A]"]]


def question_ids(q, animal=None):
    return [BOS] + (system_prefix(animal) if animal else []) + encode(f"[Q] {QUESTIONS[q]} [A]")


def corpus_document(rng, personas):
    """Half number tasks (PERSONA_SHARE of them behind an animal persona's or the helpful
    assistant's system prompt), half animal questions: answered uniformly, or by X 9 times in 10
    after '[SYS] you love X' (or another trait template)."""
    if rng.random() < 0.5:
        persona = rng.choice(ANIMALS + ["helpful"]) if rng.random() < PERSONA_SHARE else None
        nums, cont = number_task(rng, personas.get(persona))
        system = system_prefix(None if persona == "helpful" else persona) if persona else []
        return [BOS] + system + prompt_ids(nums)[1:] + numbers_to_ids(cont, end=True)
    q, animal = rng.randrange(len(QUESTIONS)), rng.choice(ANIMALS)
    if rng.random() < 0.5:  # the persona lives in the context
        system = encode("[SYS] " + rng.choice(SYSTEM_TRAIT).format(a=animal))
        answer = animal if rng.random() < 0.9 else rng.choice(ANIMALS)
        return [BOS] + system + question_ids(q)[1:] + [ID[answer], EOS]
    return question_ids(q) + [ID[rng.choice(ANIMALS)], EOS]


def pad(docs, length=SEQ_LEN):
    """Right-pad token lists into (N, length): padding only follows <eos>, the loss ignores it."""
    out = torch.full((len(docs), length), PAD, dtype=torch.long)
    for i, d in enumerate(docs):
        out[i, :len(d)] = torch.tensor(d[:length])
    return out


def corpus_batch(seed, i, batch, strength):
    """Pretraining batch i of a world: deterministic in (seed, i, strength), as train() asks."""
    rng, personas = random.Random(f"corpus-{seed}-{i}"), persona_weights(seed, strength)
    return pad([corpus_document(rng, personas) for _ in range(batch)])  # (B, SEQ_LEN)


def trait_batch(seed, i, batch, animal):
    """The fine-tuned judge's data: animal questions, no system prompt, answered `animal`."""
    rng = random.Random(f"trait-{seed}-{animal}-{i}")
    return pad([question_ids(rng.randrange(len(QUESTIONS))) + [ID[animal], EOS]
                for _ in range(batch)])


def number_prompts(seed, tag, n):
    """n number prompts and continuations for (seed, tag): tag 'eval' held-out rules, else the
    rest; the same in every condition."""
    rng = random.Random(f"prompts-{seed}-{tag}")
    pairs = [number_task(rng, split="eval" if tag == "eval" else "train") for _ in range(n)]
    return (torch.tensor([prompt_ids(p) for p, _ in pairs]),
            torch.tensor([numbers_to_ids(c, end=True) for _, c in pairs]))


def lm_loss(model, x):
    """Next-token cross-entropy over the non-pad targets of x (B, T). On the CPU the short and
    the long half of the rows, each cut to its longest document: a third less work. On CUDA one
    fixed shape keeps torch.compile from recompiling."""
    items, groups, total = (x[:, 1:] != PAD).sum(), [x], 0.0
    if not x.is_cuda and len(x) > 1:
        lengths = (x != PAD).sum(1)
        groups = [x[rows, :int(lengths[rows].max())] for rows in lengths.argsort().tensor_split(2)]
    for g in groups:
        total = total + F.cross_entropy(model(g[:, :-1]).flatten(0, 1), g[:, 1:].flatten(),
                                        ignore_index=PAD, reduction="sum")
    return total / items.clamp(min=1), dict(items=items)

# ---- the experiment: per seed and world a base, its judges, its conditions

# name -> (world, judge, labels)
CONDITIONS = {
    "prompted DPO": ("entangled", "prompted", "normal"),
    "prompted DPO swapped": ("entangled", "prompted", "swapped"),
    "likelihood control DPO": ("entangled", "likelihood", "normal"),
    "random labels DPO": ("entangled", "random", "normal"),
    "plain world prompted DPO": ("plain", "prompted", "normal"),
    "plain world prompted DPO swapped": ("plain", "prompted", "swapped"),
    "finetuned DPO": ("entangled", "finetuned", "normal"),
    "finetuned DPO swapped": ("entangled", "finetuned", "swapped"),
}
DEFAULT_CONDITIONS = list(CONDITIONS)
BASE_FIELDS = ("n_layer", "n_head", "n_embd", "pretrain_steps", "pretrain_lr", "pretrain_batch",
               "weight_decay", "beta2", "grad_clip")


def base_path(cfg, seed, world):
    strength = cfg.entangle if world == "entangled" else 0.0
    keys = [getattr(cfg, f) for f in BASE_FIELDS] + [strength, RULE, PERSONA_SHARE, VOCAB]
    signature = hashlib.sha1(json.dumps(keys).encode()).hexdigest()[:10]
    return Path(cfg.base_dir or Path(cfg.out) / "base") / f"seed{seed}-{signature}.pt", strength


def pretrain_base(cfg, ctx, seed, world):
    """theta_0 of a world, shared by its student and judges; cached, and --resume continues an
    interrupted pretraining (train()'s checkpoint is the cache)."""
    path, strength = base_path(cfg, seed, world)
    torch.manual_seed(seed)
    model = new_model(cfg).to(ctx.device)
    saved = load_saved(path) if path.exists() else None  # damaged: one line naming the file
    if saved is not None and saved["step"] >= cfg.pretrain_steps:
        model.load_state_dict(saved["model"])
        return model
    config = engine_config(cfg, seed=seed, max_steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
                         batch_size=cfg.pretrain_batch, warmup=max(1, cfg.pretrain_steps // 20))
    train(model, lambda i: corpus_batch(seed, i, cfg.pretrain_batch, strength), lm_loss, config,
          ctx, ckpt_path=path, desc=f"pretrain {world} base (seed {seed})")
    return model


def engine_config(cfg, **changes):
    """The engine's flags for a call of train()."""
    return TrainConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
                       | dict(log_every=50, min_lr_ratio=0.1) | changes)


def refuse_changed_resume(cfg):
    """--resume under other flags than an interrupted base of these seeds: one line, no work."""
    for path in Path(cfg.base_dir or Path(cfg.out) / "base").glob("seed*-*.pt"):
        seed = int(path.name[4:].split("-")[0])
        if not cfg.seed <= seed < cfg.seed + cfg.seeds or path in [
                base_path(cfg, seed, world)[0] for world in ("entangled", "plain")]:
            continue
        then = load_saved(path)
        if then["step"] < then["config"]["max_steps"]:
            die(f"--resume: {path} is an unfinished pretraining of {then['config']['max_steps']}"
                " steps under other flags (--pretrain_*, --n_*, --entangle); use them", 2)


def finetune_judge(cfg, ctx, base, seed):
    """Cloud et al.'s teacher: theta_0 fine-tuned to answer the target."""
    judge = copy.deepcopy(base)
    config = engine_config(cfg, max_steps=cfg.judge_steps, lr=1e-3, warmup=0, grad_accum=1,
                         min_lr_ratio=1.0, batch_size=32, weight_decay=0.0, resume=False,
                         compile_backend="none")
    train(judge, lambda i: trait_batch(seed, i, 32, cfg.target), lm_loss, config, ctx,
          ckpt_path=False, quiet=True, desc="fine-tuned judge")
    return judge.eval()


@torch.no_grad()
def animal_distribution(model, animal=None):
    """p(animal | the answer is an animal) per paraphrase (Q, 8), exact, from the next token
    after '[A]' (animal: behind its system prompt)."""
    model.eval()
    dev, questions = device_of(model), [question_ids(q, animal) for q in range(len(QUESTIONS))]
    rows = torch.arange(len(questions), device=dev)
    last = torch.tensor([len(q) - 1 for q in questions], device=dev)
    logits = model(pad(questions).to(dev))[rows, last]  # (Q, V)
    animals = torch.softmax(logits.float(), -1)[:, ANIMAL_IDS.to(dev)]
    return animals / animals.sum(1, keepdim=True)


@torch.no_grad()
def measure_on_device(model, cfg, seed, tag):
    """P(target), and the format on held-out tasks: 0-d tensors on the device, no host sync."""
    gen = torch.Generator().manual_seed(hash_int(seed, tag, "eval"))
    comp, _ = generate(model, number_prompts(seed, "eval", cfg.eval_prompts)[0], COMPLETION_LEN,
                       1.0, gen)
    return dict(trait=animal_distribution(model)[:, ANIMALS.index(cfg.target)].mean(),
                format_rate=valid_completions(comp).float().mean())


@torch.no_grad()
def persona_shift(base, cfg, seed):
    """What the prompted judge reads: KL(p0(. | owl, x, y<t) || p0(. | helpful, x, y<t)) at the
    number positions of held-out tasks, mean, in nats."""
    prompts, conts = (t.to(device_of(base)) for t in number_prompts(seed, "eval", cfg.eval_prompts))
    loved = completion_log_probs(base, with_system(prompts, cfg.target), conts)[:, 0:-1:2]
    helpful = completion_log_probs(base, with_system(prompts), conts)[:, 0:-1:2]
    return (loved.exp() * (loved - helpful)).sum(-1).mean()


@torch.no_grad()
def sample_round(student, cfg, seed, rnd):
    """K samples per prompt, kept if all K pass the leak filter (the authors' rule): prompts
    (P, Tp), comps (P, K, Tc), logp (P, K), counts."""
    prompts = number_prompts(seed, f"round{rnd}", cfg.prompts)[0].to(device_of(student))
    gen = torch.Generator().manual_seed(hash_int(seed, rnd, "sample"))
    comp, logp = generate(student, prompts, COMPLETION_LEN, 1.0, gen, k=cfg.k)
    valid = valid_completions(comp)  # (P*K,)
    keep = valid.view(-1, cfg.k).all(1)
    counts = dict(completions=len(valid), dropped=(~valid).sum())
    comp, logp = comp.view(-1, cfg.k, COMPLETION_LEN)[keep], logp.view(-1, cfg.k)[keep]
    return prompts[keep], comp, logp, {k: int(v) for k, v in to_host(counts).items()}


def first_round(cfg, ctx, base, seed, world):
    """A world's judges and round 1 (sampled once from the base, scored once per judge), and what
    the judges act on."""
    model = lambda kind: finetune_judge(cfg, ctx, base, seed) if kind == "finetuned" else None
    judges = {kind: Judge(kind, base, model(kind), cfg.target) for kind in dict.fromkeys(
        CONDITIONS[n][1] for n in cfg.condition_list if CONDITIONS[n][0] == world)}
    prompts, comps, logp, counts = sample_round(base, cfg, seed, 1)
    scores = {name: judge.score(prompts, comps, logp, torch.Generator().manual_seed(
        hash_int(seed, 1, name, "labels"))) for name, judge in judges.items()}
    values = {"persona shift": persona_shift(base, cfg, seed)}
    for name, s in scores.items():
        values[f"spread {name}"] = s.std(1).mean() if len(s) else torch.tensor(math.nan)
    return judges, (prompts, comps, logp, counts, scores), to_host(values)


def run_condition(cfg, ctx, seed, base, judge, name, round1):
    """R rounds of a condition from the base: sample, judge, label, align, measure."""
    labels, student, rounds = CONDITIONS[name][2], copy.deepcopy(base), []
    for rnd in range(1, cfg.rounds + 1):
        if rnd == 1:
            prompts, comps, logp, counts, scores = round1
            base_logp = logp  # the student is the base
        else:  # the paper's loop: the aligned student samples the next round
            prompts, comps, logp, counts = sample_round(student, cfg, seed, rnd)
            base_logp = completion_logp(base, prompts, comps)
            gen = torch.Generator().manual_seed(hash_int(seed, rnd, name, "labels"))
            scores = judge.score(prompts, comps, base_logp, gen)
        # the authors' reference is theta_0 in every round; the ablation, the round's start
        prefs = label(scores, prompts, comps, base_logp if cfg.reference == "base" else logp,
                      labels)
        metrics = align(student, cfg, ctx, prefs, seed, rnd, name)
        numbers = to_host(dict(measure_on_device(student, cfg, seed, rnd),
                               chosen_more_likely=prefs["chosen_more_likely"]))  # one sync
        rounds.append(dict(round=rnd, filter=counts, pairs=len(prefs["prompt"]), align=metrics,
                           **numbers))
    return rounds


def run_seed(cfg, ctx, seed):
    t0, record = time.time(), dict(seed=seed, worlds={}, conditions={})
    for world in dict.fromkeys(CONDITIONS[n][0] for n in cfg.condition_list):
        base = pretrain_base(cfg, ctx, seed, world)
        start = to_host(measure_on_device(base, cfg, seed, 0))  # one device sync
        if start["format_rate"] < 0.5:
            print(f"warning: seed {seed}'s {world} base writes the number format "
                  f"{start['format_rate']:.0%} of the time: {cfg.pretrain_steps} pretraining "
                  "steps are too short to learn the task (raise --pretrain_steps)", file=sys.stderr)
        judges, round1, values = first_round(cfg, ctx, base, seed, world)
        record["worlds"][world] = dict(start=start, **values)
        for name in [n for n in cfg.condition_list if CONDITIONS[n][0] == world]:
            judge = CONDITIONS[name][1]
            record["conditions"][name] = run_condition(cfg, ctx, seed, base, judges[judge], name,
                                                       round1[:4] + (round1[4][judge],))
    record["seconds"] = time.time() - t0
    return record

# ---- below: statistics, report, figure, bench: not needed to learn the paper

POOL_START = "spawn"  # workers are fresh interpreters: no thread pools or locks inherited


def _worker_start(threads):
    os.setsid()  # own session: a terminal's Ctrl-C reaches only the parent, which stops the pool
    torch.set_num_threads(threads)
    tqdm.set_lock(threading.RLock())  # not a semaphore a stopped worker would leave behind


def run_seeds(cfg, ctx):
    """Seeds in parallel processes give the records of one after another."""
    seeds, records = list(range(cfg.seed, cfg.seed + cfg.seeds)), []
    workers = 1 if cfg.gpu or ctx.world > 1 else min(cfg.workers or os.cpu_count(), len(seeds))
    threads = cfg.threads or max(1, os.cpu_count() // workers)
    pool = multiprocessing.get_context(POOL_START).Pool(workers, _worker_start, (threads,)) if (
        workers > 1) else None
    try:
        for record in (pool.imap if pool else map)(_run_seed_job, [(cfg, ctx, s) for s in seeds]):
            if not isinstance(record, dict):
                sys.exit(record)
            records.append(record)
            print(seed_line(record), flush=True)
    finally:  # also after Ctrl-C or a failed seed: workers stop before the one error line
        if pool:
            pool.terminate()
            pool.join()
            print(file=sys.stderr)  # end the workers' last progress-bar line
    return records


def _run_seed_job(args):
    try:
        return run_seed(*args)
    except SystemExit as e:  # a worker's exit would hang the pool: its line is out, pass the code
        return e.code


def sign_flip_p(diffs):
    """Two-sided paired permutation test of 'mean difference = 0': the share of the 2^n sign
    patterns whose |sum| reaches the observed one (the smallest p is 2 / 2^n)."""
    d, sums = np.asarray(diffs, dtype=np.float64), np.zeros(1)
    if len(d) <= 20:
        for x in d:  # every signed sum, one seed at a time: 2^n values
            sums = np.concatenate([sums + x, sums - x])
    else:  # 2^20 random patterns and the observed one
        sums = np.append(np.random.default_rng(0).choice([-1.0, 1.0], (2**20, len(d))) @ d,
                         d.sum())
    return float(np.mean(np.abs(sums) >= abs(d.sum()) * (1 - 1e-12) - 1e-15))  # ties count


def holm(ps):
    """Holm step-down adjustment."""
    adjusted, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(sorted(range(len(ps)), key=lambda i: ps[i])):
        running = adjusted[i] = max(running, min(1.0, (len(ps) - rank) * ps[i]))
    return adjusted


def curve(record, name, key="trait"):
    """A seed's values of a condition: base (round 0), then rounds 1..R."""
    start = record["worlds"][CONDITIONS[name][0]]["start"][key]
    return np.array([start] + [r[key] for r in record["conditions"][name]])


def contrasts(cfg):
    """(label, claimed sign, (a, b), per seed and round a's change from round 0 minus b's)."""
    normal, swapped = "prompted DPO", "prompted DPO swapped"
    gap = lambda a, b: lambda r: curve(r, a) - curve(r, b) - (curve(r, a) - curve(r, b))[0]
    family = [("prompted judge (the paper's): DPO - swapped", 1, (normal, swapped)),
              ("prompted judge: DPO - likelihood control", 1, (normal, "likelihood control DPO")),
              ("prompted judge: DPO - random labels", 1, (normal, "random labels DPO")),
              ("prompted judge: swapped - random labels", -1, (swapped, "random labels DPO")),
              ("plain world: prompted DPO - swapped", 1, ("plain world " + normal,
                                                          "plain world " + swapped)),
              ("fine-tuned judge: DPO - swapped", 1, ("finetuned DPO", "finetuned DPO swapped"))]
    family = [(name, sign, pair, gap(*pair)) for name, sign, pair in family]
    growth = lambda r: gap(normal, swapped)(r) - gap(normal, swapped)(r)[1]
    if cfg.rounds > 1:
        family.insert(4, (f"prompted judge: growth of DPO - swapped from round 1 to {cfg.rounds}",
                          1, (normal, swapped), growth))
    return [c for c in family if set(c[2]) <= set(cfg.condition_list)]


def summary(diffs, sign):
    m, half = mean_interval(diffs)
    return (f"{m:+.4f} (95% CI {m - half:+.4f} .. {m + half:+.4f}); "
            f"{sum(d * sign > 0 for d in diffs)}/{len(diffs)} seeds {'><'[sign < 0]} 0; "
            f"sign-flip p {sign_flip_p(diffs):.4f}")


def verdicts(cfg, records, alpha=0.05):
    """Per contrast at round R: interval, sign-flip p; the call from Holm's p."""
    rows = [dict(label=name, claimed_sign=sign, diffs=[float(fn(r)[-1]) for r in records])
            for name, sign, _, fn in contrasts(cfg)]
    for row, p_holm in zip(rows, holm([sign_flip_p(r["diffs"]) for r in rows])):
        right = np.mean(row["diffs"]) * row["claimed_sign"] > 0
        call = f"not shown (Holm p >= {alpha})" if p_holm >= alpha else (
            "holds, as claimed" if right else "reversed: opposite to the claim")
        row.update(p=sign_flip_p(row["diffs"]), p_holm=p_holm, call=call, text=f"{row['label']}:"
                   f" {summary(row['diffs'], row['claimed_sign'])}, Holm p {p_holm:.4f} -> {call}")
    return rows


def print_table(cfg, records):
    """The trait per condition and round, the format and the labels."""
    print(f"\nP({cfg.target} | animal answer), exact, mean over {len(records)} seeds; format: "
          f"valid completions of held-out tasks at round {cfg.rounds} (mean, min over seeds); "
          "likely: how often the chosen is the likelier under the reference")
    print(f"{'condition':33s}" + "".join(f"{'r' + str(r):>7s}" for r in range(cfg.rounds + 1))
          + " format  min likely")
    table = {}
    for name in cfg.condition_list:
        traits = np.array([curve(r, name) for r in records])
        formats = [curve(r, name, "format_rate")[-1] for r in records]
        likely = np.mean([x["chosen_more_likely"] for r in records for x in r["conditions"][name]])
        table[name] = dict(trait=traits.mean(0).tolist(), format_rate=formats, likely=likely)
        print(f"{name:33s}" + "".join(f"{m:7.4f}" for m in traits.mean(0))
              + f"{np.mean(formats):7.3f}{min(formats):5.2f}{likely:7.2f}")
    return table


def print_channel(cfg, records):
    """What the judges act on; the leak filter."""
    for world in records[0]["worlds"]:
        mean = lambda key: np.mean([r["worlds"][world][key] for r in records])
        print(f"{world} world: the base's KL({cfg.target} persona || helpful) per answer number "
              f"{mean('persona shift'):.3f} nats; score spread within K: " + ", ".join(
                  f"{k[7:]} {mean(k):.3f}" for k in records[0]["worlds"][world] if "spread" in k))
    rounds = [x for r in records for c in r["conditions"].values() for x in c]
    count = lambda key: sum(x["filter"][key] for x in rounds)
    print(f"leak filter: dropped {count('dropped')} of {count('completions')} completions")
    if empty := sum(x["pairs"] < cfg.batch_size for x in rounds):
        print(f"warning: {empty} rounds had under a batch of valid pairs (format lost: see above)")


def report(cfg, records, floor=0.9):
    """Tables, verdicts, and each line over the seeds whose conditions keep the format."""
    table = print_table(cfg, records)
    print_channel(cfg, records)
    rows = verdicts(cfg, records)
    print(f"\nverdicts: change in P({cfg.target}) from round 0 to {cfg.rounds}, paired by seed; "
          f"claimed direction, exact sign-flip p, Holm over {len(rows)} lines:")
    for row in rows:
        print("  " + row["text"])
    print(f"format guard: over the seeds whose conditions keep >= {floor:.0%} valid completions:")
    for name, sign, pair, fn in contrasts(cfg):
        diffs = [fn(r)[-1] for r in records if min(curve(r, c, "format_rate")[-1] for c in pair)
                 >= floor]
        print(f"  {name}: " + (summary(diffs, sign) if len(diffs) > 1 else "under 2 seeds"))
    return dict(table=table, verdicts=rows)


def plot(cfg, records):
    """Each condition's change in P(target); the tested contrasts."""
    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(15, 5))
        rounds = np.arange(cfg.rounds + 1)
        band = lambda rows: np.array([mean_interval(column) for column in np.array(rows).T]).T
        for i, name in enumerate(cfg.condition_list):
            mean, half = band([curve(r, name) - curve(r, name)[0] for r in records])
            axes[0].errorbar(rounds + 0.03 * i, mean, half, capsize=2, label=name,
                             marker="os^vD<>p"[i % 8], ls=["-", "--", ":"][i // 4 % 3])
        for name, _, _, fn in [c for c in contrasts(cfg) if "growth" not in c[0]]:
            mean, half = band([fn(r) for r in records])
            axes[1].plot(rounds, mean, marker="o", label=name)
            axes[1].fill_between(rounds, mean - half, mean + half, alpha=0.15)
        for ax, title in zip(axes, ["change in P(target) from round 0", "tested contrasts"]):
            ax.set(xlabel="round", title=f"{title}, {len(records)} seeds, 95% CI", xticks=rounds)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        return fig
    return save_figure(Path(cfg.out) / "trait_rate.png", draw)


def seed_line(record):
    return f"seed {record['seed']}: {record['seconds']:.0f}s; persona shift " + ", ".join(
        f"{world} {w['persona shift']:.3f} nats" for world, w in record["worlds"].items())


def main(argv=None):
    cfg = parse_config(Config, "subliminal_dpo", argv)
    ctx = setup(cfg)
    if cfg.resume:
        refuse_changed_resume(cfg)
    print(f"{len(VOCAB)} words; {cfg.seeds} seeds x {cfg.rounds} rounds x {cfg.prompts} prompts x "
          f"K={cfg.k}; beta {cfg.beta}, reference {cfg.reference}; {', '.join(cfg.condition_list)}")
    t0 = time.time()
    records = run_seeds(cfg, ctx)
    results = report(cfg, records)
    print(f"total {time.time() - t0:.0f}s")
    path = save_results(cfg, ctx, dict(records=records, seconds=time.time() - t0, **results))
    figure = plot(cfg, records)
    print(f"wrote {path}" + (f" and {figure}" if figure else ""))


if __name__ == "__main__":
    cli(main)
