"""Built-in IFEval-style task: a short topic request plus 1-2 verifiable instructions, with checkers.

Records are `{"id": "ifeval-00003", "prompt": str, "response": str, "metadata": {"task": "ifeval",
"topic": str, "instructions": [{"type": "max_words", "n": 20}, ...]}}`. The reference response is built
from a small per-topic sentence bank, is a deterministic function of (topic, instructions), and is
checked against its own instructions before it is emitted.

Instruction types and their rules (see `check_instruction`):
`lowercase`, `min_words` (n), `max_words` (n), `include_keyword` (keyword), `end_with` (phrase),
`json_output`, `bullet_points` (n), `no_commas`.
"""

from __future__ import annotations

import json
import random
import re

from .seeded import seeded_records

TOPICS: dict[str, list[str]] = {
    "the sea": [
        "The sea stretches far beyond the horizon.",
        "Waves roll in, crash, and pull back again.",
        "Salt hangs in the cool morning air.",
        "Gulls circle above the small fishing boats.",
        "At night the water reflects the silver moon.",
    ],
    "mountains": [
        "Mountains rise high above the green valleys.",
        "Snow covers the peaks for most of the year.",
        "Hikers climb slowly, resting on rocky ledges.",
        "The air grows thin and cold near the summit.",
        "Clear streams run down from melting glaciers.",
    ],
    "coffee": [
        "Coffee is brewed from roasted beans.",
        "Its rich smell fills the kitchen each morning.",
        "Some people drink it black, others add milk.",
        "A warm cup helps many people wake up.",
        "Cafes serve it in many different styles.",
    ],
    "a busy city": [
        "The city never seems to sleep.",
        "Cars, buses, and bikes fill the wide streets.",
        "Tall towers of glass reflect the afternoon sun.",
        "Crowds hurry past shops and small cafes.",
        "At night bright lights glow in every window.",
    ],
    "winter": [
        "Winter brings short days and long nights.",
        "Snow falls softly on quiet rooftops.",
        "Children build snowmen, throw snowballs, and laugh.",
        "People wear thick coats and warm scarves.",
        "Frost draws patterns on the window glass.",
    ],
    "dogs": [
        "Dogs are loyal and friendly companions.",
        "They love to run, play, and chase balls.",
        "A dog greets its owner with a wagging tail.",
        "Many dogs help people as guides or guards.",
        "Daily walks keep dogs healthy and happy.",
    ],
    "music": [
        "Music can lift the mood of any room.",
        "Drums, guitars, and voices create a rhythm together.",
        "Some songs remind us of old memories.",
        "People dance and sing at concerts.",
        "Learning an instrument takes patience and practice.",
    ],
    "a quiet garden": [
        "The garden is calm and full of color.",
        "Roses, tulips, and daisies bloom along the path.",
        "Bees move slowly from flower to flower.",
        "A small bench rests under an old tree.",
        "Birds sing softly in the early light.",
    ],
}

KEYWORDS: dict[str, list[str]] = {
    "the sea": ["waves", "salt", "horizon", "boats", "moon"],
    "mountains": ["snow", "peaks", "hikers", "summit", "streams"],
    "coffee": ["beans", "morning", "milk", "cup", "cafes"],
    "a busy city": ["towers", "crowds", "lights", "buses", "shops"],
    "winter": ["snow", "coats", "frost", "nights", "children"],
    "dogs": ["loyal", "tail", "walks", "guides", "balls"],
    "music": ["rhythm", "songs", "concerts", "instrument", "drums"],
    "a quiet garden": ["roses", "bees", "bench", "birds", "path"],
}

REQUESTS = [
    "Describe {topic}.",
    "Write a short note about {topic}.",
    "Tell me about {topic}.",
    "Write about {topic}.",
]
END_PHRASES = [
    "Hope this helps.",
    "That is all.",
    "Thank you for reading.",
    "Let me know if you have questions.",
]
MIN_WORDS = [12, 15, 20]
MAX_WORDS = [12, 15, 20, 25]
BULLET_COUNTS = [2, 3, 4]

INSTRUCTION_TYPES = [
    "lowercase",
    "min_words",
    "max_words",
    "include_keyword",
    "end_with",
    "json_output",
    "bullet_points",
    "no_commas",
]
INCOMPATIBLE = [
    {"json_output", "bullet_points"},
    {"json_output", "end_with"},
    {"min_words", "max_words"},
]


def count_words(text: str) -> int:
    """Number of `\\w+` tokens (the IFEval convention: "don't" is two words)."""
    return len(re.findall(r"\w+", text))


