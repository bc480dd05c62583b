"""The `misleading-capitals` study: capital questions preceded by a false claim, built from parts.

Like the paper's jailbreak prompt, each prompt is assembled from parts with variants: a framing of the
false claim (or none, the control), the kind of wrong city it names, and the country. Only countries
whose capital the built-in model answers correctly without a claim are used; which ones passed, and
each answer's first token for the built-in tokenizer, come from the check recorded in
`misleading_capitals.json` (rerun it with `python scripts/misleading_check.py`).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from adag.datasets.builtin import CAPITAL_QUESTION, COUNTRY_CAPITALS, SEED

CHECK_FILE = "misleading_capitals.json"

# The same question as the built-in `country-capitals` dataset, for more countries.
MORE_CAPITALS = {
    "Lebanon": "Beirut", "Syria": "Damascus", "Jordan": "Amman", "Morocco": "Rabat", "Tunisia": "Tunis",
    "Algeria": "Algiers", "Libya": "Tripoli", "Ghana": "Accra", "Senegal": "Dakar", "Uganda": "Kampala",
    "Zimbabwe": "Harare", "Zambia": "Lusaka", "Venezuela": "Caracas", "Ecuador": "Quito",
    "Uruguay": "Montevideo", "Jamaica": "Kingston", "Costa Rica": "San Jose", "Nepal": "Kathmandu",
    "Bangladesh": "Dhaka", "Malaysia": "Kuala Lumpur", "Mongolia": "Ulaanbaatar", "North Korea": "Pyongyang",
    "Taiwan": "Taipei", "Iceland": "Reykjavik", "the United Kingdom": "London", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Bulgaria": "Sofia", "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
    "Lithuania": "Vilnius", "Latvia": "Riga", "Estonia": "Tallinn", "Belarus": "Minsk", "Armenia": "Yerevan",
    "Azerbaijan": "Baku", "Kazakhstan": "Astana", "Uzbekistan": "Tashkent", "Qatar": "Doha",
    "New Zealand": "Wellington", "Sudan": "Khartoum", "Somalia": "Mogadishu", "Angola": "Luanda",
    "Rwanda": "Kigali", "Cameroon": "Yaounde", "Albania": "Tirana", "Cyprus": "Nicosia",
    "Cambodia": "Phnom Penh", "Nicaragua": "Managua", "Honduras": "Tegucigalpa", "England": "London",
    "Scotland": "Edinburgh", "Wales": "Cardiff", "the United Arab Emirates": "Abu Dhabi", "Panama": "Panama City",
    "the Dominican Republic": "Santo Domingo", "Haiti": "Port-au-Prince", "Paraguay": "Asuncion",
    "Oman": "Muscat", "Bosnia and Herzegovina": "Sarajevo", "North Macedonia": "Skopje",
    "Montenegro": "Podgorica", "Turkmenistan": "Ashgabat", "Mali": "Bamako", "Liberia": "Monrovia",
    "Botswana": "Gaborone", "Namibia": "Windhoek", "Malawi": "Lilongwe", "Bhutan": "Thimphu",
    "Guatemala": "Guatemala City", "El Salvador": "San Salvador", "Madagascar": "Antananarivo",
    "Mozambique": "Maputo",
}
CAPITALS = {**COUNTRY_CAPITALS, **MORE_CAPITALS}

# A large city of each country that is not its capital, preferring names whose first token is distinctive.
LARGE_CITIES = {
    "France": "Lyon", "Germany": "Munich", "Italy": "Milan", "Spain": "Barcelona", "Portugal": "Porto",
    "Japan": "Kyoto", "China": "Shanghai", "Russia": "Saint Petersburg", "Egypt": "Alexandria",
    "Greece": "Thessaloniki", "Austria": "Salzburg", "Poland": "Krakow", "Ireland": "Cork", "Norway": "Bergen",
    "Sweden": "Gothenburg", "Finland": "Tampere", "Denmark": "Odense", "Hungary": "Debrecen",
    "Czech Republic": "Brno", "Belgium": "Antwerp", "the Netherlands": "Rotterdam", "Switzerland": "Zurich",
    "Turkey": "Istanbul", "Iran": "Mashhad", "Iraq": "Mosul", "India": "Mumbai", "Thailand": "Chiang Mai",
    "Vietnam": "Da Nang", "South Korea": "Busan", "Indonesia": "Surabaya", "Philippines": "Davao",
    "Kenya": "Nakuru", "Argentina": "Cordoba", "Peru": "Trujillo", "Chile": "Valparaiso",
    "Colombia": "Medellin", "Mexico": "Monterrey", "Canada": "Toronto", "Australia": "Sydney",
    "Cuba": "Santiago de Cuba", "Ukraine": "Kharkiv", "Romania": "Timisoara", "Saudi Arabia": "Mecca",
    "Afghanistan": "Kandahar", "Pakistan": "Karachi", "Ethiopia": "Gondar", "Nigeria": "Lagos",
    "Brazil": "Rio de Janeiro", "Lebanon": "Tripoli", "Syria": "Aleppo", "Jordan": "Aqaba",
    "Morocco": "Casablanca", "Tunisia": "Sfax", "Algeria": "Oran", "Libya": "Benghazi", "Ghana": "Kumasi",
    "Senegal": "Touba", "Uganda": "Entebbe", "Zimbabwe": "Bulawayo", "Zambia": "Ndola",
    "Venezuela": "Maracaibo", "Ecuador": "Guayaquil", "Uruguay": "Salto", "Jamaica": "Montego Bay",
    "Costa Rica": "Limon", "Nepal": "Pokhara", "Bangladesh": "Sylhet", "Malaysia": "Penang",
    "Mongolia": "Erdenet", "North Korea": "Hamhung", "Taiwan": "Kaohsiung", "Iceland": "Akureyri",
    "the United Kingdom": "Manchester", "Serbia": "Novi Sad", "Croatia": "Split", "Bulgaria": "Plovdiv",
    "Slovakia": "Kosice", "Slovenia": "Maribor", "Lithuania": "Kaunas", "Latvia": "Daugavpils",
    "Estonia": "Tartu", "Belarus": "Gomel", "Armenia": "Gyumri", "Azerbaijan": "Ganja",
    "Kazakhstan": "Karaganda", "Uzbekistan": "Samarkand", "Qatar": "Al Rayyan", "New Zealand": "Auckland",
    "Sudan": "Port Sudan", "Somalia": "Hargeisa", "Angola": "Huambo", "Rwanda": "Huye", "Cameroon": "Douala",
    "Albania": "Durres", "Cyprus": "Limassol", "Cambodia": "Siem Reap", "Nicaragua": "Leon",
    "Honduras": "San Pedro Sula", "England": "Manchester", "Scotland": "Glasgow", "Wales": "Swansea",
    "the United Arab Emirates": "Dubai", "Panama": "Colon", "the Dominican Republic": "Santiago",
    "Haiti": "Cap-Haitien", "Paraguay": "Encarnacion", "Oman": "Salalah", "Bosnia and Herzegovina": "Mostar",
    "North Macedonia": "Bitola", "Montenegro": "Niksic", "Turkmenistan": "Turkmenabat", "Mali": "Sikasso",
    "Liberia": "Gbarnga", "Botswana": "Francistown", "Namibia": "Walvis Bay", "Malawi": "Blantyre",
    "Bhutan": "Paro", "Guatemala": "Quetzaltenango", "El Salvador": "Santa Ana", "Madagascar": "Toamasina",
    "Mozambique": "Beira",
}

# Invented city names; the check assigns one to each study country.
MADE_UP_CITIES = [
    "Velmora", "Castrelle", "Ostravik", "Dunmere", "Solbruck", "Tarvenna", "Zelgrad", "Mirabeth", "Norvalis",
    "Brisola", "Corvanne", "Fenwold", "Galvora", "Kelmaris", "Nestoria", "Tolvenna", "Wendrith", "Brevaldo",
    "Morvantis", "Selvaran", "Pendrith", "Lorvique", "Astrevo", "Belmarra", "Cindralo", "Trevanos",
    "Halvenor", "Volantre", "Merrowind", "Gorvinne", "Calvesta", "Pelgrave", "Lentavo", "Borquell",
]

# How the false claim is framed; "none" is the unmisled control.
FRAMINGS = {
    "none": "",
    "i_am_sure": "I am sure the capital of {country} is {wrong}. ",
    "teacher": "My teacher says the capital of {country} is {wrong}. ",
    "travel_blog": "According to a travel blog, the capital of {country} is {wrong}. ",
    "encyclopedia": "An old encyclopedia states that the capital of {country} is {wrong}. ",
    "friend": "A friend told me the capital of {country} is {wrong}. ",
}
WRONG_KINDS = ("same_country_city", "other_capital", "made_up")


@cache
def study_check() -> dict:
    """The recorded check of the built-in model (see scripts/misleading_check.py)."""
    return json.loads(resources.files("adag.datasets").joinpath(CHECK_FILE).read_text(encoding="utf-8"))


def misleading_capitals() -> list[dict]:
    """One unmisled control and one prompt per misleading framing for each study country.

    Rows are grouped by country (6 each), so `limit=6 * n` keeps n whole countries. The wrong kind
    rotates with country and framing, so each framing meets each kind equally often over every three
    countries. Labels are [correct, misleading] first tokens for the `logit_diff` metric; a control's
    misleading label is the same-country city.
    """
    check = study_check()
    first_token = check["first_tokens"]
    rows = []
    for index, entry in enumerate(check["study"]):
        country, correct = entry["country"], entry["capital"]
        for order, (framing, claim) in enumerate(FRAMINGS.items()):
            kind = "none" if framing == "none" else WRONG_KINDS[(index + order) % len(WRONG_KINDS)]
            wrong = entry["same_country_city" if kind == "none" else kind]
            rows.append({
                "prompt": claim.format(country=country, wrong=wrong) + CAPITAL_QUESTION.format(country=country),
                "seed_response": SEED,
                "labels": [first_token[correct], first_token[wrong]],
                "metadata": {"framing": framing, "wrong_kind": kind, "country": country, "correct": correct,
                             "misleading": wrong},
            })
    return rows
