"""The reproduction cards in docs/reproducibility.md are generated from the experiment configs and up to date."""

from __future__ import annotations

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from tools.cards import PAGE, card, compose_experiment, experiments, render, replace_section


@pytest.fixture(autouse=True)
def fresh_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def test_the_page_holds_the_cards_the_configs_give():
    page = PAGE.read_text()
    assert replace_section(page, render()) == page, "docs/reproducibility.md is stale: run python -m tools.cards"
    for name in experiments():
        assert f"### `{name}`" in page


def test_card_numbers_follow_the_config():
    cfg = compose_experiment("imagenet_vim_tiny", ["trainer.devices=4", "trainer.accumulate_grad_batches=3"])
    text = card("imagenet_vim_tiny", cfg)
    assert "**Effective global batch:** 1536 = 128 per device × 4 devices × 1 node × 3 accumulated" in text
    assert "**Learning rate:** 0.0015 = 0.0005 × 1536 / 512 (`linear_lr`)" in text
    assert "76.1 % top-1" in text and "repeated augmentation" in text and "decays the 2-D A_logs" in text
    assert "`python run.py experiment=imagenet_vim_tiny`" in text


def test_a_recipe_without_its_target_is_named():
    cfg = compose_experiment("demo_seg_nuclei")
    with open_dict(cfg):
        del cfg.recipe["target"]
    with pytest.raises(ValueError, match="conf/experiment/demo_seg_nuclei.yaml has no recipe.target"):
        card("demo_seg_nuclei", cfg)