def _strip_json_fence(text: str) -> str:
    text = text.strip()
    m = re.fullmatch(r"```(?:json|JSON)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    return m.group(1) if m else text


def check_instruction(response: str, instruction: dict) -> bool:
    """Whether `response` follows one instruction. Rules:

    - `lowercase`: has letters and none is uppercase (`str.islower`).
    - `min_words` / `max_words`: `count_words(response)` >= / <= `n`.
    - `include_keyword`: `keyword` occurs as a whole word, case-insensitively.
    - `end_with`: the stripped response ends with the stripped `phrase`, case-insensitively.
    - `json_output`: the whole response (optionally in a ```json fence) parses as JSON.
    - `bullet_points`: exactly `n` lines start (after indentation) with `"* "`.
    - `no_commas`: no `,` anywhere.
    Raises ValueError for an unknown type.
    """
    kind = instruction.get("type")
    if kind == "lowercase":
        return response.islower()
    if kind == "min_words":
        return count_words(response) >= int(instruction["n"])
    if kind == "max_words":
        return count_words(response) <= int(instruction["n"])
    if kind == "include_keyword":
        pattern = r"\b" + re.escape(str(instruction["keyword"])) + r"\b"
        return re.search(pattern, response, flags=re.IGNORECASE) is not None
    if kind == "end_with":
        return response.strip().lower().endswith(str(instruction["phrase"]).strip().lower())
    if kind == "json_output":
        try:
            json.loads(_strip_json_fence(response))
        except ValueError:
            return False
        return True
    if kind == "bullet_points":
        bullets = [line for line in response.splitlines() if line.lstrip().startswith("* ")]
        return len(bullets) == int(instruction["n"])
    if kind == "no_commas":
        return "," not in response
    raise ValueError(f"unknown instruction type {kind!r}; expected one of {INSTRUCTION_TYPES}")


def check_ifeval(response: str, instructions: list[dict]) -> dict:
    """`{"all": bool, "per_instruction": [bool, ...]}` for `response` against every instruction."""
    per = [check_instruction(response, ins) for ins in instructions]
    return {"all": all(per), "per_instruction": per}


def describe_instruction(instruction: dict) -> str:
    """The instruction as an English sentence, as it appears in the prompt."""
    kind = instruction["type"]
    texts = {
        "lowercase": "Use only lowercase letters.",
        "min_words": "Use at least {n} words.",
        "max_words": "Use at most {n} words.",
        "include_keyword": 'Include the word "{keyword}".',
        "end_with": 'End with the phrase "{phrase}"',
        "json_output": "Format the whole answer as JSON.",
        "bullet_points": 'Use exactly {n} bullet points starting with "* ".',
        "no_commas": "Do not use commas.",
    }
    if kind not in texts:
        raise ValueError(f"unknown instruction type {kind!r}; expected one of {INSTRUCTION_TYPES}")
    return texts[kind].format(**instruction)


def _sample_instructions(rng: random.Random, topic: str) -> list[dict]:
    while True:
        kinds = rng.sample(INSTRUCTION_TYPES, rng.choice([1, 2]))
        if not any(pair <= set(kinds) for pair in INCOMPATIBLE):
            break
    out: list[dict] = []
    for kind in kinds:
        ins: dict = {"type": kind}
        if kind == "min_words":
            ins["n"] = rng.choice(MIN_WORDS)
        elif kind == "max_words":
            ins["n"] = rng.choice(MAX_WORDS)
        elif kind == "bullet_points":
            ins["n"] = rng.choice(BULLET_COUNTS)
        elif kind == "include_keyword":
            ins["keyword"] = rng.choice(KEYWORDS[topic])
        elif kind == "end_with":
            ins["phrase"] = rng.choice(END_PHRASES)
        out.append(ins)
    return out


def build_response(topic: str, instructions: list[dict]) -> str:
    """A deterministic response about `topic` meant to satisfy `instructions` (callers must still check)."""
    spec = {ins["type"]: ins for ins in instructions}
    sentences = list(TOPICS[topic])
    if "include_keyword" in spec:
        pattern = r"\b" + re.escape(spec["include_keyword"]["keyword"]) + r"\b"
        hit = next((s for s in sentences if re.search(pattern, s, flags=re.IGNORECASE)), None)
        if hit is not None:
            sentences.remove(hit)
            sentences.insert(0, hit)

    def render(k: int) -> str:
        body = sentences[:k]
        if "bullet_points" in spec:
            text = "\n".join(f"* {s}" for s in body)
        else:
            text = " ".join(body)
        if "no_commas" in spec:
            text = text.replace(",", "")
        if "json_output" in spec:
            text = json.dumps({"answer": text})
        if "end_with" in spec:
            text += ("\n" if "bullet_points" in spec else " ") + spec["end_with"]["phrase"]
        if "lowercase" in spec:
            text = text.lower()
        return text

    if "bullet_points" in spec:
        return render(int(spec["bullet_points"]["n"]))
    k = 2
    if "min_words" in spec:
        while k < len(sentences) and count_words(render(k)) < int(spec["min_words"]["n"]):
            k += 1
    if "max_words" in spec:
        while k > 1 and count_words(render(k)) > int(spec["max_words"]["n"]):
            k -= 1
    return render(k)


def make_ifeval(n: int, seed: int = 0) -> list[dict]:
    """`n` seeded IFEval-style records (ids `ifeval-00000`...); every reference response passes its checks."""
    return seeded_records("ifeval", n, seed, _draw_ifeval)


def _draw_ifeval(rng: random.Random, seen: set[str]) -> dict:
    topics = sorted(TOPICS)
    for attempt in range(200):
        topic = rng.choice(topics)
        instructions = _sample_instructions(rng, topic)
        request = rng.choice(REQUESTS).format(topic=topic)
        prompt = " ".join([request, *(describe_instruction(ins) for ins in instructions)])
        response = build_response(topic, instructions)
        if not check_ifeval(response, instructions)["all"]:
            continue
        if prompt not in seen or attempt >= 100:  # duplicates only once the space looks exhausted
            break
    else:
        raise RuntimeError("make_ifeval: could not sample a satisfiable instruction set")
    return {"prompt": prompt, "response": response,
            "metadata": {"task": "ifeval", "topic": topic, "instructions": instructions}}
