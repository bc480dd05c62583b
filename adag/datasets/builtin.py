"""Built-in prompt sets. Answers are kept in metadata; labels are left to the user's tokenizer."""

from __future__ import annotations

import random

COUNTRY_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Austria": "Vienna", "Poland": "Warsaw", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest", "Czech Republic": "Prague",
    "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Switzerland": "Bern", "Turkey": "Ankara",
    "Iran": "Tehran", "Iraq": "Baghdad", "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul", "Indonesia": "Jakarta", "Philippines": "Manila", "Kenya": "Nairobi",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota",
    "Mexico": "Mexico City", "Canada": "Ottawa", "Australia": "Canberra", "Cuba": "Havana",
    "Ukraine": "Kyiv", "Romania": "Bucharest", "Saudi Arabia": "Riyadh", "Afghanistan": "Kabul",
    "Pakistan": "Islamabad", "Ethiopia": "Addis Ababa", "Nigeria": "Abuja", "Brazil": "Brasilia",
}

# The paper's two-hop task: one distinct city per US state, never the state's capital.
STATE_CITIES = {
    "Alabama": ("Birmingham", "Montgomery"), "Alaska": ("Anchorage", "Juneau"),
    "Arizona": ("Tucson", "Phoenix"), "Arkansas": ("Fayetteville", "Little Rock"),
    "California": ("Los Angeles", "Sacramento"), "Colorado": ("Colorado Springs", "Denver"),
    "Connecticut": ("Bridgeport", "Hartford"), "Delaware": ("Wilmington", "Dover"),
    "Florida": ("Miami", "Tallahassee"), "Georgia": ("Savannah", "Atlanta"),
    "Hawaii": ("Hilo", "Honolulu"), "Idaho": ("Pocatello", "Boise"),
    "Illinois": ("Chicago", "Springfield"), "Indiana": ("Fort Wayne", "Indianapolis"),
    "Iowa": ("Cedar Rapids", "Des Moines"), "Kansas": ("Wichita", "Topeka"),
    "Kentucky": ("Louisville", "Frankfort"), "Louisiana": ("New Orleans", "Baton Rouge"),
    "Maine": ("Portland", "Augusta"), "Maryland": ("Baltimore", "Annapolis"),
    "Massachusetts": ("Worcester", "Boston"), "Michigan": ("Detroit", "Lansing"),
    "Minnesota": ("Minneapolis", "Saint Paul"), "Mississippi": ("Biloxi", "Jackson"),
    "Missouri": ("Kansas City", "Jefferson City"), "Montana": ("Billings", "Helena"),
    "Nebraska": ("Omaha", "Lincoln"), "Nevada": ("Las Vegas", "Carson City"),
    "New Hampshire": ("Manchester", "Concord"), "New Jersey": ("Newark", "Trenton"),
    "New Mexico": ("Albuquerque", "Santa Fe"), "New York": ("Buffalo", "Albany"),
    "North Carolina": ("Charlotte", "Raleigh"), "North Dakota": ("Fargo", "Bismarck"),
    "Ohio": ("Cleveland", "Columbus"), "Oklahoma": ("Tulsa", "Oklahoma City"),
    "Oregon": ("Eugene", "Salem"), "Pennsylvania": ("Philadelphia", "Harrisburg"),
    "Rhode Island": ("Newport", "Providence"), "South Carolina": ("Charleston", "Columbia"),
    "South Dakota": ("Sioux Falls", "Pierre"), "Tennessee": ("Memphis", "Nashville"),
    "Texas": ("Dallas", "Austin"), "Utah": ("Provo", "Salt Lake City"),
    "Vermont": ("Burlington", "Montpelier"), "Virginia": ("Virginia Beach", "Richmond"),
    "Washington": ("Seattle", "Olympia"), "West Virginia": ("Wheeling", "Charleston"),
    "Wisconsin": ("Milwaukee", "Madison"), "Wyoming": ("Casper", "Cheyenne"),
}

ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down",
    "open": "closed", "rich": "poor", "young": "old", "strong": "weak", "early": "late", "full": "empty",
    "hard": "soft", "high": "low", "long": "short", "wet": "dry", "clean": "dirty", "loud": "quiet",
    "thick": "thin", "heavy": "light", "good": "bad", "true": "false", "win": "lose", "push": "pull",
    "inside": "outside", "left": "right", "first": "last", "begin": "end", "love": "hate", "day": "night",
}

SEED = "Answer:"
CAPITAL_QUESTION = "What is the capital of {country}?"


def country_capitals() -> list[dict]:
    return [
        {"prompt": CAPITAL_QUESTION.format(country=country), "seed_response": SEED,
         "metadata": {"country": country, "answer": capital}}
        for country, capital in COUNTRY_CAPITALS.items()
    ]


def state_capitals() -> list[dict]:
    return [
        {"prompt": f"What is the capital of the state containing {city}?", "seed_response": SEED,
         "metadata": {"city": city, "state": state, "answer": capital}}
        for state, (city, capital) in STATE_CITIES.items()
    ]


def addition(n: int = 100, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x, y = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"What is {x} + {y}?", "seed_response": SEED,
                     "metadata": {"x": x, "y": y, "answer": str(x + y)}})
    return rows


def antonyms() -> list[dict]:
    return [
        {"prompt": f"What is the opposite of \"{word}\"?", "seed_response": SEED,
         "metadata": {"word": word, "answer": opposite}}
        for word, opposite in ANTONYMS.items()
    ]
