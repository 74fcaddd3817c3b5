"""Custom model via the Python API, all the way: capture -> profile -> plan -> sample.

U-ViT (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models", CVPR 2023)
treats time, condition and image patches all as tokens and adds long skip connections from
each shallow block to its mirror deep block, as a UNet does. Nothing here depends on diffusers:
any nn.Module whose forward has no Python control flow on tensor values can be captured.

    python examples/custom_model.py                   # reference schedule, one process
    python examples/custom_model.py --ranks           # also on 2 real processes (gloo)

The stages: ``capture_model`` (fx graph, verified against eager) -> ``build_op_graph`` ->
``profile_model`` (every node timed here) -> ``make_plan`` (latency-balanced cut into N
segments) -> ``split_graph`` -> ``denoise``, a plain DDIM loop with classifier-free guidance,
driving the single-process ``ReferenceSchedule`` (W = T: the unsplit model exactly; W = 1:
AsyncDiff's stale schedule) or one ``AsyncDenoiser`` per rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_table(num_steps: int, dim: int) -> torch.Tensor:
    """The (num_steps, dim) table of sin/cos timestep embeddings (DDPM, Transformer)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = torch.arange(num_steps, dtype=torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d = x.shape[1], x.shape[2]
        q, k, v = self.qkv(x).reshape(-1, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(-1, n, d))


class Block(nn.Module):
    """Pre-norm transformer block; a deep block first merges its long skip (concat + linear)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, skip: bool = False) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:  # fixed at construction: not a tensor-value branch
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """Class-conditional U-ViT noise predictor on a (C, H, W) latent.

    Tokens: [time, class, patch_1 .. patch_L]. Blocks: depth//2 shallow ("in"), one middle,
    depth//2 deep ("out"); deep block i takes the output of shallow block depth//2-1-i.
    """

    def __init__(
        self,
        img_size: int = 16,
        patch_size: int = 2,
        in_chans: int = 4,
        embed_dim: int = 64,
        depth: int = 7,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: int = 10,
        num_steps: int = 1000,
    ) -> None:
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid = img_size // patch_size
        num_patches = self.grid**2
        self.extras = 2  # time token + class token

        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.register_buffer("time_table", sinusoidal_table(num_steps, embed_dim), persistent=False)
        self.time_mlp = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim)
        )
        self.label_emb = nn.Embedding(num_classes + 1, embed_dim)  # +1: the null label of CFG
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

        self.in_blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth // 2))
        self.mid_block = Block(embed_dim, num_heads, mlp_ratio)
        self.out_blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, skip=True) for _ in range(depth // 2)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        x = self.patch_embed(sample).flatten(2).transpose(1, 2)  # (B, L, D)
        t_tok = self.time_mlp(self.time_table[timestep]).unsqueeze(1)
        y_tok = self.label_emb(class_labels).unsqueeze(1)
        x = torch.cat([t_tok, y_tok, x], dim=1) + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())

        x = self.decoder_pred(self.norm(x))[:, self.extras :]
        return self.final_layer(self.unpatchify(x))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        g, p, c = self.grid, self.patch_size, self.in_chans
        x = x.reshape(-1, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return x.reshape(-1, c, g * p, g * p)


def build_uvit(seed: int = 0) -> nn.Module:
    """A small U-ViT with random weights, in eval mode."""
    torch.manual_seed(seed)
    return UViT().eval()


def example_inputs(batch: int = 2, seed: int = 0) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) for ``build_uvit()``: a 4x16x16 latent, one timestep, class labels."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 16, 16, generator=gen)
    timestep = torch.randint(0, 1000, (1,), generator=gen).expand(batch)
    class_labels = torch.randint(0, 10, (batch,), generator=gen)
    return (sample,), {"timestep": timestep, "class_labels": class_labels}


STEPS, GUIDANCE, DIGITS = 10, 3.0, [0, 1, 2, 3]  # one sample per class label


def _loop_inputs(seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The initial noise and the conditioning of the guided batch (null label first, as in ``denoise``)."""
    noise = torch.randn(len(DIGITS), 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor(DIGITS)
    return noise, {"class_labels": torch.cat([torch.full_like(labels, 10), labels])}


def sample(denoiser: Any, captured: Any) -> torch.Tensor:
    """A 10-step DDIM run of ``denoiser`` (any StepDenoiser) from seeded noise."""
    from diffusers import DDIMScheduler

    from asyncdiff_partition.pipelines.wrap import denoise

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(STEPS)
    noise, cond = _loop_inputs()
    return denoise(denoiser, captured, scheduler=scheduler, latents=noise, timesteps=scheduler.timesteps, cond=cond,
                   guidance_scale=GUIDANCE)


def model_output(out: Any) -> torch.Tensor:
    """The graph's output tensor (a graph may return it alone or in a tuple)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def capture() -> Any:
    """Capture the U-ViT at the loop's shapes: the guided batch is twice the samples."""
    from asyncdiff_partition.fx.capture import capture_model

    args, kwargs = example_inputs(batch=2 * len(DIGITS))
    return capture_model(build_uvit(), args, kwargs)  # verified against eager on two inputs


def rank_sample(plan_path: str) -> torch.Tensor:
    """One rank of the 2-process run: capture, keep this rank's segment, sample (runs under ``launch``)."""
    from asyncdiff_partition.core.plan import Plan
    from asyncdiff_partition.fx.ready import ready_segments
    from asyncdiff_partition.runtime import comm
    from asyncdiff_partition.runtime.denoiser import AsyncDenoiser, segment_for_rank

    torch.set_num_threads(1)
    plan = Plan.load(plan_path)
    comm.init()
    captured = capture()  # each rank captures for itself; the ranks check that they agree
    segment = segment_for_rank(ready_segments(captured, plan, world_size=comm.world_size()))
    denoiser = AsyncDenoiser(segment, plan, input_names=[s.name for s in captured.inputs], latent=captured.latent.name,
                             warmup=1, stride=1, timestep_input="timestep")
    return sample(denoiser, captured)


def main() -> None:
    """Capture, profile and plan the U-ViT for 2 devices, then sample with the plan."""
    import argparse
    import tempfile

    from asyncdiff_partition.core.placement import place
    from asyncdiff_partition.core.plan import format_plan, make_plan
    from asyncdiff_partition.core.summary import format_summary, summarize_model
    from asyncdiff_partition.fx.opgraph import build_op_graph
    from asyncdiff_partition.fx.profiler import profile_model
    from asyncdiff_partition.fx.split import split_graph
    from asyncdiff_partition.runtime.reference import ReferenceSchedule

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", action="store_true", help="also sample on 2 real processes (gloo)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per node while profiling")
    options = parser.parse_args()
    torch.set_num_threads(1)

    captured = capture()  # 1. capture
    graph = build_op_graph(captured)
    print(format_summary(summarize_model(captured, graph, model_name="U-ViT (examples/custom_model.py)")))
    profile = profile_model(captured, model_name="uvit", repeats=options.repeats)  # 2. profile
    plan = make_plan(profile, 2, warmup=1, steps=STEPS)  # 3. plan
    print(format_plan(plan, title="plan for 2 devices"))

    segments = split_graph(captured, place(graph, plan.boundaries))  # 4. sample
    exact = sample(ReferenceSchedule(segments, warmup=STEPS), captured)
    eager = sample(lambda inputs: model_output(captured.graph_module(*inputs.values())), captured)
    stale = sample(ReferenceSchedule(segments, warmup=1), captured)
    print(f"W={STEPS} (exact) vs the unsplit model: max abs diff {(exact - eager).abs().max().item():.3g}")
    print(f"W=1 (AsyncDiff, 2 segments) vs exact: max abs diff {(stale - exact).abs().max().item():.3g}")
    if options.ranks:
        from asyncdiff_partition.runtime.launch import launch

        with tempfile.TemporaryDirectory() as folder:
            path = plan.save(f"{folder}/plan.json")
            results = launch(rank_sample, (str(path),), nproc=2, timeout_s=120)
        print(f"2 ranks vs the W=1 reference: max abs diff {(results[0] - stale).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
