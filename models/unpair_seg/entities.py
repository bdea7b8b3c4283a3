"""Entity extraction for Unpair-Seg stage 2 (thesis §3.3 "mask-entity alignment", spec §11.2).

An *entity* is a short noun phrase naming something visible ("red circle", "wooden bench", "sky"). The thesis
re-captions every image with an LVLM and extracts the entities of its caption; the official extraction rules are not
released (spec §11.2: nltk is in the requirements, an LLM is also plausible). Here the extractor is pluggable: anything
satisfying :class:`EntityExtractor` (a callable ``caption -> list[str]``) can be passed to the caption loader
(``train.data.captions.CaptionDataset``) and the stage-2 trainer, and entities stored in a manifest (its
``"entities"`` field, e.g. produced offline by an LVLM) take precedence over any extractor. Nothing here downloads or
calls a network model.

* :class:`NounPhraseExtractor` (the default): rule-based noun-phrase chunking with small built-in word lists
  (rules below).
* :class:`ShapesWorldEntities`: the exact entities of a ShapesWorld scene (``"large red circle"``: size, colour,
  category of every object, in painter's order, deduplicated), from the scene's specs, or parsed exactly from the
  scene's caption with the caption grammar of ``train.data.shapes.Scene.caption``. On ShapesWorld captions the
  rule-based extractor gives exactly the same list (tested), so ShapesWorld runs need no special casing.

Rules of :class:`NounPhraseExtractor`, in order (all lower-cased; the word lists are module constants):

1. Sentence / clause split: at ``. ! ? ; : ,`` and brackets / quotes, then at conjunctions (``and``, ``or``, ``but``,
   ``while``, ...).
2. Inside a clause, a phrase also ends at a preposition (``in``, ``on``, ``of``, ``with``, ``next`` ...), a verb or
   auxiliary from a small list (``is``, ``shows``, ``features``, ``walk`` ...), a relative pronoun (``which``,
   ``that`` ...), an adverb of place (``there``, ``here``), an ``-ing`` form that is not a known ``-ing`` noun
   (``building``, ``painting`` ...) or an ``-ed`` form (past participles; ``-eed`` words excepted). So "a dog sitting
   on a wooden bench" gives the phrases "a dog" and "a wooden bench": prepositional tails become phrases of their
   own, they are never glued to the head noun. Without a part-of-speech tagger these are heuristics: an attributive
   participle ends a phrase too ("a striped shirt" gives "shirt"), and a verb missing from the list stays in the
   phrase.
3. Leading determiners, numbers (digits and number words), quantifiers (``some``, ``several``, ``a few`` ...),
   possessive pronouns and intensifiers (``very`` ...) are stripped; a phrase that is then empty or only a pronoun
   (``it``, ``they`` ...) is dropped.
4. The adjective + noun chunk is kept: the last word is the head noun; at most ``max_words`` words (the last ones)
   are kept. Phrases whose head is a known adjective ("the sky is *blue*"), a meta noun of captions (``image``,
   ``picture``, ``scene``, ``shape`` ...) or a part / position noun (``side``, ``top``, ``left``, ``group``,
   ``pair`` ...) are dropped.
5. Plural -> singular for the simple cases of the head noun: a small irregular table (``people`` -> ``person``,
   ``leaves`` -> ``leaf`` ...), ``-ies`` -> ``-y``, ``-(s|ch|sh|x|z)es`` -> drop ``es``, else a trailing ``s`` that
   does not end ``ss``/``us``/``is`` (``circles`` -> ``circle``); plural-only and ``-s`` singular nouns (``glasses``,
   ``bus``, ``grass`` ...) are kept as they are.
6. Deduplication, keeping the first occurrence's position.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Protocol, Sequence, runtime_checkable

__all__ = ["EntityExtractor", "NounPhraseExtractor", "ShapesWorldEntities", "singularize", "dedup", "get_extractor",
           "filter_holdout"]


@runtime_checkable
class EntityExtractor(Protocol):
    """Anything that turns a caption into its entity list: ``extractor(caption: str) -> list[str]`` (lower-case noun
    phrases, deduplicated, in caption order)."""

    def __call__(self, caption: str) -> list[str]: ...


# ---------------------------------------------------------------------------------------------------------------------
# Word lists (small on purpose: simple, predictable rules beat a large lexicon nobody can audit)

DETERMINERS = frozenset("""a an the this that these those some any each every another other others either neither
    its their his her my our your whose such no all both half several many much few more most less least various
    numerous multiple certain own same entire whole""".split())
NUMBER_WORDS = frozenset("""zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen
    fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty hundred thousand dozen dozens hundreds
    thousands first second third fourth fifth single double couple""".split())
INTENSIFIERS = frozenset("""very quite rather really fairly pretty slightly somewhat extremely highly mostly partly
    partially also just only even too almost nearly""".split())
PRONOUNS = frozenset("""i me we us you he him she her it they them itself themselves himself herself one ones
    something someone somebody anything anyone everything everyone nothing none this that these those""".split())
CONJUNCTIONS = frozenset("""and or but nor yet so while whereas although though because as if than then plus
    including""".split())
PREPOSITIONS = frozenset("""in on at of with without by for from to into onto over under above below behind beside
    besides between among amongst around across along against near next inside outside within beneath underneath
    atop upon toward towards through throughout during before after via about like unlike amid amidst beyond past
    off out up down""".split())
RELATIVES = frozenset("which that who whom whose where when what how why".split())
VERBS = frozenset("""is are was were be been being am has have had having do does did can could may might must
    shall should will would shows show showed shown depicts depict depicted features feature contains contain
    displays display includes include appears appear appeared seems seem looks look sits sit stands stand lies lie
    rests rest hangs hang holds hold wears wear covers cover surrounds surround fills fill gives give creates create
    adds add captures capture showcases showcase highlights highlight suggests suggest indicates indicate reveals
    reveal presents present consists consist made placed located positioned seen visible covered filled surrounded
    set see sees saw find finds found notice walk walks rise rises run runs fly flies play plays grow grows float
    floats move moves ride rides eat eats swim swims lead leads reach reaches stretch stretches extend extends
    overlook overlooks sleep sleeps graze grazes perch perches wait waits there here""".split())
# Frequent caption nouns ending in "ing" (every other "-ing" word is taken for a verb form).
ING_NOUNS = frozenset("""building buildings ceiling ceilings clothing painting paintings ring rings king kings string
    strings wing wings thing things evening morning railing railings awning awnings swing swings spring springs
    icing frosting stuffing pudding wedding sibling siblings earring earrings duckling ducklings seedling seedlings
    bedding lighting flooring siding paneling panelling stocking stockings sling offering dumpling dumplings
    topping toppings pudding puddings crossing crossings landing opening openings""".split())
# Nouns that describe the caption's medium rather than its content.
META_NOUNS = frozenset("""image images picture pictures photo photos photograph photographs scene scenes view views
    shot shots frame frames snapshot screenshot shape shapes object objects thing things item items element elements
    composition setting atmosphere overall detail details color colour colors colours tone tones hue hues
    appearance style""".split())
# Part / position / quantity nouns: "the left side of the road", "a pair of shoes", "a group of people".
PART_NOUNS = frozenset("""side sides top bottom front back middle center centre left right edge edges corner corners
    part parts portion area areas region section half pair pairs group groups couple bunch lot lots number set sets
    piece pieces variety kind kinds type types sort sorts row rows line lines series collection array range amount
    distance foreground background""".split())
# A small adjective lexicon: a phrase whose last word is one of these has no noun ("the sky is blue").
ADJECTIVES = frozenset("""red green blue yellow purple orange cyan white black grey gray brown pink golden silver
    dark light bright pale deep small medium large big huge tiny little tall short long wide narrow thin thick
    round square-shaped old new young beautiful colorful colourful vibrant clear sunny cloudy wooden metal metallic
    plastic empty full open closed visible distinct prominent various different similar multiple other same
    main central nearby distant upper lower""".split())

IRREGULAR_PLURALS = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth",
    "mice": "mouse", "geese": "goose", "oxen": "ox", "leaves": "leaf", "knives": "knife", "wolves": "wolf",
    "shelves": "shelf", "loaves": "loaf", "halves": "half", "lives": "life", "wives": "wife", "calves": "calf",
    "scarves": "scarf", "thieves": "thief", "buses": "bus", "cacti": "cactus", "fungi": "fungus", "dice": "die",
    "sheep": "sheep", "deer": "deer", "fish": "fish", "aircraft": "aircraft", "species": "species",
    "series": "series", "ellipses": "ellipse", "horses": "horse", "houses": "house", "vases": "vase",
    "cases": "case", "bases": "base", "noses": "nose", "roses": "rose", "hoses": "hose", "phases": "phase",
    "clothes": "clothes", "movies": "movie", "cookies": "cookie", "pies": "pie", "ties": "tie", "lies": "lie",
}
# Words ending in "s" that are singular or plural-only: never touched.
S_INVARIANT = frozenset("""glasses sunglasses eyeglasses scissors pants trousers jeans shorts clothes pajamas
    goggles binoculars tongs pliers news gas canvas lens bus glass grass dress chess boss moss class mass cross
    compass mattress cactus octopus bonus virus campus circus asparagus hummus iris tennis christmas atlas bias
    chaos series species lettuce""".split())

_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
_CLAUSE = re.compile(r"[.!?;:,()\[\]{}\"\n\t]|--|\u2014|\u2013")


def singularize(word: str) -> str:
    """The singular of a plural English noun for the simple cases (rule 5 of the module docstring); words that
    are not plurals by these rules come back unchanged."""
    if not isinstance(word, str):
        raise TypeError(f"singularize: 'word' must be a str, got {type(word).__name__}")
    w = word.lower()
    if w in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[w]
    if w in S_INVARIANT or len(w) <= 3 or not w.endswith("s"):
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("sses", "ches", "shes", "xes", "zzes")):
        return w[:-2]
    if w.endswith(("ss", "us", "is", "'s")):
        return w
    return w[:-1]


def dedup(items: Iterable[str]) -> list[str]:
    """``items`` without repeats, in first-occurrence order."""
    seen, out = set(), []
    for it in items:
        if it not in seen:
            seen.add(it)
            out.append(it)
    return out


def _is_verb_like(word: str) -> bool:
    if word in VERBS:
        return True
    if len(word) > 4 and word.endswith("ing"):
        return word not in ING_NOUNS
    # Past participles ("parked", "covered"); "-eed" words are nouns or adjectives ("seed", "speed").
    return len(word) > 4 and word.endswith("ed") and not word.endswith("eed")


class NounPhraseExtractor:
    """The default rule-based entity extractor (module docstring, rules 1-6).

    Args:
        max_words: at most this many words per entity (the head noun and its nearest modifiers), >= 1.
        extra_stopwords: words that end a phrase in addition to the built-in boundary lists (e.g. domain verbs).
        drop_heads: extra head nouns to drop (in addition to the meta and part nouns).

    Calling it on a caption (a str) returns the entity list; non-str captions raise TypeError.
    """

    def __init__(self, max_words: int = 4, extra_stopwords: Sequence[str] = (), drop_heads: Sequence[str] = ()):
        if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
            raise ValueError(f"NounPhraseExtractor: 'max_words' must be an int >= 1, got {max_words!r}")
        self.max_words = max_words
        self.boundaries = CONJUNCTIONS | PREPOSITIONS | RELATIVES | frozenset(w.lower() for w in extra_stopwords)
        self.drop_heads = META_NOUNS | PART_NOUNS | frozenset(w.lower() for w in drop_heads)

    def __repr__(self) -> str:
        return f"NounPhraseExtractor(max_words={self.max_words})"

    def _phrases(self, clause: str) -> list[list[str]]:
        out, cur = [], []
        for tok in _TOKEN.findall(clause):
            if tok.endswith("'s") and len(tok) > 2:  # "the cat's tail": the possessor is a phrase of its own
                cur.append(tok[:-2])
                out.append(cur)
                cur = []
            elif tok in self.boundaries or _is_verb_like(tok):
                if cur:
                    out.append(cur)
                cur = []
            else:
                cur.append(tok)
        if cur:
            out.append(cur)
        return out

    def _clean(self, words: list[str]) -> Optional[str]:
        i = 0
        while i < len(words) and (words[i] in DETERMINERS or words[i] in NUMBER_WORDS or words[i].isdigit()
                                  or words[i] in INTENSIFIERS):
            i += 1
        words = [w for w in words[i:] if w not in INTENSIFIERS and not w.isdigit()]
        if not words:
            return None
        head = words[-1]
        if head in PRONOUNS or head in ADJECTIVES or head in NUMBER_WORDS or head in DETERMINERS:
            return None
        head = singularize(head)
        if head in self.drop_heads or len(head) < 2:
            return None
        words = words[-self.max_words:]
        words[-1] = head
        return " ".join(words)

    def __call__(self, caption: str) -> list[str]:
        if not isinstance(caption, str):
            raise TypeError(f"NounPhraseExtractor: 'caption' must be a str, got {type(caption).__name__}")
        out = []
        for clause in _CLAUSE.split(caption.lower().replace("\u2019", "'")):
            for words in self._phrases(clause):
                e = self._clean(words)
                if e is not None:
                    out.append(e)
        return dedup(out)


class ShapesWorldEntities:
    """Exact entities of ShapesWorld scenes: ``"<size> <colour> <category>"`` of every object, in painter's order,
    deduplicated (two large red circles are one entity).

    * :meth:`from_specs` / :meth:`from_scene`: from the scene's :class:`train.data.shapes.ObjectSpec` list.
    * ``__call__(caption)``: parses a caption of ``Scene.caption`` exactly (``"<count> shape(s): a <size> <colour>
      <category> <region>, ... and a ..."``, or ``"an empty scene."``); anything else raises ValueError, so a
      non-ShapesWorld manifest never silently gets wrong entities.

    Args:
        attributes: which words make the entity, a subset of ("size", "colour") in that order, plus the category
            always (default both: the entity is the full description the caption gives).
    """

    _ORDER = ("size", "colour")

    def __init__(self, attributes: Sequence[str] = ("size", "colour")):
        attributes = tuple(attributes)
        bad = [a for a in attributes if a not in self._ORDER]
        if bad or len(set(attributes)) != len(attributes):
            raise ValueError(f"ShapesWorldEntities: 'attributes' must be distinct names from {self._ORDER}, got "
                             f"{attributes!r}")
        self.attributes = tuple(a for a in self._ORDER if a in attributes)

    def __repr__(self) -> str:
        return f"ShapesWorldEntities(attributes={self.attributes})"

    def _entity(self, size: str, colour: str, category: str) -> str:
        words = {"size": size, "colour": colour}
        return " ".join([words[a] for a in self.attributes] + [category])

    def from_specs(self, specs) -> list[str]:
        """Entities of a sequence of ObjectSpec (anything with ``size``, ``colour``, ``category`` attributes)."""
        out = []
        for k, sp in enumerate(specs):
            try:
                out.append(self._entity(sp.size, sp.colour, sp.category))
            except AttributeError:
                raise TypeError(f"ShapesWorldEntities.from_specs: spec {k} has no size / colour / category "
                                f"(expected train.data.shapes.ObjectSpec), got {type(sp).__name__}") from None
        return dedup(out)

    def from_scene(self, scene) -> list[str]:
        """Entities of a rendered ``train.data.shapes.Scene``."""
        if not hasattr(scene, "specs"):
            raise TypeError(f"ShapesWorldEntities.from_scene: expected a train.data.shapes.Scene, got "
                            f"{type(scene).__name__}")
        return self.from_specs(scene.specs)

    def __call__(self, caption: str) -> list[str]:
        from train.data.shapes import CATEGORIES, PALETTE, SIZES

        if not isinstance(caption, str):
            raise TypeError(f"ShapesWorldEntities: 'caption' must be a str, got {type(caption).__name__}")
        text = caption.strip()
        if text == "an empty scene.":
            return []
        head, sep, listing = text.partition(": ")
        if not sep or not re.fullmatch(r"\S+ shapes?", head) or not listing.endswith("."):
            raise ValueError(f"ShapesWorldEntities: not a ShapesWorld caption ('<count> shape(s): a ... .'): "
                             f"{caption!r}")
        listing = listing[:-1]
        parts = re.split(r", | and (?=an? )", listing)
        pattern = re.compile(r"an? (%s) (%s) (%s) (?:in|on|at) .+" % ("|".join(SIZES), "|".join(PALETTE),
                                                                     "|".join(CATEGORIES)))
        out = []
        for p in parts:
            m = pattern.fullmatch(p)
            if m is None:
                raise ValueError(f"ShapesWorldEntities: {p!r} in {caption!r} is not an object phrase of a "
                                 f"ShapesWorld caption ('a <size> <colour> <category> <where>')")
            out.append(self._entity(*m.groups()))
        return dedup(out)


EXTRACTORS = {"noun_phrase": NounPhraseExtractor, "shapes": ShapesWorldEntities}


def get_extractor(spec) -> EntityExtractor:
    """An extractor from a name (``"noun_phrase"`` (default), ``"shapes"``), a callable (returned as is) or None
    (the default)."""
    if spec is None:
        return NounPhraseExtractor()
    if isinstance(spec, str):
        if spec not in EXTRACTORS:
            raise ValueError(f"get_extractor: unknown extractor {spec!r}; expected one of {sorted(EXTRACTORS)} or a "
                             f"callable caption -> list[str]")
        return EXTRACTORS[spec]()
    if callable(spec):
        return spec
    raise TypeError(f"get_extractor: expected a name, a callable or None, got {type(spec).__name__}")


def filter_holdout(entities: Sequence[str], holdout: Iterable[str]) -> list[str]:
    """``entities`` without those containing a held-out word (whole-word match, case-insensitive; a held-out entry
    of several words must appear as that word sequence): the stage-2 hold-out split never trains on them."""
    pats = []
    for h in holdout:
        if not isinstance(h, str) or not h.strip():
            raise ValueError(f"filter_holdout: every held-out entry must be a non-empty str, got {h!r}")
        pats.append(re.compile(r"(?<![a-z0-9])" + re.escape(h.strip().lower()) + r"(?![a-z0-9])"))
    return [e for e in entities if not any(p.search(e.lower()) for p in pats)]
