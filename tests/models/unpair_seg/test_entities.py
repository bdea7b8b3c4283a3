"""models/unpair_seg/entities.py: the rule-based noun-phrase extractor on hand-written captions, plural handling,
ShapesWorld's exact entities (from specs and parsed from captions; the rule-based extractor must give the same list on
ShapesWorld captions), hold-out filtering and bad inputs."""

from __future__ import annotations

import pytest

from models.unpair_seg.entities import (EntityExtractor, NounPhraseExtractor, ShapesWorldEntities, dedup,
                                        filter_holdout, get_extractor, singularize)
from train.data.shapes import ObjectSpec, ShapesWorld


@pytest.mark.parametrize("caption,expected", [
    ("The image shows two dogs playing on the green grass next to a wooden bench.",
     ["dog", "green grass", "wooden bench"]),
    ("A man in a red shirt is riding a bicycle.", ["man", "red shirt", "bicycle"]),
    ("The sky is blue and clear.", ["sky"]),
    ("There are several people and three cats.", ["person", "cat"]),
    ("It is a sunny day", ["sunny day"]),
    ("the cat's tail is long", ["cat", "tail"]),
    ("In this picture, we can see a group of children standing near the old buildings; a few trees and benches "
     "are visible.", ["child", "old building", "tree", "bench"]),
    ("A close view of boxes, glasses and dishes on the left side of a kitchen table.",
     ["box", "glasses", "dish", "kitchen table"]),
    ("Two red buses and a bus stop. Two red buses!", ["red bus", "bus stop"]),
    ("", []),
    ("It. They. Them.", []),
])
def test_noun_phrases_of_hand_written_captions(caption, expected):
    assert NounPhraseExtractor()(caption) == expected


def test_sharegpt4v_style_paragraph():
    caption = ("The image captures a bustling city street at dusk. In the foreground, a yellow taxi is parked beside "
               "a fire hydrant, while several pedestrians walk along the sidewalk. Tall skyscrapers rise in the "
               "background, their windows reflecting the orange sky.")
    got = NounPhraseExtractor()(caption)
    # "bustling" reads as a verb form: the heuristics have no part-of-speech tagger (module docstring, rule 2).
    assert got == ["city street", "dusk", "yellow taxi", "fire hydrant", "pedestrian", "sidewalk",
                   "tall skyscraper", "window", "orange sky"]


def test_max_words_keeps_the_head_and_its_nearest_modifiers():
    assert NounPhraseExtractor(max_words=2)("a very large shiny red ball") == ["red ball"]
    assert NounPhraseExtractor(max_words=4)("a very large shiny red ball") == ["large shiny red ball"]


@pytest.mark.parametrize("plural,singular", [
    ("circles", "circle"), ("crosses", "cross"), ("ellipses", "ellipse"), ("boxes", "box"), ("benches", "bench"),
    ("dishes", "dish"), ("berries", "berry"), ("leaves", "leaf"), ("people", "person"), ("children", "child"),
    ("houses", "house"), ("buses", "bus"), ("glass", "glass"), ("grass", "grass"), ("bus", "bus"),
    ("glasses", "glasses"), ("star", "star"), ("cactus", "cactus"), ("dogs", "dog"), ("photos", "photo"),
])
def test_singularize(plural, singular):
    assert singularize(plural) == singular


def test_dedup_keeps_first_positions():
    assert dedup(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]


def _scenes(world: ShapesWorld, n: int):
    return [world.scene(i) for i in range(n)]


def test_shapes_world_captions_give_the_exact_entities():
    world = ShapesWorld(seed=3, size=(32, 32), min_objects=1, max_objects=5)
    exact, rule = ShapesWorldEntities(), NounPhraseExtractor()
    for scene in _scenes(world, 40):
        want = dedup(f"{sp.size} {sp.colour} {sp.category}" for sp in scene.specs)  # independent of the class
        caption = scene.caption()
        assert exact.from_scene(scene) == want, caption
        assert exact(caption) == want, caption
        assert rule(caption) == want, caption


def test_shapes_world_duplicates_and_attribute_subsets():
    world = ShapesWorld(seed=0, size=(32, 32))
    specs = [ObjectSpec("circle", "red", "large", 0.2, (0.3, 0.3), depth=0.8),
             ObjectSpec("star", "blue", "small", 0.1, (0.8, 0.8), depth=0.5),
             ObjectSpec("circle", "red", "large", 0.2, (0.7, 0.3), depth=0.2)]
    scene = world.render(specs)
    cap = scene.caption()
    assert cap.startswith("three shapes: a large red circle")
    assert ShapesWorldEntities()(cap) == ["large red circle", "small blue star"]
    assert NounPhraseExtractor()(cap) == ["large red circle", "small blue star"]
    assert ShapesWorldEntities(("colour",)).from_specs(specs) == ["red circle", "blue star"]
    assert ShapesWorldEntities(()).from_scene(scene) == ["circle", "star"]
    assert ShapesWorldEntities(("colour", "size")).attributes == ("size", "colour")  # fixed order
    assert ShapesWorldEntities()("an empty scene.") == []
    assert NounPhraseExtractor()("an empty scene.") == []


def test_extractors_satisfy_the_protocol_and_registry():
    assert isinstance(NounPhraseExtractor(), EntityExtractor)
    assert isinstance(ShapesWorldEntities(), EntityExtractor)
    assert isinstance(get_extractor(None), NounPhraseExtractor)
    assert isinstance(get_extractor("shapes"), ShapesWorldEntities)
    fn = lambda c: [c]  # noqa: E731
    assert get_extractor(fn) is fn
    with pytest.raises(ValueError, match="unknown extractor"):
        get_extractor("llm")
    with pytest.raises(TypeError, match="callable"):
        get_extractor(3)


def test_filter_holdout_whole_words():
    ents = ["small blue star", "starfish", "red circle", "large green cross", "stars"]
    assert filter_holdout(ents, ["star"]) == ["starfish", "red circle", "large green cross", "stars"]
    assert filter_holdout(ents, ["Star", "green cross"]) == ["starfish", "red circle", "stars"]
    assert filter_holdout(ents, []) == ents
    with pytest.raises(ValueError, match="held-out"):
        filter_holdout(ents, [""])


def test_bad_inputs():
    with pytest.raises(TypeError, match="caption"):
        NounPhraseExtractor()(None)
    with pytest.raises(TypeError, match="caption"):
        ShapesWorldEntities()(b"a red circle")
    with pytest.raises(ValueError, match="not a ShapesWorld caption"):
        ShapesWorldEntities()("A dog on a bench.")
    with pytest.raises(ValueError, match="object phrase"):
        ShapesWorldEntities()("two shapes: a large red circle in the top left and a tiny pink blob at the bottom.")
    with pytest.raises(ValueError, match="max_words"):
        NounPhraseExtractor(max_words=0)
    with pytest.raises(ValueError, match="attributes"):
        ShapesWorldEntities(("shape",))
    with pytest.raises(TypeError, match="ObjectSpec"):
        ShapesWorldEntities().from_specs([object()])
    with pytest.raises(TypeError, match="word"):
        singularize(3)
