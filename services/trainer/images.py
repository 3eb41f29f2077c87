"""Image GRPO: a text-to-image diffusion policy trained on group win rates from a referee judge.

The method, in the order the code runs it:
- DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning"): the denoising
  chain is a policy. Each DDIM step with ``eta > 0`` (Song et al. 2021) samples the next latent
  from a Gaussian whose mean and variance are known, so every step has a log-probability.
- Pref-GRPO (Wang et al. 2025): the images generated for one prompt form a group; the judge
  compares them (a vision-language judge through ``/winrate``, or a CLIP-style scorer through
  Bradley-Terry on its scores), and each image's win rate, normalised within its group (GRPO's
  advantage), is its reward.
- The update is PPO's clipped ratio, per denoising step, on the trajectories just sampled.

Two pipelines share that loop:
- ``--model tiny`` (default): a randomly initialised pixel-space UNet (32x32 RGB, a learned
  byte embedding of the prompt as its text condition). It learns nothing useful; it is a smoke test
  of the whole loop (sampling, judging through the server, the update) that runs in minutes on a
  CPU.
- ``--model <a diffusers Stable-Diffusion-style pipeline>`` (a hub id or folder, on a GPU): its
  UNet, VAE, text encoder and tokenizer, latent space, no classifier-free guidance.

    python -m trainer.images --url http://HOST:8000 --judge clip --steps 20
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from referee.defaults import DEFAULT_URL

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = [
    "a red fox standing in fresh snow",
    "a lighthouse on a cliff at sunset",
    "a bowl of green apples on a wooden table",
    "a blue bicycle leaning against a brick wall",
]


@dataclass
class ImageGRPOSettings:
    url: str = DEFAULT_URL
    api_key: str | None = None
    judge: str | None = None
    order: str = "both"  # generative judges: each pair in both orders (position-debiased)
    model: str = "tiny"
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    prompts_per_step: int = 2
    group_size: int = 4
    steps: int = 2
    denoising_steps: int = 8
    eta: float = 1.0
    learning_rate: float = 1e-4
    clip_range: float = 0.2  # PPO ratio clip, per denoising step
    seed: int = 0
    device: str = "cpu"
    output_dir: Path = Path("runs/images")


# ------------------------------------------------------------------ pipelines


class TinyPipeline:
    """A random pixel-space text-to-image UNet, 32x32 RGB; the prompt's bytes are its condition."""

    size = 32

    def __init__(self, device: str, seed: int) -> None:
        import torch
        from diffusers import UNet2DConditionModel

        torch.manual_seed(seed)
        self.device = device
        self.unet = UNet2DConditionModel(
            sample_size=self.size,
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        ).to(device)
        self.embed = torch.nn.Embedding(256, 32).to(device)
        self.shape = (3, self.size, self.size)

    def parameters(self):
        return [*self.unet.parameters(), *self.embed.parameters()]

    def condition(self, prompts: list[str]):
        import torch

        ids = [list(p.encode()[:48]) + [0] * (48 - len(p.encode()[:48])) for p in prompts]
        return self.embed(torch.tensor(ids, device=self.device))

    def eps(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample

    def decode(self, x):
        return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


class DiffusersPipeline:
    """A Stable-Diffusion-style pipeline's parts (a GPU run): latents through its VAE."""

    def __init__(self, model: str, device: str, seed: int) -> None:
        import torch
        from diffusers import DiffusionPipeline

        torch.manual_seed(seed)
        pipe = DiffusionPipeline.from_pretrained(model)
        self.device = device
        self.unet = pipe.unet.to(device)
        self.vae = pipe.vae.to(device).requires_grad_(False)
        self.text_encoder = pipe.text_encoder.to(device).requires_grad_(False)
        self.tokenizer = pipe.tokenizer
        channels, size = self.unet.config.in_channels, self.unet.config.sample_size
        self.shape = (channels, size, size)

    def parameters(self):
        return list(self.unet.parameters())

    def condition(self, prompts: list[str]):
        import torch

        ids = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(self.device)  # fmt: skip
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    def eps(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample

    def decode(self, x):
        import torch

        with torch.no_grad():
            images = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).float().cpu().numpy()


# ------------------------------------------------------------------ DDIM as a Gaussian policy


class DDIMPolicy:
    """DDIM steps with noise ``eta``: x_{t-1} ~ N(mean(x_t, eps), std_t^2) (Song et al. 2021, eq. 12)."""

    def __init__(self, steps: int, eta: float, device: str) -> None:
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
        self.scheduler.set_timesteps(steps)
        self.timesteps = self.scheduler.timesteps.to(device)
        self.alphas = self.scheduler.alphas_cumprod.to(device)
        self.eta = eta
        self.stride = self.scheduler.config.num_train_timesteps // steps

    def _alpha(self, t: int):
        return self.alphas[t] if t >= 0 else self.alphas.new_tensor(1.0)

    def mean_std(self, x, eps, t: int):
        a_t, a_prev = self._alpha(t), self._alpha(t - self.stride)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * variance.clamp(min=1e-20).sqrt()
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
        return mean, std

    @staticmethod
    def log_prob(sample, mean, std):
        """The Gaussian log-density of each sample, summed over its dimensions."""
        per = -((sample - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
        return per.flatten(1).sum(1)


# ------------------------------------------------------------------ the loop


async def judge_groups(client, prompts: list[str], images: list, settings: ImageGRPOSettings) -> list:
    """Win rates per prompt group (``group_size`` consecutive images per prompt); one /winrate each."""
    calls = []
    for k, prompt in enumerate(prompts):
        group = images[k * settings.group_size : (k + 1) * settings.group_size]
        calls.append(
            client.winrate(prompt=prompt, responses=group, judge=settings.judge, order=settings.order)
        )
    return await asyncio.gather(*calls)


def run(settings: ImageGRPOSettings) -> Path:
    import random

    import torch

    from referee.client import AsyncReferee

    out = settings.output_dir
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(settings.seed)
    pipe = (
        TinyPipeline(settings.device, settings.seed)
        if settings.model == "tiny"
        else DiffusersPipeline(settings.model, settings.device, settings.seed)
    )
    policy = DDIMPolicy(settings.denoising_steps, settings.eta, settings.device)
    params = pipe.parameters()
    initial = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
    rows = []

    async def loop() -> None:
        async with AsyncReferee(settings.url, api_key=settings.api_key, timeout=600) as client:
            for step in range(settings.steps):
                started = time.perf_counter()
                prompts = rng.sample(settings.prompts, min(settings.prompts_per_step, len(settings.prompts)))
                batch = [p for p in prompts for _ in range(settings.group_size)]
                # 1. sample trajectories, keeping each step's log-probability
                with torch.no_grad():
                    cond = pipe.condition(batch)
                    x = torch.randn(len(batch), *pipe.shape, device=settings.device)
                    trajectory = []
                    for t in policy.timesteps:
                        mean, std = policy.mean_std(x, pipe.eps(x, t, cond), int(t))
                        nxt = mean + std * torch.randn_like(x)
                        trajectory.append((x, t, nxt, policy.log_prob(nxt, mean, std)))
                        x = nxt
                images = list(pipe.decode(x))
                # 2. judge each prompt's group; GRPO advantages from the win rates
                judged = await judge_groups(client, prompts, images, settings)
                advantages, left_out = [], 0
                for result in judged:
                    for a in result.advantages:
                        left_out += a is None  # no valid comparison: no gradient, counted
                        advantages.append(0.0 if a is None else a)
                adv = torch.tensor(advantages, device=settings.device)
                # 3. PPO-clipped update on every denoising step
                optimizer.zero_grad()
                total = 0.0
                for x_t, t, nxt, old in trajectory:  # one backward per step: memory of one step
                    cond = pipe.condition(batch)
                    mean, std = policy.mean_std(x_t, pipe.eps(x_t, t, cond), int(t))
                    ratio = torch.exp(policy.log_prob(nxt, mean, std) - old)
                    clipped = ratio.clamp(1 - settings.clip_range, 1 + settings.clip_range)
                    loss = -torch.min(ratio * adv, clipped * adv).mean() / len(trajectory)
                    loss.backward()
                    total += float(loss)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                rates = [w for r in judged for w in r.win_rates if w is not None]
                row = {
                    "step": step + 1,
                    "loss": total,
                    "win_rate_std": float(torch.tensor(rates).std()) if len(rates) > 1 else 0.0,
                    "comparisons": sum(r.comparisons for r in judged),
                    "invalid": sum(r.invalid for r in judged),
                    "left_out": left_out,
                    "engine_requests": sum(r.usage.engine_requests for r in judged),
                    "seconds": round(time.perf_counter() - started, 2),
                }
                rows.append(row)
                logger.info("step %d: %s", step + 1, row)
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")

    asyncio.run(loop())
    moved = math.sqrt(sum(float(((p.detach() - q) ** 2).sum()) for p, q in zip(params, initial, strict=True)))
    summary = {"steps": len(rows), "last": rows[-1] if rows else None, "parameter_change_l2": moved}
    (out / "summary.json").write_text(json.dumps(summary))
    return out


app = typer.Typer(add_completion=False)


@app.command()
def main(
    url: Annotated[str, typer.Option(help="The referee server.")] = DEFAULT_URL,
    judge: Annotated[str | None, typer.Option(help="A judge that sees images (/judges: media).")] = None,
    order: Annotated[str, typer.Option(help="Generative judges: single, random or both.")] = "both",
    model: Annotated[
        str, typer.Option(help="tiny, or a diffusers Stable-Diffusion-style pipeline.")
    ] = "tiny",
    steps: Annotated[int, typer.Option(help="GRPO steps.")] = 2,
    group_size: Annotated[int, typer.Option(help="Images per prompt (a group).")] = 4,
    prompts_per_step: Annotated[int, typer.Option(help="Prompts per step.")] = 2,
    denoising_steps: Annotated[int, typer.Option(help="DDIM steps per image.")] = 8,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    output_dir: Annotated[Path, typer.Option(help="Where metrics.jsonl goes.")] = Path("runs/images"),
    api_key: Annotated[
        str | None, typer.Option(envvar="REFEREE_API_KEY", show_default=False, help="The tenant's API key.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Train a text-to-image policy with GRPO on win rates from a referee image judge."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = ImageGRPOSettings(
        url=url, api_key=api_key, judge=judge, order=order, model=model, steps=steps, group_size=group_size,
        prompts_per_step=prompts_per_step, denoising_steps=denoising_steps, device=device,
        output_dir=output_dir, seed=seed,
    )  # fmt: skip
    out = run(settings)
    typer.echo(f"done: {out / 'metrics.jsonl'}")


if __name__ == "__main__":
    app()
