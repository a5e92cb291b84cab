"""Many distinct, realistic intent sentences for the text benchmarks: templates × word lists.

A benchmark that claims "texts new to the server" needs sentences no server has seen, and
many of them: an embedding cache makes a repeated text nearly free. ``Sentences`` makes
them from each intent's templates, slot word lists, openers and closers, enumerated by a
counter (a mixed-radix number), so every sentence it hands out in a process is distinct
and the same seed gives the same ones. No dataset is read: the benchmarks run anywhere.

    source = Sentences()
    source.take("book_flight", 3)  # three sentences never handed out before
    source.support(["book_flight", "check_balance"], shots=5)  # (texts, labels)
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Sequence

CITIES = (
    "Boston", "Denver", "Lisbon", "Madrid", "Osaka", "Seattle", "Chicago", "Dublin", "Austin",
    "Toronto", "Berlin", "Prague", "Nairobi", "Sydney", "Lima", "Oslo", "Rome", "Seoul",
    "Vienna", "Atlanta", "Phoenix", "Montreal", "Hamburg", "Milan", "Bangkok", "Cairo",
    "Warsaw", "Zurich", "Helsinki", "Portland",
)  # fmt: skip
WHEN = (
    "tomorrow", "tonight", "on Monday", "on Friday", "next week", "this weekend",
    "at 7 am", "at noon", "in two hours", "on the 14th", "next Tuesday", "later today",
    "on Sunday morning", "the day after tomorrow", "at half past six", "before lunch",
    "this evening", "on Thursday night", "first thing tomorrow", "in March",
)  # fmt: skip
ITEMS = (
    "running shoes", "a coffee grinder", "the blue jacket", "wireless headphones",
    "a phone case", "the standing desk", "two bath towels", "a yoga mat", "the winter boots",
    "a laptop charger", "the kids' backpack", "a set of knives", "the rain coat",
    "a desk lamp", "noise cancelling earbuds", "the gift card", "a water bottle",
    "the garden hose", "a pair of sunglasses", "the office chair",
)  # fmt: skip
AMOUNTS = (
    "$20", "$45", "$100", "$250", "$12.50", "$75", "300 euros", "$1,000", "$60", "$5",
    "80 pounds", "$150", "$33", "$500", "$9.99",
)  # fmt: skip
PEOPLE = (
    "my sister", "Alex", "my landlord", "Maria", "my dad", "Sam", "the babysitter", "Priya",
    "my roommate", "John", "Chen", "my boss", "Fatima", "the plumber", "Lucas",
)  # fmt: skip
ACCOUNTS = ("checking", "savings", "joint", "business", "credit card", "travel card")
SONGS = (
    "some jazz", "the new Taylor Swift album", "lo-fi beats", "classic rock", "Bohemian "
    "Rhapsody", "something relaxing", "my workout playlist", "the Beatles", "Miles Davis",
    "some podcasts about history", "80s hits", "the top 40", "rain sounds", "Beethoven",
)  # fmt: skip
FOODS = (
    "a large pepperoni pizza", "pad thai", "two burritos", "sushi for four", "a veggie "
    "burger", "chicken curry", "a caesar salad", "dumplings", "fish and chips", "ramen",
    "a breakfast sandwich", "falafel wraps",
)  # fmt: skip
DEVICES = (
    "the living room lights", "the thermostat", "the kitchen lights", "the fan",
    "the porch light", "the bedroom lamp", "the air conditioner", "the TV", "the heater",
    "the garage door",
)  # fmt: skip
LANGUAGES = (
    "Spanish", "French", "Japanese", "German", "Italian", "Korean", "Portuguese", "Hindi",
    "Turkish", "Dutch",
)  # fmt: skip
SLOTS: dict[str, Sequence[str]] = {
    "city": CITIES,
    "when": WHEN,
    "item": ITEMS,
    "amount": AMOUNTS,
    "person": PEOPLE,
    "account": ACCOUNTS,
    "song": SONGS,
    "food": FOODS,
    "device": DEVICES,
    "language": LANGUAGES,
}
OPENERS = (
    "", "hey, ", "hi, ", "hello, ", "ok so ", "um ", "quick question: ", "excuse me, ",
    "good morning, ", "so ", "hey there, ", "yo ", "hi again, ", "sorry, ", "hey assistant, ",
    "one more thing, ",
)  # fmt: skip
CLOSERS = (
    "", " please", " thanks", ", thank you", " asap", " if you can", " for me", " now",
    " real quick", " if possible", ", appreciate it",
    " right away", ", cheers", " when you get a chance", " thx",
)  # fmt: skip

# intent -> its templates; {slot} names a list of SLOTS (each at most once per template)
INTENTS: dict[str, tuple[str, ...]] = {
    "book_flight": (
        "book me a flight to {city} {when}",
        "I need a plane ticket to {city} {when}",
        "find flights to {city} leaving {when}",
        "can you get me on a flight to {city} {when}",
    ),
    "book_hotel": (
        "I need a hotel room in {city} {when}",
        "reserve a hotel in {city} for {person} {when}",
        "find me somewhere to stay in {city} {when}",
    ),
    "weather": (
        "what's the weather like in {city} {when}",
        "will it rain in {city} {when}",
        "do I need an umbrella in {city} {when}",
        "how cold will it be in {city} {when}",
    ),
    "check_balance": (
        "how much money is in my {account} account",
        "what's the balance on my {account} account {when}",
        "show me my {account} balance",
        "do I have {amount} left in {account}",
    ),
    "transfer": (
        "send {amount} to {person}",
        "transfer {amount} from my {account} account to {person}",
        "move {amount} into my {account} account {when}",
        "pay {person} back {amount}",
    ),
    "lost_card": (
        "I lost my {account} card {when}",
        "my {account} card was stolen {when}",
        "freeze my {account} card, I can't find it",
    ),
    "order_status": (
        "where is my order of {item}",
        "has {item} shipped yet",
        "will {item} arrive {when}",
        "track the package with {item} in it",
    ),
    "return_item": (
        "I want to return {item} {when}",
        "how do I send back {item}",
        "{item} arrived broken, I need a refund",
        "can I exchange {item} for a different size",
    ),
    "play_music": (
        "play {song}",
        "put on {song} {when}",
        "I want to listen to {song}",
        "start playing {song} in the kitchen",
    ),
    "set_alarm": (
        "set an alarm for {when}",
        "wake me up {when}",
        "remind me to call {person} {when}",
        "set a reminder {when} to pick up {item}",
    ),
    "order_food": (
        "order {food} for delivery {when}",
        "I'm hungry, get me {food}",
        "can you order {food} to the office",
        "deliver {food} to {person}",
    ),
    "smart_home": (
        "turn off {device}",
        "switch on {device} {when}",
        "dim {device} {when}",
        "is {device} still on",
    ),
    "translate": (
        "how do you say {item} in {language}",
        "translate {song} into {language}",
        "what is {food} in {language}",
    ),
    "cancel_booking": (
        "cancel my trip to {city}",
        "I need to cancel the reservation in {city} {when}",
        "call off my {city} booking",
    ),
    "bill_due": (
        "when is my {account} bill due",
        "how much do I owe on my {account} account",
        "pay my {account} bill of {amount} {when}",
    ),
    "directions": (
        "how do I get to the airport in {city}",
        "directions to {person}'s place",
        "how long does it take to drive to {city}",
        "what's the fastest way to {city} {when}",
    ),
    "recipe": (
        "how do I make {food} {when}",
        "give me a recipe for {food}",
        "what do I need to cook {food} {when}",
    ),
    "timer": (
        "set a timer for {food} {when}",
        "how much time is left on the {food} timer",
        "start a ten minute timer {when}",
    ),
    "shopping_list": (
        "add {item} to my shopping list {when}",
        "put {food} on the grocery list",
        "what's on my shopping list {when}",
        "remove {item} from the list",
    ),
    "exchange_rate": (
        "how much is {amount} in yen",
        "convert {amount} to euros",
        "what's the exchange rate in {city} {when}",
    ),
}  # fmt: skip


class Template:
    """One template, its slots' word lists and the sentences it can make (``size``)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.slots = [name for _, name, _, _ in string.Formatter().parse(text) if name]
        # digits, least significant first: opener and closer, then the slots
        self.radices = [len(OPENERS), len(CLOSERS), *(len(SLOTS[s]) for s in self.slots)]
        self.size = math.prod(self.radices)

    def sentence(self, n: int) -> str:
        """The ``n``-th sentence (0 <= n < size): distinct ``n``, distinct sentences."""
        digits = []
        for r in self.radices:
            n, d = divmod(n, r)
            digits.append(d)
        opener, closer = OPENERS[digits[0]], CLOSERS[digits[1]]
        words = {s: SLOTS[s][d] for s, d in zip(self.slots, digits[2:], strict=True)}
        body = self.text.format(**words)
        if not opener:
            body = body[0].upper() + body[1:]
        mark = "?" if body.split(" ", 1)[0].lower() in QUESTIONS else ""
        return f"{opener}{body}{closer}{mark}"


