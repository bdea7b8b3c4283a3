"""ShapesWorld (train/data/shapes.py): determinism and exact ground truth, checked by independent re-derivations."""

import dataclasses
import math

import numpy as np
import pytest

from train.data import shapes
from train.data.shapes import Background, ObjectSpec, ShapesWorld

# Crowded scenes, so that occlusion, twins (for superlatives and relations) and junctions of several objects occur.
WORLD = ShapesWorld(seed=3, max_objects=6)
SCENES = [WORLD.scene(i) for i in range(30)]
FIELDS = ("image", "coverage", "amodal", "instance", "depth", "edges")


def _same(a, b) -> bool:
    return a.specs == b.specs and a.background == b.background and all(
        getattr(a, f).dtype == getattr(b, f).dtype and np.array_equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def test_determinism_and_seeds():
    a = ShapesWorld(seed=5).scene(7)
    ShapesWorld(seed=5).scene(11)  # no hidden state: other calls in between change nothing
    b = ShapesWorld(seed=5).scene(7)
    assert _same(a, b)
    assert not np.array_equal(a.image, ShapesWorld(seed=6).scene(7).image)
    assert not np.array_equal(a.image, ShapesWorld(seed=5).scene(8).image)
    c1, c2 = ShapesWorld(seed=5).clip(7, 4), ShapesWorld(seed=5).clip(7, 4)
    assert all(_same(x, y) for x, y in zip(c1.frames, c2.frames)) and np.array_equal(c1.velocity, c2.velocity)


def test_fields_types_and_ranges():
    for sc in SCENES:
        h, w = sc.size
        n = len(sc.specs)
        assert 1 <= n <= 6
        assert sc.image.shape == (h, w, 3) and sc.image.dtype == np.float32
        assert sc.image.min() >= 0 and sc.image.max() <= 1
        assert sc.coverage.shape == (n + 1, h, w) and sc.amodal.shape == (n, h, w)
        assert sc.instance.dtype == np.int32 and sc.depth.dtype == np.float32 and sc.edges.dtype == bool
        assert sc.depth.min() >= 0 and sc.depth.max() <= 1
        assert all(sp.category in shapes.CATEGORIES and sp.colour in shapes.PALETTE and sp.size in shapes.SIZES
                   for sp in sc.specs)
        assert [sp.depth for sp in sc.specs] == sorted((sp.depth for sp in sc.specs), reverse=True)  # farthest first


def test_instance_masks_partition_the_foreground():
    for sc in SCENES:
        m = sc.masks
        assert m.sum(0).max() <= 1  # disjoint
        assert np.array_equal(m.any(0), sc.foreground)
        assert np.array_equal(sc.instance, (m * np.arange(1, len(sc.specs) + 1)[:, None, None]).sum(0))
        np.testing.assert_allclose(sc.coverage.sum(0), 1.0, atol=1e-6)
        assert np.array_equal(sc.instance, sc.coverage.argmax(0))
        for o in sc.objects:  # scene() keeps every object visible enough (checked at 64 x 64, the size here)
            assert o.area >= 4 and o.area >= WORLD.min_visible * o.amodal.sum()
            assert np.array_equal(o.mask, m[o.index]) and o.id == o.index + 1


def test_render_colours_exact_away_from_antialiased_edges():
    interior = interior_full = 0
    for sc in SCENES:
        for j, sp in enumerate(sc.specs):
            full = sc.coverage[j + 1] == 1.0
            assert full.any()
            np.testing.assert_allclose(sc.image[full], np.broadcast_to(np.float32(sp.rgb), (int(full.sum()), 3)),
                                       rtol=0, atol=1e-6)
            # Mask pixels whose 4-neighbours are in the mask too are (nearly always) fully covered: the mask is not
            # just a threshold of something blurry.
            m = sc.masks[j]
            core = m.copy()
            core[1:] &= m[:-1]
            core[:-1] &= m[1:]
            core[:, 1:] &= m[:, :-1]
            core[:, :-1] &= m[:, 1:]
            interior += int(core.sum())
            interior_full += int((core & full).sum())
        bg_full = sc.coverage[0] == 1.0
        ys, xs = np.nonzero(bg_full)
        want = sc.background.evaluate(xs + 0.5, ys + 0.5, sc.width, sc.height)
        np.testing.assert_allclose(sc.image[bg_full], want, rtol=0, atol=1e-6)
        palette = np.float32(list(shapes.PALETTE.values()))
        assert np.abs(sc.image[bg_full][:, None] - palette[None]).max(-1).min() > 0.05  # background != any colour
    assert interior_full >= 0.97 * interior


def test_depth_order_matches_occlusion():
    occluded_pairs = 0
    for sc in SCENES:
        n = len(sc.specs)
        assert np.all(sc.coverage[1:] <= sc.amodal + 1e-6)  # visible never exceeds the whole shape
        for j in range(n):
            nearer = sc.amodal[j + 1:].sum(0) if j + 1 < n else np.zeros(sc.size, np.float32)
            free = nearer == 0
            np.testing.assert_allclose(sc.coverage[j + 1][free], sc.amodal[j][free], atol=1e-6)
            for i in range(j):  # i is farther than j: where j covers a pixel fully, i is never visible
                assert not (sc.masks[i] & (sc.amodal[j] == 1.0)).any()
                if (sc.amodal[i] > 0.5).any() and ((sc.amodal[i] > 0) & (sc.amodal[j] > 0)).any():
                    occluded_pairs += 1
    assert occluded_pairs >= 10  # the scenes above do exercise occlusion


def test_depth_map_planes_and_order():
    for sc in SCENES:
        h, w = sc.size
        s = min(h, w)
        yy, xx = np.mgrid[0:h, 0:w] + 0.5
        lo, hi = shapes.BACKGROUND_DEPTH
        bg = sc.instance == 0
        np.testing.assert_allclose(sc.depth[bg], (lo + (hi - lo) * (1 - yy / h))[bg], atol=1e-6)
        ranges = []
        for j, sp in enumerate(sc.specs):
            m = sc.masks[j]
            plane = sp.depth + sp.slope[0] * (xx - sp.center[0] * w) / s + sp.slope[1] * (yy - sp.center[1] * h) / s
            np.testing.assert_allclose(sc.depth[m], plane[m], atol=1e-6)
            ranges.append((sc.depth[m].min(), sc.depth[m].max()))
        for j in range(1, len(ranges)):  # nearer (later) objects are nearer everywhere, and all nearer than the floor
            assert ranges[j][1] < ranges[j - 1][0]
        if (~bg).any():
            assert sc.depth[~bg].max() < sc.depth[bg].min() if bg.any() else True


def test_boxes_are_tight():
    for sc in SCENES:
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            assert tuple(sc.boxes[o.index]) == o.box
            inside = np.zeros(sc.size, bool)
            inside[y0:y1, x0:x1] = True
            assert not (o.mask & ~inside).any()
            assert o.mask[y0, x0:x1].any() and o.mask[y1 - 1, x0:x1].any()
            assert o.mask[y0:y1, x0].any() and o.mask[y0:y1, x1 - 1].any()


def test_edges_are_exactly_the_mask_boundaries():
    for sc in SCENES:
        inst = sc.instance
        padded = np.pad(inst, 1, mode="edge")  # outside the image counts as the same label: no edge at the border
        h, w = inst.shape
        boundary = np.zeros_like(sc.edges)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            boundary |= padded[dy:dy + h, dx:dx + w] != inst
        assert np.array_equal(sc.edges, boundary & (inst > 0))
        fg = sc.foreground
        fg_boundary = np.zeros_like(fg)
        pf = np.pad(fg, 1, mode="edge")
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            fg_boundary |= pf[dy:dy + h, dx:dx + w] != fg
        assert not (fg_boundary & fg & ~sc.edges).any()  # the foreground's boundary is in the edge map
        for o in sc.objects:
            assert (sc.edges & o.mask).any()


def test_shape_geometry():
    # One large object per category, centred, at 256 x 256: the coverage-weighted area is the analytic area.
    world = ShapesWorld(size=256)
    r = 0.25
    rp = r * 256
    star_inner = shapes._STAR_INNER * math.sin(math.pi / 5)
    areas = {"circle": math.pi, "ellipse": math.pi * shapes._ELLIPSE_MINOR, "square": (2 * shapes._SQUARE_HALF) ** 2,
             "cross": 2 * (2 * shapes._CROSS_ARM) * (2 * shapes._CROSS_HALF_WIDTH) - (2 * shapes._CROSS_HALF_WIDTH) ** 2,
             "triangle": 3 * math.sqrt(3) / 4, "star": 5 * star_inner}
    for cat, area in areas.items():
        for angle in (0.0, 1.0):
            sc = world.render([ObjectSpec(cat, "red", "large", r, (0.5, 0.5), angle=angle)])
            assert sc.amodal[0].sum() / rp ** 2 == pytest.approx(area, rel=5e-3), cat
            assert sc.coverage[1].sum() / rp ** 2 == pytest.approx(area, rel=5e-3), cat
    # An axis-aligned square has a closed-form mask: half side 0.7 * 16 = 11.2 px around 32 -> [20.8, 43.2].
    sc = ShapesWorld().render([ObjectSpec("square", "blue", "large", 0.25, (0.5, 0.5))])
    assert sc.objects[0].box == (21, 21, 43, 43) and sc.objects[0].area == 22 * 22
    full = sc.coverage[1] == 1
    assert full.sum() == 22 * 22


def test_resolution_independence():
    big = WORLD.resized((128, 128))
    for i in range(6):
        a, b = WORLD.scene(i), big.scene(i)
        assert a.specs == b.specs and b.size == (128, 128)
        # The same scene: the 2x render, box-filtered down, is close to the 1x render.
        down = b.image.reshape(64, 2, 64, 2, 3).mean((1, 3))
        assert np.abs(down - a.image).mean() < 0.02


# -- language -----------------------------------------------------------------------------------------------------------

SIZE_WORDS, COLOUR_WORDS, CATEGORY_WORDS = set(shapes.SIZES), set(shapes.PALETTE), set(shapes.CATEGORIES)


def _parse_np(words):
    attrs = {}
    for wd in words:
        key = "size" if wd in SIZE_WORDS else "colour" if wd in COLOUR_WORDS else "category"
        assert key != "category" or wd in CATEGORY_WORDS, f"unknown word {wd!r}"
        assert key not in attrs
        attrs[key] = wd
    assert "category" in attrs
    return attrs


def parse(text):
    """A tiny independent parser: 'the [superlative] [size] [colour] category [relation the [size] [colour] cat]'."""
    words = text.split()
    assert words[0] == "the"
    words = words[1:]
    rel = anchor = None
    for r in ("left of", "right of", "above", "below"):
        rw = r.split()
        for p in range(len(words) - len(rw) + 1):
            if words[p:p + len(rw)] == rw:
                assert words[p + len(rw)] == "the"
                rel, anchor, words = r, _parse_np(words[p + len(rw) + 1:]), words[:p]
                break
        if rel:
            break
    sup = words[0] if words[0].endswith("most") else None
    return {"subject": _parse_np(words[1:] if sup else words), "superlative": sup, "relation": rel, "anchor": anchor}


def denote(scene, parsed):
    """What the parsed phrase denotes, from object centres with the documented margin."""
    m = shapes.RELATION_MARGIN * min(scene.size)
    objs = scene.objects

    def match(o, attrs):
        return all(getattr(o.spec, k) == v for k, v in attrs.items())

    cands = [o for o in objs if match(o, parsed["subject"])]
    if parsed["relation"]:
        anchors = [o for o in objs if match(o, parsed["anchor"])]
        assert len(anchors) == 1, "the anchor must be unique"
        (ax, ay) = anchors[0].center_px
        test = {"left of": lambda x, y: x < ax - m, "right of": lambda x, y: x > ax + m,
                "above": lambda x, y: y < ay - m, "below": lambda x, y: y > ay + m}[parsed["relation"]]
        cands = [o for o in cands if test(*o.center_px)]
    if parsed["superlative"]:
        key = {"leftmost": lambda o: o.center_px[0], "rightmost": lambda o: -o.center_px[0],
               "topmost": lambda o: o.center_px[1], "bottommost": lambda o: -o.center_px[1]}[parsed["superlative"]]
        cands = sorted(cands, key=key)
        if len(cands) > 1 and not key(cands[1]) - key(cands[0]) > m:
            return []
        cands = cands[:1]
    return [o.index for o in cands]


def test_referring_expressions_resolve_to_their_object():
    kinds = set()
    for sc in SCENES:
        for j in range(len(sc.specs)):
            exprs = sc.expressions(j)
            for e in exprs:
                assert not e.ambiguous and e.target == j
                assert denote(sc, parse(e.text)) == [j], e.text
                assert sc.resolve(e) == [j]
                kinds.add("relation" if e.relation else "superlative" if e.superlative else "attributes")
            best = sc.expression(j)
            if exprs:
                # Preference: plain attributes (fewest words first), then superlatives, then relations.
                plain = [e for e in exprs if not (e.relation or e.superlative)]
                sup = [e for e in exprs if e.superlative]
                assert best == exprs[0] == (plain or sup or exprs)[0]
                assert len(best.text.split()) == min(len(e.text.split()) for e in (plain or sup or exprs))
            else:
                assert best.ambiguous and j in denote(sc, parse(best.text)) and len(denote(sc, parse(best.text))) > 1
    assert kinds == {"attributes", "superlative", "relation"}


def test_expressions_hand_made_scenes():
    world = ShapesWorld()
    twins = [ObjectSpec("circle", "red", "small", 0.1, (0.2, 0.3), depth=0.6),
             ObjectSpec("circle", "red", "small", 0.1, (0.8, 0.3), depth=0.5),
             ObjectSpec("square", "blue", "medium", 0.15, (0.5, 0.75), depth=0.4)]
    sc = world.render(twins)
    texts = [e.text for e in sc.expressions(0)]
    assert sc.expression(0).text == "the leftmost circle"
    assert "the circle left of the square" in texts and "the circle right of the square" not in texts
    assert sc.expression(1).text == "the rightmost circle"
    assert sc.expression(2).text == "the square"
    # Two identical circles side by side within the margin, nothing else: no unique expression exists.
    sc = world.render([dataclasses.replace(twins[0], center=(0.5, 0.3)), dataclasses.replace(twins[1], center=(0.52, 0.6))])
    texts = [e.text for e in sc.expressions(0)]
    assert "the topmost circle" in texts
    sc = world.render([dataclasses.replace(twins[0], center=(0.5, 0.5)), dataclasses.replace(twins[1], center=(0.52, 0.52))])
    e = sc.expression(0)
    assert e.ambiguous and e.text == "the small red circle" and sc.expressions(0) == []
    assert sorted(denote(sc, parse(e.text))) == [0, 1]


def test_captions_name_every_object():
    for sc in SCENES[:10]:
        cap = sc.caption()
        assert cap.endswith(".") and cap.split(":")[0].endswith("shape" + ("s" if len(sc.specs) > 1 else ""))
        for o in sc.objects:
            oc = sc.object_caption(o.index)
            assert oc in cap
            head = f"a {o.size} {o.colour} {o.category} "
            assert oc.startswith(head)
            x, y = o.center_px
            col = "left" if x < sc.width / 3 else "right" if x > 2 * sc.width / 3 else None
            row = "top" if y < sc.height / 3 else "bottom" if y > 2 * sc.height / 3 else None
            want = (f"in the {row} {col}" if col and row else f"on the {col}" if col else f"at the {row}" if row
                    else "in the centre")
            assert oc[len(head):] == want


# -- video --------------------------------------------------------------------------------------------------------------


def _bounce(p, v, lo, hi, frames):
    """Step-by-step simulation (a different route than the closed form in the generator)."""
    out = [p]
    for _ in range(frames - 1):
        p += v
        if p > hi:
            p, v = 2 * hi - p, -v
        elif p < lo:
            p, v = 2 * lo - p, -v
        out.append(p)
    return out


def test_clip_motion_identity_and_masks():
    world = ShapesWorld(seed=4, max_objects=4, speed=(0.05, 0.08))  # fast, so that some objects bounce
    bounced = 0
    for i in range(4):
        t = 12
        clip = world.clip(i, t)
        first = world.scene(i)
        assert _same(clip.frames[0], first)  # frame 0 is the scene itself
        assert clip.video.shape == (t, 64, 64, 3) and clip.masks.shape == (t, len(first.specs), 64, 64)
        for j, sp in enumerate(first.specs):
            m = shapes._PLACEMENT * sp.radius * 64
            xs = _bounce(sp.center[0] * 64, clip.velocity[j, 0], m, 64 - m, t)
            ys = _bounce(sp.center[1] * 64, clip.velocity[j, 1], m, 64 - m, t)
            for f, fr in enumerate(clip.frames):
                got = fr.specs[j]
                assert (got.category, got.colour, got.size, got.depth, got.slope, got.angle) == (
                    sp.category, sp.colour, sp.size, sp.depth, sp.slope, sp.angle)
                assert got.center[0] * 64 == pytest.approx(xs[f], abs=1e-9)
                assert got.center[1] * 64 == pytest.approx(ys[f], abs=1e-9)
            speed = np.hypot(*clip.velocity[j]) / 64
            assert 0.05 <= speed <= 0.08
            bounced += int(np.sign(np.diff(xs)).min() != np.sign(np.diff(xs)).max())
        for fr in clip.frames:  # each frame is an ordinary render with exact per-frame ground truth
            assert _same(fr, world.render(fr.specs, first.background))
            assert fr.masks.sum(0).max() <= 1 and np.array_equal(fr.masks.any(0), fr.foreground)
    assert bounced >= 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        ShapesWorld(size=4)
    with pytest.raises(ValueError, match="max_objects"):
        ShapesWorld(max_objects=100)
    with pytest.raises(ValueError, match="categories"):
        ShapesWorld(categories=("circle", "hexagon"))
    with pytest.raises(ValueError, match="seed"):
        ShapesWorld(seed=-1)
    with pytest.raises(ValueError, match="scene index"):
        WORLD.scene(-1)
    with pytest.raises(ValueError, match="frames"):
        WORLD.clip(0, 0)
    with pytest.raises(ValueError, match="colour"):
        ObjectSpec("circle", "black", "small", 0.1, (0.5, 0.5))
    with pytest.raises(IndexError, match="object index"):
        SCENES[0].expressions(99)


def test_vocabulary_subsets_and_background():
    world = ShapesWorld(seed=1, categories=("star",), colours=("cyan", "white"), sizes=("large",))
    for i in range(5):
        sc = world.scene(i)
        assert all(sp.category == "star" and sp.colour in ("cyan", "white") and sp.size == "large" for sp in sc.specs)
    bg = Background((0.2, 0.3, 0.4), (0.6, 0.5, 0.4), direction=0.0)
    sc = ShapesWorld(size=(16, 32)).render([], bg)
    assert sc.size == (16, 32) and not sc.foreground.any() and not sc.edges.any() and sc.caption() == "an empty scene."
    assert sc.image[0, 0, 0] < sc.image[0, -1, 0]  # the gradient runs along +x for direction 0
