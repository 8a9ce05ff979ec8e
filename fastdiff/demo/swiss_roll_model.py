"""The 2015 swiss-roll model and its training (Sohl-Dickstein et al. 2015, "Deep Unsupervised Learning
using Nonequilibrium Thermodynamics"): an MLP whose output is the mean and log-variance of each
reverse step p(x_{t-1} | x_t), trained on the closed-form KL of the variational bound
(`fastdiff.diffusion_loss(..., loss="kl")`).

Architecture after their released code (Diffusion-Probabilistic-Models, model.py): a network
shared by every timestep, then a per-timestep readout of (mu, sigma) coefficients (their
`temporal_readout`, which blends the shared features through 10 smooth temporal basis functions);
here each timestep has a tail of its own, a small MLP with one hidden layer. The outputs are read as
their `get_mu_sigma` reads them: the mean is a perturbation of the forward step's mean,
mu = sqrt(1 - beta_t) x_t + sqrt(beta_t) f_mu, and the variance one of the forward step's variance
(theirs: sigmoid(f / sqrt(T) + logit beta_t); here log sigma^2 = log beta_t + f_var). The model
returns (mean, log variance) = [mu; log sigma^2], what DDPMSampler(prediction_type="mean",
variance_type="learned_log_variance") samples from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..samplers.ddpm import DDPMSampler
from ..training import diffusion_loss


class PerTimestepTails(nn.Module):
    """One small MLP (in -> hidden -> out) per timestep, applied to each row with its own timestep.

    Rows are grouped by timestep and each group goes through its tail in one batched matmul
    (torch.baddbmm over the timesteps present), so a batch with all T timesteps costs two bmm calls,
    not T small ones. Training batches come laid out by timestep (`stratified_timesteps`: k rows of
    t = 0, then k of t = 1, ...), which needs no grouping at all.
    """

    def __init__(self, num_timesteps: int, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_timesteps, in_features, hidden))
        self.b1 = nn.Parameter(torch.empty(num_timesteps, hidden))
        # The last layer starts at 0: the model starts as the forward kernel (mean sqrt(1 - beta) x,
        # variance beta), the isotropic baseline their code's DEBUG lines check.
        self.w2 = nn.Parameter(torch.zeros(num_timesteps, hidden, out_features))
        self.b2 = nn.Parameter(torch.zeros(num_timesteps, out_features))
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default initialisation, per tail
        nn.init.uniform_(self.w1, -bound, bound)
        nn.init.uniform_(self.b1, -bound, bound)

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        num_timesteps = self.w1.shape[0]
        if len(t) % num_timesteps == 0 and torch.equal(t, stratified_timesteps(len(t), num_timesteps, t.device)):
            z = nn.functional.silu(torch.baddbmm(self.b1.unsqueeze(1), h.reshape(num_timesteps, -1, h.shape[1]),
                                                 self.w1))
            return torch.baddbmm(self.b2.unsqueeze(1), z, self.w2).reshape(len(t), -1)
        present, group, counts = torch.unique(t, return_inverse=True, return_counts=True)
        if len(present) == 1:  # sampling: the whole batch is at one timestep
            k = present[0]
            return nn.functional.silu(h @ self.w1[k] + self.b1[k]) @ self.w2[k] + self.b2[k]
        order = torch.argsort(group, stable=True)
        g = group[order]
        position = torch.arange(len(t), device=t.device) - (torch.cumsum(counts, 0) - counts)[g]
        padded = h.new_zeros(len(present), int(counts.max()), h.shape[1])
        padded[g, position] = h[order]
        z = nn.functional.silu(torch.baddbmm(self.b1[present].unsqueeze(1), padded, self.w1[present]))
        out = torch.baddbmm(self.b2[present].unsqueeze(1), z, self.w2[present])
        return out[g, position][torch.argsort(order)]


def stratified_timesteps(batch: int, num_timesteps: int, device=None) -> torch.Tensor:
    """[batch] int64: batch / T rows of each timestep, in order (every training batch sees every t equally)."""
    if batch % num_timesteps:
        raise ValueError(f"a stratified batch needs a multiple of {num_timesteps} rows, got {batch}")
    return torch.arange(num_timesteps, device=device).repeat_interleave(batch // num_timesteps)


class SwissRollModel(nn.Module):
    """(x_t [B, 2], t [B]) -> [mean; log variance] [B, 4] of p(x_{t-1} | x_t) for one 2-D diffusion."""

    def __init__(self, betas: torch.Tensor, hidden: int = 128, tail_hidden: int = 64, dim: int = 2):
        super().__init__()
        self.config = dict(hidden=hidden, tail_hidden=tail_hidden, dim=dim, num_timesteps=len(betas))
        self.dim = dim
        self.register_buffer("betas", betas.detach().to(torch.float32).clone())
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                   nn.Linear(hidden, hidden), nn.SiLU())
        self.tails = PerTimestepTails(len(betas), hidden, tail_hidden, 2 * dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0]).to(torch.int64)
        f_mean, f_var = self.tails(self.trunk(x), t).split(self.dim, dim=1)
        beta = self.betas[t][:, None]
        mean = torch.sqrt(1 - beta) * x + torch.sqrt(beta) * f_mean  # their get_mu_sigma: around the forward mean
        return torch.cat([mean, torch.log(beta) + f_var], dim=1)


def make_sampler(num_train_timesteps: int = 40) -> DDPMSampler:
    """The 2015 setup as a fastdiff sampler: sigmoid betas in [1e-5, 0.3], the model's mean and log variance."""
    return DDPMSampler(num_train_timesteps=num_train_timesteps, beta_schedule="sigmoid_2015", prediction_type="mean",
                       variance_type="learned_log_variance", clip_sample=False)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1500
    batch_size: int = 1040  # 26 rows per timestep
    learning_rate: float = 1e-2
    seed: int = 0


class Adam:
    """Adam (Kingma & Ba 2015, Algorithm 1) over a few parameter tensors.

    Written out because constructing any torch.optim optimizer imports torch._dynamo: ~3 s of
    start-up here (more on a loaded CPU), longer than the whole --smoke training.
    """

    def __init__(self, parameters, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.parameters]
        self.betas, self.eps, self.steps = betas, eps, 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        for p, (m, v) in zip(self.parameters, self.moments):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            p.addcdiv_(m, (v / correction2).sqrt_().add_(self.eps), value=-lr / correction1)

    def zero_grad(self) -> None:
        for p in self.parameters:
            p.grad = None


def train(model: SwissRollModel, sampler: DDPMSampler, data: torch.Tensor, settings: TrainSettings,
          progress: bool = True) -> list[float]:
    """Adam on diffusion_loss(loss="kl") over batches drawn from `data`, learning rate decayed to 0 on a
    cosine; returns the loss of every step."""
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = Adam(model.parameters())
    losses = []
    timesteps = stratified_timesteps(settings.batch_size, sampler.config.num_train_timesteps)
    model.train()
    bar = tqdm(range(settings.steps), desc="training", disable=not progress)
    for step in bar:
        x0 = data[torch.randint(0, len(data), (settings.batch_size,), generator=generator)]
        # Stratified timesteps (every t in every batch), noise from torch.randn (repeatable run to run).
        loss = diffusion_loss(model, x0, sampler, loss="kl", timesteps=timesteps, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(settings.learning_rate * 0.5 * (1 + math.cos(math.pi * step / settings.steps)))
        losses.append(loss.detach())
        if step % 100 == 0 or step == settings.steps - 1:
            bar.set_postfix(kl=f"{loss.item():.4f}")
    model.eval()
    return torch.stack(losses).tolist()
