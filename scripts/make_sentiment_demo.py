"""Generate lorafit's embedded default demo data: a small labelled English sentiment set.

Writes two JSON-lines files next to the ``data=sentiment_demo`` task::

    lorafit/data/sentiment_demo/train.jsonl   480 rows (240 positive, 240 negative)
    lorafit/data/sentiment_demo/dev.jsonl     160 rows ( 80 positive,  80 negative)

one object per line, ``{"text": str, "label": 0 or 1}`` with 1 = positive, rows shuffled.

Why it exists: ``make demo`` must run end to end on a fresh machine, on CPU, without downloading
a data set. Its default recipe fine-tunes MiniLM with LoRA on this set; the classifier starts near
chance (~50% dev accuracy) and should pass 85% within a couple of minutes. The set is therefore
small, but not trivial: every text is a short review (films, restaurants, products, hotels,
books, games, apps) assembled from templates and word lists written here, and the mix includes

* short and long texts, intensifiers, neutral filler ("To be fair,", "We went on a Tuesday
  evening and");
* two-clause contrasts ("X, but Y", "Although X, Y") where the *second* clause decides and
  the first clause uses words of the opposite polarity;
* negations ("not bad at all", "hardly worth it", "not great in the slightest");
* expectation reversals ("I expected this film to be boring, but it turned out moving").

so a rule keyed on one word does not reach 100%: a TF-IDF + logistic-regression baseline lands
well above chance but below perfect (see lorafit/data/sentiment_demo/README.md). Each text is
written so that its label is plain to a human reader.

All text comes from this file; nothing is copied from any public data set. The output is
deterministic (``random.Random(0)``, stdlib only): running the script again rewrites the same
bytes. No dev text equals a train text (compared case- and whitespace-insensitively).

Usage::

    python scripts/make_sentiment_demo.py            # writes lorafit/data/sentiment_demo/
    python scripts/make_sentiment_demo.py --out DIR  # writes DIR/train.jsonl and DIR/dev.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SEED = 0
N_TRAIN_PER_CLASS = 240
N_DEV_PER_CLASS = 80
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "lorafit" / "data" / "sentiment_demo"

# --------------------------------------------------------------------------------------------
# Word lists. Each domain has things being reviewed, aspects of them, and adjectives that fit
# the thing as a whole. Aspect adjectives (below) are generic so that they fit every aspect.
# --------------------------------------------------------------------------------------------

DOMAINS: dict[str, dict[str, list[str]]] = {
    "film": {
        "things": ["film", "movie", "sequel", "documentary", "thriller", "comedy",
                   "animated feature"],
        "aspects": ["plot", "acting", "soundtrack", "ending", "script", "pacing", "cinematography",
                    "dialogue", "lead performance"],
        "pos": ["gripping", "moving", "hilarious", "beautifully shot", "clever", "touching"],
        "neg": ["boring", "predictable", "clumsy", "overlong", "confusing", "lifeless"],
        "context": ["We watched it on a rainy Sunday and", "I saw it at the late showing and",
                    "My brother picked it for movie night and"],
    },
    "restaurant": {
        "things": ["restaurant", "bistro", "cafe", "pizzeria", "noodle bar", "diner", "bakery"],
        "aspects": ["food", "service", "pasta", "dessert", "coffee", "staff", "menu", "soup",
                    "wine list"],
        "pos": ["delicious", "welcoming", "cosy", "good value", "charming", "spotless"],
        "neg": ["bland", "overpriced", "noisy", "dirty", "chaotic", "unwelcoming"],
        "context": ["We went on a Tuesday evening and", "We booked a table for four and",
                    "I stopped by for lunch and"],
    },
    "product": {
        "things": ["blender", "laptop", "vacuum cleaner", "phone case", "kettle", "backpack",
                   "desk lamp", "pair of headphones"],
        "aspects": ["battery", "build quality", "design", "price", "screen", "motor",
                    "instructions", "packaging", "customer support"],
        "pos": ["reliable", "sturdy", "easy to use", "well made", "quiet", "handy"],
        "neg": ["flimsy", "unreliable", "awkward to use", "cheaply made", "noisy", "useless"],
        "context": ["I bought it last month and", "I ordered it online and",
                    "I got it as a birthday present and"],
    },
    "hotel": {
        "things": ["hotel", "guesthouse", "resort", "hostel", "inn", "holiday apartment"],
        "aspects": ["room", "bed", "breakfast", "reception", "view", "location", "bathroom", "pool",
                    "cleaning"],
        "pos": ["comfortable", "spotless", "peaceful", "welcoming", "good value", "relaxing"],
        "neg": ["filthy", "cramped", "noisy", "overpriced", "run down", "unwelcoming"],
        "context": ["We stayed three nights and", "I was there for a conference and",
                    "We checked in late on a Friday and"],
    },
    "book": {
        "things": ["novel", "memoir", "cookbook", "biography", "story collection", "travel guide"],
        "aspects": ["writing", "characters", "ending", "prose", "plot", "illustrations",
                    "chapters", "research"],
        "pos": ["gripping", "moving", "insightful", "beautifully written", "clever", "charming"],
        "neg": ["dull", "predictable", "shallow", "badly written", "confusing", "tedious"],
        "context": ["I read it on holiday and", "Our book club chose it and",
                    "I picked it up at the airport and"],
    },
    "game": {
        "things": ["game", "puzzle game", "racing game", "strategy game", "board game", "shooter"],
        "aspects": ["controls", "graphics", "story", "levels", "multiplayer", "music",
                    "difficulty curve", "tutorial"],
        "pos": ["addictive", "polished", "clever", "fun", "rewarding", "charming"],
        "neg": ["tedious", "buggy", "repetitive", "unfair", "clumsy", "frustrating"],
        "context": ["I played it all weekend and", "We tried it with friends and",
                    "I finished it last night and"],
    },
    "app": {
        "things": ["app", "budgeting app", "language app", "photo editor", "fitness tracker app"],
        "aspects": ["interface", "updates", "notifications", "sync", "design", "price",
                    "customer support", "search"],
        "pos": ["intuitive", "reliable", "fast", "handy", "polished", "easy to use"],
        "neg": ["confusing", "unreliable", "slow", "buggy", "cluttered", "useless"],
        "context": ["I have used it every day for a month and", "I installed it on my phone and",
                    "A colleague suggested it and"],
    },
}
DOMAIN_NAMES = list(DOMAINS)

# Aspects that take "were".
PLURAL = ["levels", "characters", "controls", "graphics", "illustrations", "chapters",
          "notifications", "updates", "instructions"]

# Generic adjectives that fit any aspect: gradable ones take "very", extreme ones "absolutely".
POS_GRADABLE = ["good", "lovely", "impressive", "solid", "enjoyable", "pleasing"]
NEG_GRADABLE = ["poor", "disappointing", "mediocre", "weak", "bad", "sloppy"]
POS_EXTREME = ["excellent", "great", "wonderful", "superb", "fantastic", "brilliant", "outstanding",
               "terrific", "first-rate"]
NEG_EXTREME = ["awful", "terrible", "dreadful", "horrible", "abysmal", "appalling", "shoddy",
               "lousy"]
POS_ADJ = POS_GRADABLE + POS_EXTREME
NEG_ADJ = NEG_GRADABLE + NEG_EXTREME
# Mild adjectives for the clause that a contrast overrules.
POS_MILD = ["decent", "fine", "pleasant", "nice", "perfectly good", "quite good"]
NEG_MILD = ["a bit disappointing", "slightly underwhelming", "rather forgettable", "a little weak",
            "not great", "nothing special"]
# Strong adjectives for the deciding clause.
POS_STRONG = POS_EXTREME
NEG_STRONG = NEG_EXTREME

# Intensifiers ("" = none): for gradable adjectives, for extreme ones, for the domain adjectives.
INTENS = ["", "", "really ", "very ", "incredibly ", "genuinely ", "extremely ", "pretty "]
INTENS_EXTREME = ["", "", "absolutely ", "truly ", "simply ", "genuinely "]
INTENS_DOMAIN = ["", "", "really ", "truly ", "genuinely "]

FILLER = ["", "", "", "", "Honestly, ", "To be fair, ", "For what it's worth, ", "Well, ",
          "So, ", "I have to say, ", "In short, ", "All in all, ",
          "Just a quick note: ", "Frankly, "]

# Overall verdicts, as full sentences ({thing} is filled in).
POS_VERDICT = ["I would happily recommend this {thing} to anyone.", "Worth every penny.",
               "Five stars from me.", "One of the best {thing}s I have tried this year.",
               "I will definitely be back for more.", "I cannot wait to tell my friends about it.",
               "A real pleasure from start to finish.", "Highly recommended.",
               "I am very glad I gave this {thing} a chance."]
NEG_VERDICT = ["I would not recommend this {thing} to anyone.", "I want my money back.",
               "One star, and that is generous.",
               "Easily the worst {thing} I have tried this year.",
               "Avoid it.", "I will not be going back.", "A complete waste of time and money.",
               "Save yourself the trouble.", "I really regret giving this {thing} a chance."]
# Overall verdicts as clauses, for the deciding half of a contrast.
POS_VERDICT_CLAUSE = ["I loved it", "I would happily do it again", "I came away delighted",
                      "it was worth every penny", "I am already recommending it to friends",
                      "it won me over completely"]
NEG_VERDICT_CLAUSE = ["I regretted it", "I would never do it again", "I came away annoyed",
                      "it was a waste of money", "I am warning my friends to stay away",
                      "it let me down badly"]

# Negated phrases: the surface words point one way, the meaning the other.
POS_NEGATED = ["The {aspect} was not bad at all.", "I have no complaints about the {aspect}.",
               "Nothing about the {aspect} disappointed me.",
               "The {aspect} was not {neg_adj} in the slightest.",
               "I honestly could not fault the {aspect}.",
               "I never once felt let down by the {aspect}.",
               "The {thing} was not {dneg} at all.",
               "The {aspect} was the best I have come across in years."]
NEG_NEGATED = ["The {aspect} was hardly worth it.", "The {thing} was hardly worth the money.",
               "Nothing about the {aspect} impressed me.",
               "The {aspect} was not {pos_adj} in the slightest.",
               "I would not call the {aspect} {pos_adj} by any stretch.",
               "The {thing} was never {dpos}, not even for a moment.",
               "The {aspect} was the worst I have come across in years.",
               "The {aspect} was not good at all."]


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def agree(text: str) -> str:
    """"the levels was" -> "the levels were"."""
    for noun in PLURAL:
        text = re.sub(rf"\b([Tt]he {noun}) was\b", r"\1 were", text)
    return text


def with_filler(filler: str, sentence: str) -> str:
    """Prefix a neutral filler ("To be fair, ") to a capitalised sentence."""
    if filler and not sentence.startswith("I "):
        sentence = sentence[:1].lower() + sentence[1:]
    return filler + sentence


def a_an(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


class Writer:
    """Builds one review of a given label from one randomly chosen template."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, items: list[str]) -> str:
        return self.rng.choice(items)

    def review(self, label: int) -> str:
        dom = DOMAINS[self.pick(DOMAIN_NAMES)]
        dom = dict(dom, things=[self.pick(dom["things"])])  # one reviewed thing per text
        templates = [
            (self.simple, 3), (self.two_aspects, 2), (self.short, 2), (self.verdict_only, 1),
            (self.negated, 3), (self.contrast_but, 4), (self.although, 2),
            (self.expectation, 2), (self.long, 3),
        ]
        funcs = [f for f, w in templates for _ in range(w)]
        text = self.pick(funcs)(dom, label == 1)
        return agree(re.sub(r"\s+", " ", text).strip())

    # -- pieces ----------------------------------------------------------------------------
    def adj(self, pos: bool) -> str:
        if self.rng.random() < 0.5:
            return self.pick(INTENS) + self.pick(POS_GRADABLE if pos else NEG_GRADABLE)
        return self.strong(pos)

    def strong(self, pos: bool) -> str:
        return self.pick(INTENS_EXTREME) + self.pick(POS_EXTREME if pos else NEG_EXTREME)

    def dom_adj(self, dom: dict, pos: bool) -> str:
        return self.pick(INTENS_DOMAIN) + self.pick(dom["pos" if pos else "neg"])

    def two(self, items: list[str]) -> tuple[str, str]:
        a, b = self.rng.sample(items, 2)
        return a, b

    def verdict(self, dom: dict, pos: bool) -> str:
        return self.pick(POS_VERDICT if pos else NEG_VERDICT).format(thing=self.pick(dom["things"]))

    def negated(self, dom: dict, pos: bool) -> str:
        pattern = self.pick(POS_NEGATED if pos else NEG_NEGATED)
        return with_filler(self.pick(FILLER), self.fill(pattern, dom))

    def fill(self, pattern: str, dom: dict) -> str:
        return pattern.format(aspect=self.pick(dom["aspects"]), thing=self.pick(dom["things"]),
                              pos_adj=self.pick(POS_ADJ), neg_adj=self.pick(NEG_ADJ),
                              dpos=self.pick(dom["pos"]), dneg=self.pick(dom["neg"]))

    # -- templates -------------------------------------------------------------------------
    def simple(self, dom: dict, pos: bool) -> str:
        return cap(f"{self.pick(FILLER)}the {self.pick(dom['aspects'])} was {self.adj(pos)}.")

    def two_aspects(self, dom: dict, pos: bool) -> str:
        a, b = self.two(dom["aspects"])
        thing = self.pick(dom["things"])
        return cap(f"{self.pick(FILLER)}the {a} was {self.adj(pos)} and the {b} was "
                   f"{self.adj(pos)}. The {thing} was {self.pick(dom['pos' if pos else 'neg'])}.")

    def short(self, dom: dict, pos: bool) -> str:
        thing = self.pick(dom["things"])
        form = self.rng.randrange(3)
        if form == 0:
            return f"{cap(a_an(self.adj(pos)))} {thing}."
        if form == 1:
            return f"This {thing} is {self.dom_adj(dom, pos)}."
        return f"{cap(self.dom_adj(dom, pos))}. {self.verdict(dom, pos)}"

    def verdict_only(self, dom: dict, pos: bool) -> str:
        return f"{cap(self.pick(dom['context']))} {self.pick(['', 'honestly '])}" \
               f"the {self.pick(dom['aspects'])} was {self.adj(pos)}. {self.verdict(dom, pos)}"

    def contrast_but(self, dom: dict, pos: bool) -> str:
        a, b = self.two(dom["aspects"])
        first = f"the {a} was {self.pick(NEG_MILD if pos else POS_MILD)}"
        strong = self.pick(POS_STRONG if pos else NEG_STRONG)
        form = self.rng.randrange(3)
        if form == 0:
            second = f"the {b} was so {strong} that " \
                     f"{self.pick(POS_VERDICT_CLAUSE if pos else NEG_VERDICT_CLAUSE)}"
        elif form == 1:
            second = f"the {b} was {self.strong(pos)} and " \
                     f"{self.pick(POS_VERDICT_CLAUSE if pos else NEG_VERDICT_CLAUSE)}"
        else:
            second = "overall " + self.pick(POS_VERDICT_CLAUSE if pos else NEG_VERDICT_CLAUSE)
        return cap(f"{self.pick(FILLER)}{first}, but {second}.")

    def although(self, dom: dict, pos: bool) -> str:
        a, b = self.two(dom["aspects"])
        first = f"the {a} was {self.pick(NEG_MILD if pos else POS_MILD)}"
        verdict = self.pick(POS_VERDICT_CLAUSE if pos else NEG_VERDICT_CLAUSE)
        strong = self.pick(POS_STRONG if pos else NEG_STRONG)
        word = self.pick(["Although", "Even though", "While"])
        return f"{word} {first}, the {b} was {strong} and {verdict}."

    def expectation(self, dom: dict, pos: bool) -> str:
        thing = self.pick(dom["things"])
        expected = self.pick(dom["neg" if pos else "pos"])
        got = self.dom_adj(dom, pos)
        form = self.rng.randrange(3)
        if form == 0:
            return f"I expected this {thing} to be {expected}, but it turned out {got}."
        if form == 1:
            hype = "low" if pos else "high"
            return f"I had {hype} hopes for this {thing}. " \
                   f"{'Happily' if pos else 'Sadly'}, it was {self.adj(pos)} from start to finish."
        return f"Everyone told me this {thing} would be {expected}. " \
               f"They were wrong: it was {got}. {self.verdict(dom, pos)}"

    def long(self, dom: dict, pos: bool) -> str:
        a, b, c = self.rng.sample(dom["aspects"], 3)
        thing = self.pick(dom["things"])
        parts = [f"{cap(self.pick(dom['context']))} the {a} was {self.adj(pos)}."]
        if self.rng.random() < 0.5:
            # one concession of the other polarity in the middle, clearly outweighed
            parts.append(f"The {b} was {self.pick(NEG_MILD if pos else POS_MILD)}, "
                         f"but the {c} was {self.pick(POS_STRONG if pos else NEG_STRONG)}.")
        else:
            parts.append(f"The {b} was {self.adj(pos)} too, and the {thing} as a whole was "
                         f"{self.pick(dom['pos' if pos else 'neg'])}.")
        parts.append(self.verdict(dom, pos))
        return " ".join(parts)


