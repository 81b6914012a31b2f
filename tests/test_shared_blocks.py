"""The blocks that several model files share are the same text in each of them.

Each model file stays self-contained and copyable (CleanRL style), so a helper two files need is copied into
both; the rule is that the copies stay identical. SHARED lists every such block with the files that hold a
copy, and each is compared line for line (decorators and trailing comments included). PER_FILE lists the names
that several files define on purpose, each file its own version. A top-level name defined in two or more model
files must be in one of the two, so a new copy, or a new function that reuses a shared name, cannot go
unnoticed."""

import ast
import difflib

import pytest

from helpers import ROOT

MODEL_FILES = sorted(p.name for p in ROOT.glob("*.py") if p.name != "common.py")

SHARED = {
    # ddpm.py's U-Net, reused by the score SDE
    "timestep_embedding": ("ddpm.py", "ncsn_sde.py"),
    "MLP": ("ddpm.py", "ncsn_sde.py"),
    "group_norm": ("ddpm.py", "ncsn_sde.py"),
    "zero_init": ("ddpm.py", "ncsn_sde.py"),
    "ResBlock": ("ddpm.py", "ncsn_sde.py"),
    "AttnBlock": ("ddpm.py", "ncsn_sde.py"),
    "UNet": ("ddpm.py", "ncsn_sde.py"),
    "EMA": ("ddpm.py", "ncsn_sde.py"),
    # decoder likelihoods and Gaussian latents of the VAE family
    "_log1mexp": ("ddpm.py", "iwae.py", "nvae.py", "vae.py", "vqvae.py"),
    "bernoulli_log_prob": ("iwae.py", "nvae.py", "savae.py", "vae.py", "vqvae.py"),
    "discretized_logistic_log_prob": ("iwae.py", "vae.py", "vqvae.py"),
    "gaussian_log_prob": ("iwae.py", "vae.py"),
    "decoder_mean": ("iwae.py", "vae.py"),
    "reparameterize": ("iwae.py", "savae.py", "vae.py"),
    "gaussian_kl": ("savae.py", "vae.py"),
    "log_normal_logvar": ("iwae.py", "savae.py", "vae.py"),
    "active_units": ("iwae.py", "savae.py", "vae.py"),
    "mlp": ("flows.py", "savae.py", "vae.py"),
    # continuous-time densities and 2D pictures
    "divergence_exact": ("ffjord.py", "ncsn_sde.py"),
    "divergence_hutchinson": ("ffjord.py", "ncsn_sde.py"),
    "sample_probe": ("ffjord.py", "ncsn_sde.py"),
    "grid_points": ("ebm_jem.py", "ffjord.py", "flows.py", "ncsn_sde.py"),
}

PER_FILE = {
    "Args": "each model's own options",
    "train": "each model's own training loop",
    "evaluate": "each model's own metrics",
    "evaluate_and_draw": "each model's own evaluation and pictures",
    "draw_pictures": "each model's own pictures",
    "report": "each model's own summary line",
    "sample": "each model's own sampler",
    "build_model": "a Diffusion in ddpm.py, a ScoreModel in ncsn_sde.py",
    "to_model": "each file's data scaling (ncsn_sde.py dequantizes, ddpm.py keeps the 8-bit grid)",
    "to_data": "the inverse of each file's to_model",
    "density_on_grid":
        "each file's model density: FFJORD's exact-trace log_prob, the score SDE's ODE likelihood",
    "conv_net": "an energy network in ebm_jem.py, a coupling network in flows.py",
    "evaluate_images": "image metrics of an energy model (ebm_jem.py) and of a flow (flows.py)",
    "ResidualBlock": "a coupling network's block in flows.py, a gated masked block in pixelcnn.py",
    "importance_weighted_log_px": "each model's own importance sampler (latent layout and decoder differ)",
    "log_weights": "log p(x, z) - log q(z | x) of each model's own latents (nvae.py, savae.py)",
    "learning_rate": "each schedule: iwae.py the paper's, cosine or constant; nvae.py cosine to lr_min",
}


def top_level_blocks(name: str) -> dict[str, str]:
    """Each model file's top-level function or class called `name`: file -> its lines, decorators included."""
    blocks = {}
    for file in MODEL_FILES:
        source = (ROOT / file).read_text()
        lines = source.splitlines()
        for node in ast.parse(source).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                blocks[file] = "\n".join(lines[start - 1 : node.end_lineno])
    return blocks


def defined_names() -> dict[str, list[str]]:
    """Top-level function and class names -> the model files that define them."""
    files = {}
    for file in MODEL_FILES:
        for node in ast.parse((ROOT / file).read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                files.setdefault(node.name, []).append(file)
    return files


@pytest.mark.parametrize("name", sorted(SHARED))
def test_every_copy_of_a_shared_block_is_the_same_text(name):
    blocks = top_level_blocks(name)
    assert tuple(sorted(blocks)) == tuple(sorted(SHARED[name])), f"{name} is defined in {sorted(blocks)}"
    first, *others = sorted(blocks)
    for other in others:
        diff = "\n".join(difflib.unified_diff(blocks[first].splitlines(), blocks[other].splitlines(), first,
                                              other, lineterm=""))
        assert blocks[other] == blocks[first], f"{name} differs between {first} and {other}:\n{diff}"


def test_every_name_in_two_model_files_is_shared_or_per_file_by_design():
    assert not set(SHARED) & set(PER_FILE)
    repeated = {name: files for name, files in defined_names().items() if len(files) > 1}
    unlisted = {name: files for name, files in repeated.items()
                if name not in SHARED and name not in PER_FILE}
    assert not unlisted, f"list these in SHARED (identical copies) or PER_FILE (with the reason): {unlisted}"
    stale = sorted(set(SHARED) - set(repeated)) + sorted(set(PER_FILE) - set(repeated))
    assert not stale, f"no longer defined in two model files: {stale}"
