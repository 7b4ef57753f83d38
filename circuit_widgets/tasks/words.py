"""Word lists and templates of the task generators (data only, no imports of ours).

Generators keep only the words that are one token, with a leading space, in the model
at hand; tiny models' tokenizers are built from ``corpus()`` so every word here is one.
"""

from __future__ import annotations

# Wang et al. (2022), ioi_dataset.py: BABA templates; ABBA swaps the first two names.
BABA_TEMPLATES = [
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
]
ABBA_TEMPLATES = [t.replace("[B]", "[X]", 1).replace("[A]", "[B]", 1).replace("[X]", "[A]", 1)
                  for t in BABA_TEMPLATES]

# Wang et al.'s name list (first names); filtered per tokenizer to single tokens.
NAMES = [
    "Aaron", "Adam", "Alan", "Alex", "Alice", "Amy", "Anderson", "Andre", "Andrew", "Andy",
    "Anna", "Anthony", "Arthur", "Austin", "Blake", "Brandon", "Brian", "Carter", "Charles",
    "Charlie", "Christian", "Christopher", "Clark", "Cole", "Collins", "Connor", "Crew",
    "Crystal", "Daniel", "David", "Dean", "Edward", "Elizabeth", "Emily", "Eric", "Eva",
    "Ford", "Frank", "George", "Georgia", "Graham", "Grant", "Henry", "Ian", "Jack", "Jacob",
    "Jake", "James", "Jane", "Jason", "Jay", "Jennifer", "Jeremy", "Jessica", "John",
    "Jonathan", "Jordan", "Joseph", "Joshua", "Justin", "Kate", "Kelly", "Kevin", "Kyle",
    "Laura", "Leon", "Lewis", "Lisa", "Louis", "Luke", "Madison", "Marco", "Marcus", "Maria",
    "Mark", "Martin", "Mary", "Matthew", "Max", "Michael", "Michelle", "Morgan", "Patrick",
    "Paul", "Peter", "Prince", "Rachel", "Richard", "River", "Robert", "Roman", "Rose",
    "Ruby", "Russell", "Ryan", "Sarah", "Scott", "Sean", "Simon", "Stephen", "Steven",
    "Sullivan", "Taylor", "Thomas", "Tyler", "Victoria", "Warren", "William",
]
PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"]
IOI_OBJECTS = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"]

# Merullo et al.'s simplified Colored Objects: 8 colours, 17 objects, 3 objects per prompt.
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "black", "white"]
COLORED_OBJECTS = [
    "pen", "cup", "book", "ball", "hat", "key", "box", "phone", "bag", "shoe", "plate",
    "clock", "lamp", "chair", "bottle", "card", "scarf",
]
COLORED_TEMPLATE = "Q: On the table, I see {context}. What color is the {query}?\nA:"

# Prakash et al. (from Kim & Schuster's boxes data): single-letter box labels, objects.
BOX_LABELS = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
BOX_OBJECTS = [
    "apple", "bag", "ball", "bell", "bike", "bill", "boat", "bomb", "book", "bottle", "bread",
    "brick", "cake", "camera", "car", "card", "cart", "chain", "chair", "clock", "coat",
    "coin", "computer", "cookie", "crown", "cup", "dish", "document", "drink", "egg", "engine",
    "fan", "file", "flower", "game", "gift", "glass", "guitar", "hat", "ice", "iron", "jacket",
    "key", "knife", "lamp", "letter", "machine", "map", "medicine", "milk", "mirror", "money",
    "note", "paper", "pen", "phone", "picture", "plane", "plate", "radio", "ring", "rock",
    "rose", "shirt", "shoe", "stone", "table", "tea", "ticket", "tie", "toy", "train", "tree",
    "watch", "wire",
]
ENTITY_SEGMENT = "the {object} is in Box {label}"
ENTITY_QUERY = " Box {label} contains the"

# Goat-style arithmetic for the fine-tuning demo.
ARITHMETIC_TEMPLATE = "{a}+{b}={c}"


def corpus() -> list[str]:
    """Every text a generator can emit, for building a tokenizer that covers them."""
    texts: list[str] = []
    texts += BABA_TEMPLATES + ABBA_TEMPLATES
    texts += NAMES + PLACES + IOI_OBJECTS
    texts += COLORS + [c.title() for c in COLORS] + COLORED_OBJECTS
    context = "a red pen, an orange cup, and a green book"
    texts += [COLORED_TEMPLATE.format(context=context, query="cup")]
    texts += BOX_LABELS + BOX_OBJECTS
    texts += ["The " + ENTITY_SEGMENT + ", " + ENTITY_SEGMENT + "." + ENTITY_QUERY]
    texts += [str(d) for d in range(10)] + ["+", "=", "-", "*"]
    return texts
