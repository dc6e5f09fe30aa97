"""The words of the synthetic task (`overmem.data.synthetic`): who and what a problem is about,
the sentences its question is made of, and the pools its solutions' wording is drawn from.

Every pool here is a set of equally valid choices: the question templates are filled by
`overmem.data.synthetic_problems.sample_problem`, the solution pools (a `Phrasing`) by
`overmem.data.synthetic_problems.render_solution`.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Vocabulary of the world
# ---------------------------------------------------------------------------------------------

# (name, subject pronoun, object pronoun)
PEOPLE = [
    ("Ava", "she", "her"), ("Ben", "he", "him"), ("Cleo", "she", "her"), ("Dan", "he", "him"),
    ("Emma", "she", "her"), ("Finn", "he", "him"), ("Gina", "she", "her"), ("Hugo", "he", "him"),
    ("Iris", "she", "her"), ("Jack", "he", "him"), ("Kate", "she", "her"), ("Leo", "he", "him"),
    ("Mia", "she", "her"), ("Noah", "he", "him"), ("Olivia", "she", "her"), ("Paul", "he", "him"),
    ("Rosa", "she", "her"), ("Sam", "he", "him"), ("Tina", "she", "her"), ("Omar", "he", "him"),
]
FRIENDS = ["Grandma", "a neighbor", "the teacher", "a friend", "Uncle Joe", "a cousin"]
# (item, container)
ITEMS = [
    ("apples", "bags"), ("marbles", "jars"), ("stickers", "sheets"), ("cookies", "boxes"),
    ("pencils", "packs"), ("cards", "decks"), ("eggs", "cartons"), ("books", "shelves"),
    ("shells", "buckets"), ("coins", "purses"), ("beads", "strings"), ("flowers", "vases"),
]
OTHER_ITEMS = ["pears", "hats", "kites", "stamps", "toys", "plums"]

# ---------------------------------------------------------------------------------------------
# Question templates. Standard and OOD wordings are disjoint sets of sentences.
# Placeholders: {name} {Pron} {pron} {obj} {friend} {item} {cont} {n} {a} {b}
# ---------------------------------------------------------------------------------------------

QUESTION_TEMPLATES: dict[str, dict[str, list[str]]] = {
    "standard": {
        "start": ["{name} has {n} {item}.", "{name} starts with {n} {item}."],
        "start_prod": ["{name} has {a} {cont} with {b} {item} in each.",
                       "{name} starts with {a} {cont} of {b} {item}."],
        "gain": ["{Pron} buys {n} more {item}.", "{Friend} gives {obj} {n} {item}.",
                 "{Pron} finds {n} {item}."],
        "gain_prod": ["{Pron} buys {a} {cont} of {b} {item}.",
                      "{Friend} gives {obj} {a} {cont} with {b} {item} each."],
        "loss": ["{Pron} gives {n} {item} to {friend}.", "{Pron} loses {n} {item}.",
                 "{Pron} sells {n} {item}."],
        "loss_prod": ["{Pron} gives away {a} {cont} of {b} {item}.",
                      "{Pron} sells {a} {cont} with {b} {item} each."],
        "ask": ["How many {item} does {name} have now?",
                "How many {item} does {name} have at the end?"],
    },
    "ood": {
        "start": ["At first, {name} owns {n} {item}.",
                  "There are {n} {item} in the collection of {name}."],
        "start_prod": ["{name} owns {a} {cont}, and every one holds {b} {item}."],
        "gain": ["Later, {pron} picks up another {n} {item}.",
                 "{Pron} receives {n} {item} as a gift."],
        "gain_prod": ["{Pron} gets {a} {cont} containing {b} {item} apiece."],
        "loss": ["{Pron} donates {n} {item}.", "{Friend} takes {n} {item} from {obj}."],
        "loss_prod": ["{Pron} hands over {a} {cont} holding {b} {item} each."],
        "ask": ["What is the number of {item} that {name} ends up with?",
                "Count the {item} {name} is holding after all this."],
    },
}

DISTRACTORS = [
    "{Friend} has {n} {other}.", "{name} is {n} years old.", "The shop is {n} blocks away.",
    "{Pron} also owns {n} {other}, but keeps them at home.",
]

# ---------------------------------------------------------------------------------------------
# Solution step phrasings (shared by every split: this is what the model must produce).
# {expr} is a calculation like "3 + 4 = <<3+4=7>>7".
# ---------------------------------------------------------------------------------------------

# The sequential steps (products, gains, losses) share one pool of phrasings that name no
# operation: which operation a step does is written only in its calculation, which the question
# determines. A phrasing that named the operation ("Adding them gives ...") would make the free
# choice of phrasing decide the arithmetic, and a finetuned model that over-trusts the phrasings
# of its training problems would then pick the wrong operation on a test problem; a real
# solution's phrasing is free in a way that leaves every choice valid.
# Each phrasing is a subject and a verb drawn independently (two free choices in two or three
# tokens, so that a large share of a solution's tokens are free choices).
STEP_SUBJECTS = ["That", "This", "It", "All that", "The total", "The result", "The count"]
STEP_VERBS = ["is", "comes to", "works out to", "makes", "gives", "means"]
_NOUN_VERBS = ["is", "comes to", "works out to"]  # "the total gives 3 + 4" reads wrong
STEP_PHRASES = [
    f"{subject} {verb} {{expr}} {{item}}."
    for subject in STEP_SUBJECTS
    for verb in (_NOUN_VERBS if subject.startswith("The ") else STEP_VERBS)
]

STEP_TEMPLATES: dict[str, list[str]] = {
    "mul": STEP_PHRASES,
    "add": STEP_PHRASES,
    "sub": STEP_PHRASES,
    # Summing gains and losses separately exists only in the `synthetic.REORDER` variant.
    "gains": [
        "{Pron} gets {expr} {item} in all.",
        "All the {item} coming in add up to {expr}.",
        "The {item} {pron} gets total {expr}.",
        "First add what {pron} gets: {expr} {item}.",
        "Adding everything {pron} gets: {expr} {item}.",
        "In total {pron} gets {expr} {item}.",
    ],
    "losses": [
        "{Pron} gives up {expr} {item} in all.",
        "The {item} going out total {expr}.",
        "In total {expr} {item} are gone.",
        "Now add what {pron} loses: {expr} {item}.",
        "Altogether {expr} {item} leave.",
        "The losses add up to {expr} {item}.",
    ],
    "net": [
        "So {pron} has {expr} {item} left.",
        "That leaves {expr} {item}.",
        "The difference is {expr} {item}.",
        "{name} ends up with {expr} {item}.",
        "Subtracting gives {expr} {item}.",
        "Then {pron} keeps {expr} {item}.",
    ],
    "end": [
        "", "", "So {name} has {ans} {item} now.", "The answer is {ans}.",
        "{name} ends with {ans} {item}.", "In the end there are {ans} {item}.",
    ],
}


# Independent optional decorations of each step sentence.
STEP_OPENERS = ["", "", "So ", "Then ", "Now ", "Next, ", "Here ", "Well, ", "Thus ", "OK, ", "This way "]
STEP_TAILS = ["", "", " now", " in all", " in total", " so far", " at this point", " altogether", " for now"]


@dataclass(frozen=True)
class Phrasing:
    """The surface choices of a solution: a sequential step is `opener + step + tail` (one of
    each, drawn independently; the opener lower-cases the step's first word) and the solution
    ends with a closing sentence ("" for none) before `#### N`. Placeholders as in
    `STEP_TEMPLATES`."""

    openers: tuple[str, ...]
    steps: tuple[str, ...]
    tails: tuple[str, ...]
    closings: tuple[str, ...]


# The base model's pretraining text: many wordings of each choice (as a real LLM has read), and
# closings that can start like a step line ("So ...", "The ...").
RICH = Phrasing(tuple(STEP_OPENERS), tuple(STEP_PHRASES), tuple(STEP_TAILS), tuple(STEP_TEMPLATES["end"]))

# The finetuning splits: a few wordings per choice, but as many choices per line. Why:
# - Every choice written before a line's calculation is also a clue to which training example
#   the model is continuing, once the examples are memorized. With `RICH` (~3,000 wordings of a
#   line, nearly one per training example) the clue points to one training solution, which the
#   model then continues on a test problem (skipped or repeated steps, wrong sums). With
#   3 x 6 x 3 = 54 wordings of a line each is shared by several training examples, while the
#   choices, all still free, make the test references improbable as the model over-trusts them.
# - Whether a line is another step or the closing is decided by the question (how many changes
#   are left), so no closing starts with a word a step line can start with: where both can start
#   alike ("So ...", "The ..." in `RICH`), a memorized opener can end a test solution early.
# The measurements behind these choices are in docs/commands/demo.md.
PLAIN = Phrasing(
    openers=("", "So ", "Then "),
    steps=tuple(
        f"{subject} {verb} {{expr}} {{item}}."
        for subject, verb in (("That", "is"), ("That", "makes"), ("It", "is"), ("It", "makes"),
                              ("The total", "is"), ("The total", "comes to"))
    ),
    tails=("", " in all", " so far"),
    closings=("", "{name} ends with {ans} {item}.", "Answer: {ans}."),
)
PHRASINGS: dict[str, Phrasing] = {"rich": RICH, "plain": PLAIN}