def norm(text: str) -> str:
    return " ".join(text.lower().split())


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Return (train, dev) rows: balanced, unique texts, no dev text equal to a train text."""
    rng = random.Random(seed)
    writer = Writer(rng)
    need = N_TRAIN_PER_CLASS + N_DEV_PER_CLASS
    seen: set[str] = set()
    by_label: dict[int, list[str]] = {0: [], 1: []}
    attempts = 0
    while min(len(v) for v in by_label.values()) < need:
        attempts += 1
        if attempts > 200_000:
            raise RuntimeError("template space too small for the requested number of rows")
        label = attempts % 2  # alternate labels: both classes get the same template mix
        if len(by_label[label]) >= need:
            continue
        text = writer.review(label)
        key = norm(text)
        if key in seen:  # unique across both labels and both splits
            continue
        seen.add(key)
        by_label[label].append(text)

    train: list[dict] = []
    dev: list[dict] = []
    for label in (0, 1):
        texts = by_label[label]
        rng.shuffle(texts)
        train += [{"text": t, "label": label} for t in texts[:N_TRAIN_PER_CLASS]]
        dev += [{"text": t, "label": label} for t in texts[N_TRAIN_PER_CLASS:need]]
    rng.shuffle(train)
    rng.shuffle(dev)

    train_keys = {norm(r["text"]) for r in train}
    assert not any(norm(r["text"]) in train_keys for r in dev), "dev overlaps train"
    return train, dev


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            line = json.dumps({"text": row["text"], "label": row["label"]}, ensure_ascii=False)
            fh.write(line + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    train, dev = build()
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "dev.jsonl", dev)
    for name, rows in (("train", train), ("dev", dev)):
        pos = sum(r["label"] for r in rows)
        print(f"{args.out / (name + '.jsonl')}: {len(rows)} rows "
              f"({pos} positive, {len(rows) - pos} negative)")


if __name__ == "__main__":
    main()