QUESTIONS = {"what's", "what", "how", "when", "where", "will", "do", "can", "has", "is"}


class Sentences:
    """Distinct sentences per intent: the k-th one ``take`` hands out is sentence
    ``(k * step) mod capacity`` of the intent's enumeration (its templates' sentences one
    after another), ``step`` a seeded number coprime with the capacity, so the order is
    a permutation: no repeats, and consecutive sentences differ in more than an opener."""

    def __init__(self, seed: int = 0) -> None:
        self.templates = {i: [Template(t) for t in ts] for i, ts in INTENTS.items()}
        rng = random.Random(seed)
        self._rng = rng
        self._next = dict.fromkeys(INTENTS, 0)
        self._step: dict[str, int] = {}
        self._offset = {i: rng.randrange(self.capacity(i)) for i in INTENTS}
        for intent in INTENTS:
            space = self.capacity(intent)
            step = rng.randrange(space // 3, space) | 1
            while math.gcd(step, space) != 1:
                step += 2
            self._step[intent] = step

    @property
    def labels(self) -> list[str]:
        return list(INTENTS)

    def capacity(self, intent: str) -> int:
        """Distinct sentences ``take`` hands out for ``intent`` before it raises."""
        return sum(t.size for t in self.templates[intent])

    def take(self, intent: str, count: int) -> list[str]:
        """``count`` sentences of ``intent`` that this object has never handed out."""
        start, space = self._next[intent], self.capacity(intent)
        if start + count > space:
            raise RuntimeError(f"{intent}: all {space} distinct sentences were handed out")
        self._next[intent] = start + count
        step, offset = self._step[intent], self._offset[intent]
        return [self._nth(intent, (k * step + offset) % space) for k in range(start, start + count)]

    def _nth(self, intent: str, n: int) -> str:
        for template in self.templates[intent]:
            if n < template.size:
                return template.sentence(n)
            n -= template.size
        raise IndexError(n)

    def support(self, intents: Sequence[str], shots: int) -> tuple[list[str], list[str]]:
        """A support set: ``shots`` new sentences of each intent, and their labels."""
        texts: list[str] = []
        labels: list[str] = []
        for intent in intents:
            texts += self.take(intent, shots)
            labels += [intent] * shots
        return texts, labels

    def queries(self, count: int, intents: Sequence[str] | None = None) -> list[str]:
        """``count`` new sentences of random intents (of ``intents``, or any)."""
        pool = list(intents or INTENTS)
        return [self.take(self._rng.choice(pool), 1)[0] for _ in range(count)]

    def choose(self, ways: int) -> list[str]:
        """``ways`` distinct intents at random."""
        return self._rng.sample(self.labels, ways)
