"""cli.py: train.py's command line, its resolution order, --config files, and answers that need no torch.

Run: python -m pytest tests/test_cli.py -q   (a few seconds; two subprocesses run train.py --help and a typo)
"""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import train

ROOT = Path(__file__).resolve().parent.parent


def test_config_resolution_user_then_demo_then_recipe():
    demo = train.make_config([])
    assert (demo.model, demo.height, demo.num_steps, demo.eta, demo.lr, demo.lora_rank) == (None, 64, 4, 0.7, 3e-2, 8)
    assert (demo.num_candidates, demo.advantage, demo.kl_beta, demo.eval_size) == (4, "group_norm", 0.0, 64)
    paper = train.make_config(["--model", "black-forest-labs/FLUX.1-dev"])  # beyond-the-paper options are off
    assert (paper.num_candidates, paper.advantage, paper.minibatches, paper.inner_epochs, paper.ema_decay,
            paper.group_judging, paper.same_noise) == (2, "paper", 1, 1, 0.0, "listwise", True)
    assert demo.judge_swap is True and train.make_config(["--no_judge_swap"]).judge_swap is False
    flux = train.make_config(["--model", "black-forest-labs/FLUX.1-dev", "--lr", "1e-4"])
    assert (flux.lr, flux.num_steps, flux.lora_rank, flux.lora_alpha, flux.kl_beta, flux.guidance, flux.height) == (
        1e-4, 8, 16, 32, 0.01, 3.5, 512)
    qwen = train.make_config(["--model", "Qwen/Qwen-Image-Edit-2509", "--model_type", "qwen_edit"])
    assert (qwen.lr, qwen.num_steps, qwen.lora_rank, qwen.lora_alpha, qwen.kl_beta, qwen.guidance) == (
        1e-5, 10, 32, 64, 0.02, None)


def test_help_shows_the_two_blocks_with_sources_recipes_and_choices():
    help_text = cli.build_parser(train.Config, train.RECIPES, "").format_help()
    paper_at, beyond_at = help_text.index(cli.PAPER + ":"), help_text.index(cli.BEYOND + ":")
    assert paper_at < help_text.index("--clip_range", paper_at) < beyond_at < help_text.index("--minibatches", beyond_at)
    assert "--no_judge_swap" in help_text and "recipe: flux 5e-05, qwen_edit 1e-05" in help_text
    assert "{exact,k1}" in help_text and "paper Table 3" in help_text
    blocks = {f.metadata["block"] for f in dataclasses.fields(train.Config)}
    assert blocks == {cli.PAPER, cli.BEYOND}
    first_beyond = [f.metadata["block"] for f in dataclasses.fields(train.Config)].index(cli.BEYOND)
    assert all(f.metadata["block"] == cli.BEYOND for f in dataclasses.fields(train.Config)[first_beyond:])
    assert all(f.metadata["source"] for f in dataclasses.fields(train.Config))


@pytest.mark.parametrize("argv, message", [
    (["--lr_rate", "1e-4"], "unknown option --lr_rate (did you mean --lr?)"),
    (["--judge_ur", "http://x/v1"], "unknown option --judge_ur (did you mean --judge_url?)"),  # no prefix match
    (["--num_steps", "1"], "--num_steps 1 is out of range (must be >= 2)"),
    (["--ema_decay", "1"], "--ema_decay 1.0 is out of range (must be in [0, 1))"),
    (["--kl_estimator", "k3"], "--kl_estimator: invalid choice: 'k3'"),
    (["--eta", "x"], "--eta: invalid float value: 'x'"),
])
def test_bad_options_are_one_line_errors(argv, message):
    with pytest.raises(cli.ConfigError) as info:
        train.make_config(["--model", "m", *argv])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_config_file_sits_between_the_recipe_and_the_flags(tmp_path):
    recipe = tmp_path / "run.toml"
    recipe.write_text('lr = 2e-5\nkl_estimator = "k1"\njudge_swap = false\nnum_steps = 6\n')
    cfg = train.make_config(["--model", "m", "--config", str(recipe), "--num_steps", "5"])
    assert (cfg.lr, cfg.kl_estimator, cfg.judge_swap, cfg.num_steps, cfg.lora_rank) == (2e-5, "k1", False, 5, 16)


@pytest.mark.parametrize("text, message", [
    ("lr_rate = 1e-4\n", "run.toml: unknown key 'lr_rate' (did you mean 'lr'?)"),
    ('num_steps = "eight"\n', "run.toml: num_steps = 'eight' should be a int"),
    ("judge_swap = 1\n", "run.toml: judge_swap = 1 should be a bool"),
    ("num_steps = 1\n", "--num_steps 1 is out of range"),
    ("lr = [\n", "run.toml: not a TOML file"),
])
def test_config_file_errors_name_the_key_and_the_file(tmp_path, text, message):
    (tmp_path / "run.toml").write_text(text)
    with pytest.raises(cli.ConfigError, match=re.escape(message)):
        train.make_config(["--model", "m", "--config", str(tmp_path / "run.toml")])


RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


def test_every_shipped_recipe_loads_through_the_parser_and_says_what_it_is():
    """recipes/*.toml through train.py's own parser (unknown keys, types and ranges checked), each opening with a
    header comment naming its source; the paper recipes are exactly the defaults --help says they are."""
    assert [p.name for p in RECIPES] == ["flux-paper.toml", "official.toml", "qwen-edit-paper.toml",
                                         "recommended.toml"]
    configs = {}
    for path in RECIPES:
        text = path.read_text(encoding="utf-8")
        header = text.split("\n\n")[0].splitlines()
        assert header[0].startswith(f"# {path.stem}: ") and "Source:" in text.split("\n# Add")[0], path
        configs[path.stem] = train.make_config(["--model", "m", "--config", str(path)])
    for name, argv in (("flux-paper", ["--model", "black-forest-labs/FLUX.1-dev"]),
                       ("qwen-edit-paper", ["--model", "Qwen/Qwen-Image-Edit-2509", "--model_type", "qwen_edit",
                                            "--source_area", str(512 * 512)])):
        recipe = train.make_config(["--config", str(ROOT / "recipes" / f"{name}.toml")])
        assert recipe == train.make_config(argv), name  # every field: the defaults, written out
    official, recommended = configs["official"], configs["recommended"]
    assert (official.kl_estimator, official.judge_swap) == ("k1", False)
    assert (recommended.kl_estimator, recommended.judge_swap, recommended.ema_decay) == ("exact", True, 0.99)
    qwen_official = train.make_config(["--model", "m", "--model_type", "qwen_edit", "--config",
                                       str(ROOT / "recipes" / "official.toml")])
    assert (qwen_official.lr, qwen_official.kl_beta, qwen_official.kl_estimator) == (1e-5, 0.02, "k1")
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60).stdout
    assert "the defaults are the paper's run: recipes/flux-paper.toml" in " ".join(out.split())


def run_train_py(*argv):
    """train.py run as a script in a fresh interpreter; returns (exit code, stderr, whether torch was imported)."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['train.py', *{list(argv)!r}]\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
            "print('torch' in sys.modules, code, file=sys.stdout)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    imported, exit_code = done.stdout.split()[-2:]
    return int(exit_code), done.stderr, imported == "True"


def test_help_and_a_typo_answer_before_torch_loads():
    code, _, torch_loaded = run_train_py("--help")
    assert code == 0 and not torch_loaded
    code, err, torch_loaded = run_train_py("--model", "m", "--lr_rate", "1")
    assert code == 2 and not torch_loaded and err.strip() == (
        "error: unknown option --lr_rate (did you mean --lr?) (--help lists every option)")
